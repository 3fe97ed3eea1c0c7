"""Scanner settings: one frozen dataclass, resolved once with a fixed precedence and validated once.

Precedence, highest first: command-line flag > ``SCANNER_*`` environment variable > TOML file
(``--config FILE``, else ``$SCANNER_CONFIG``, else ``./scanner.toml`` when present) > default.
Every invalid value raises :class:`~scanner.errors.ConfigError` naming the setting, where the value
came from, what was expected and what was found. Importing this module does not import torch.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from scanner.errors import ConfigError

ENV_PREFIX = "SCANNER_"
CONFIG_ENV = "SCANNER_CONFIG"
DEFAULT_CONFIG_NAME = "scanner.toml"
BACKBONE_FORMATS = ("auto", "openai", "open_clip", "hf")  # scanner.backbones.FORMATS plus "auto"
DETECTORS = ("ci", "ci-plain", "nc", "pixel")  # the engine's; plugins may register more
ACCEL_MODES = ("auto", "onnx", "torch")  # scanner.accel.features.ACCEL_MODES
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/scanner`` (``~/.cache/scanner``): ONNX sessions, pools and other re-buildables."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "scanner"


@dataclass(frozen=True)
class BackboneDeclaration:
    """A user-declared local CLIP backbone file or folder; verified by content hash when given."""

    name: str  # the name checkpoints refer to (e.g. "ViT-B-16")
    path: Path
    format: str = "auto"  # one of BACKBONE_FORMATS; "auto" guesses from the file layout
    arch: str | None = None  # open_clip architecture name; None = same as ``name``
    sha256: str | None = None  # expected sha256 of the file (or folder manifest); None = not checked


@dataclass(frozen=True)
class Settings:
    """Everything a scan needs besides the path. Build it with :func:`load_settings`."""

    # folder of PNG/JPEG images used as the OOD pool; None = the bundled pool built from shipped photos
    ood_dir: Path | None = field(
        default=None, metadata={"doc": "folder of PNG/JPEG OOD images; unset = bundled pool"}
    )
    ood_size: int = field(default=1000, metadata={"doc": "number of OOD images the detector uses"})
    seed: int = field(default=0, metadata={"doc": "seed of every random choice (pool crops, inversion init)"})
    detector: str = field(
        default="ci", metadata={"doc": "detector: " + " | ".join(DETECTORS) + " (or a plugin's)"}
    )
    threshold: float | None = field(
        default=None, metadata={"doc": "decision threshold (flag when score > it): CI a confirmed class's trigger "
                                      "score (by default the median logit margin of its patch trigger), the others "
                                      "an anomaly index k; unset = the detector's default (CI 6.09375, others 2)"}
    )
    detector_options: Mapping[str, Any] = field(
        default_factory=dict, metadata={"doc": "extra DetectorConfig fields, e.g. steps = 200"}
    )
    backbones: tuple[BackboneDeclaration, ...] = field(
        default=(), metadata={"doc": "local CLIP backbones: [backbones.NAME] path, format, arch, sha256"}
    )
    cache_dir: Path = field(
        default_factory=default_cache_dir, metadata={"doc": "cache of re-buildable files"}
    )
    report_dir: Path | None = field(default=None, metadata={"doc": "write an HTML report per model here"})
    max_file_bytes: int = field(
        default=1 << 30, metadata={"doc": "refuse model files larger than this (bytes)"}
    )
    load_plugins: tuple[str, ...] | None = field(
        default=None, metadata={"doc": "plugins to load (entry-point or distribution names); unset = all"}
    )
    device: str = field(default="cpu", metadata={"doc": "torch device for the detector: cpu, cuda, cuda:1"})
    accel: str = field(
        default="auto",
        metadata={"doc": "forward-only encoder work (OOD features, text features, ASR checks): onnx = "
                  "onnxruntime, torch fallback if export fails | torch | auto = onnx when onnxruntime is "
                  "installed and the model is on the CPU (on a GPU torch is faster)"},
    )
    accel_int8: bool = field(
        default=False,
        metadata={"doc": "with accel onnx: int8 image encoder for models whose top-1 on the OOD pool agrees "
                  "with fp32 on >= 99% of images"},
    )

    def backbone(self, name: str) -> BackboneDeclaration | None:
        return next((b for b in self.backbones if b.name == name), None)

    def to_toml(self) -> str:
        """These settings as a commented TOML file that :func:`load_settings` reads back."""
        return settings_to_toml(self)


# --------------------------------------------------------------------------- parsing

Source = str  # "default", "flag --seed", "env SCANNER_SEED", "file scanner.toml"


def _err(name: str, source: Source, expected: str, found: Any) -> ConfigError:
    return ConfigError(
        f"setting {name!r} ({source}): expected {expected}, found {found!r}; "
        f"fix it or run `scanner settings --defaults` to see every setting"
    )


def _int(name: str, value: Any, source: Source, minimum: int) -> int:
    if isinstance(value, bool):
        raise _err(name, source, f"an integer >= {minimum}", value)
    try:
        out = int(value) if isinstance(value, int | str) else None
    except ValueError:
        out = None
    if out is None or out < minimum:
        raise _err(name, source, f"an integer >= {minimum}", value)
    return out


def _path(name: str, value: Any, source: Source, base: Path | None) -> Path:
    if not isinstance(value, str | Path) or not str(value):
        raise _err(name, source, "a path", value)
    p = Path(value).expanduser()
    # Relative paths in a TOML file are relative to that file, not to wherever the command runs.
    return (base / p) if base is not None and not p.is_absolute() else p


def _optional_path(name: str, value: Any, source: Source, base: Path | None) -> Path | None:
    return None if value in (None, "") else _path(name, value, source, base)


def _float_or_none(name: str, value: Any, source: Source) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise _err(name, source, "a number", value)
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise _err(name, source, "a number", value) from None
    if not out == out or out in (float("inf"), float("-inf")):
        raise _err(name, source, "a finite number", value)
    return out


def _choice(name: str, value: Any, source: Source, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise _err(name, source, "one of " + ", ".join(choices), value)
    return str(value)


def _bool(name: str, value: Any, source: Source) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return value.strip().lower() in ("1", "true", "yes", "on")
    raise _err(name, source, "true or false", value)


def _name(name: str, value: Any, source: Source) -> str:
    if not isinstance(value, str) or not re.match(r"^[a-z0-9][a-z0-9_.-]*$", value):
        raise _err(name, source, "a detector name (" + ", ".join(DETECTORS) + " or a plugin's)", value)
    return value


def _device(name: str, value: Any, source: Source) -> str:
    if not isinstance(value, str) or not re.match(r"^(cpu|cuda(:\d+)?|mps)$", value):
        raise _err(name, source, "cpu, cuda, cuda:N or mps", value)
    return value


def check_device(value: str, source: Source = "flag --device") -> str:
    """A torch device name that is usable here: its form, and for CUDA, that torch sees a GPU."""
    _device("device", value, source)
    if value.startswith("cuda"):
        import torch  # only here: settings stay importable without torch's start-up cost

        index = int(value.split(":")[1]) if ":" in value else 0
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            raise ConfigError(f"device {value!r} ({source}): torch sees no such CUDA GPU here "
                              f"({torch.cuda.device_count()} visible); use cpu, or run on a machine with one")
    return value


def _plugins(name: str, value: Any, source: Source) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return tuple(p.strip() for p in value.split(",") if p.strip())
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return tuple(v.strip() for v in value if v.strip())
    raise _err(name, source, "a list of plugin names (or a comma-separated string)", value)


def _options(name: str, value: Any, source: Source) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise _err(name, source, "a table of DetectorConfig fields", value)
    for k, v in value.items():
        items = v if isinstance(v, list) else [v]
        if not all(isinstance(i, int | float | str | bool) for i in items):
            raise _err(f"{name}.{k}", source, "a number, string, boolean or a list of them", v)
    return dict(value)


def _backbone(name: str, value: Any, source: Source, base: Path | None) -> BackboneDeclaration:
    where = f"backbones.{name}"
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.@/-]*$", name):
        raise _err(where, source, "a backbone name of letters, digits, '-', '_', '.', '@' or '/'", name)
    if isinstance(value, str | Path):
        value = {"path": str(value)}
    if not isinstance(value, Mapping):
        raise _err(where, source, "a table with path, format, arch, sha256", value)
    unknown = sorted(set(value) - {"path", "format", "arch", "sha256"})
    if unknown:
        raise _err(where, source, "only the keys path, format, arch, sha256", unknown)
    if "path" not in value:
        raise _err(where, source, "a `path` key", dict(value))
    fmt = _choice(f"{where}.format", value.get("format", "auto"), source, BACKBONE_FORMATS)
    arch = value.get("arch")
    if arch is not None and (not isinstance(arch, str) or not arch):
        raise _err(f"{where}.arch", source, "an open_clip architecture name such as ViT-B-16", arch)
    sha = value.get("sha256")
    if sha is not None and (not isinstance(sha, str) or not _SHA256_RE.match(sha.lower())):
        raise _err(f"{where}.sha256", source, "64 hexadecimal digits", sha)
    return BackboneDeclaration(
        name=name,
        path=_path(f"{where}.path", value["path"], source, base),
        format=fmt,
        arch=arch,
        sha256=sha.lower() if isinstance(sha, str) else None,
    )


def parse_backbone_pairs(value: str | list[str] | tuple[str, ...], source: Source) -> dict[str, str]:
    """``"a=/x.pt,b=/y"`` or ``["a=/x.pt"]`` (the ``--backbone NAME=PATH`` form) -> ``{name: path}``."""
    items = [p.strip() for p in value.split(",")] if isinstance(value, str) else list(value)
    out: dict[str, str] = {}
    for item in items:
        if not item:
            continue
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise _err("backbones", source, "NAME=PATH", item)
        out[name.strip()] = path.strip()
    return out


# key -> (env suffix, converter(value, source, base_dir))
_Converter = Callable[[Any, Source, "Path | None"], Any]
_FIELDS: dict[str, _Converter] = {
    "ood_dir": lambda v, s, b: _optional_path("ood_dir", v, s, b),
    "ood_size": lambda v, s, b: _int("ood_size", v, s, 8),
    "seed": lambda v, s, b: _int("seed", v, s, 0),
    "detector": lambda v, s, b: _name("detector", v, s),
    "threshold": lambda v, s, b: _float_or_none("threshold", v, s),
    "detector_options": lambda v, s, b: _options("detector_options", v, s),
    "cache_dir": lambda v, s, b: _path("cache_dir", v, s, b),
    "report_dir": lambda v, s, b: _optional_path("report_dir", v, s, b),
    "max_file_bytes": lambda v, s, b: _int("max_file_bytes", v, s, 1),
    "load_plugins": lambda v, s, b: _plugins("load_plugins", v, s),
    "device": lambda v, s, b: _device("device", v, s),
    "accel": lambda v, s, b: _choice("accel", v, s, ACCEL_MODES),
    "accel_int8": lambda v, s, b: _bool("accel_int8", v, s),
}
_KNOWN = (*_FIELDS, "backbones")


def env_name(key: str) -> str:
    return ENV_PREFIX + key.upper()


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist; pass an existing --config FILE") from None
    except OSError as exc:
        raise ConfigError(
            f"config file {path} cannot be read ({exc.strerror}); check its permissions"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}; fix the syntax") from None


def find_config_file(explicit: Path | None, env: Mapping[str, str]) -> Path | None:
    """``--config`` > ``$SCANNER_CONFIG`` > ``./scanner.toml`` if present > none."""
    if explicit is not None:
        return explicit
    if env.get(CONFIG_ENV):
        return Path(env[CONFIG_ENV]).expanduser()
    local = Path.cwd() / DEFAULT_CONFIG_NAME
    return local if local.is_file() else None


def load_settings(
    *,
    config_file: Path | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Settings:
    """Resolve settings: ``flags`` (CLI values; ``None`` = not given) > env > TOML file > defaults.

    ``flags`` uses field names; ``flags["backbones"]`` is a ``{name: path}`` mapping that adds to or
    replaces the file's declarations by name.
    """
    env = os.environ if env is None else env
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    unknown_flags = sorted(set(flags) - set(_KNOWN))
    if unknown_flags:
        raise ConfigError(f"unknown setting(s) {unknown_flags}; known: {', '.join(_KNOWN)}")
    values: dict[str, Any] = {}
    backbones: dict[str, BackboneDeclaration] = {}

    path = find_config_file(config_file, env)
    if path is not None:
        data = _read_toml(path)
        unknown = sorted(set(data) - set(_KNOWN))
        if unknown:
            raise ConfigError(
                f"config file {path}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(_KNOWN)}"
            )
        src, base = f"file {path}", path.parent.resolve()
        for key, conv in _FIELDS.items():
            if key in data:
                values[key] = conv(data[key], src, base)
        raw_bb = data.get("backbones", {})
        if not isinstance(raw_bb, Mapping):
            raise _err("backbones", src, "tables [backbones.NAME]", raw_bb)
        for name, decl in raw_bb.items():
            backbones[name] = _backbone(name, decl, src, base)

    for key, conv in _FIELDS.items():
        if key == "detector_options":
            continue  # a table: TOML and flags only
        var = env_name(key)
        if var in env:
            values[key] = conv(env[var], f"env {var}", None)
    if env.get("SCANNER_BACKBONES"):
        for name, p in parse_backbone_pairs(env["SCANNER_BACKBONES"], "env SCANNER_BACKBONES").items():
            backbones[name] = _backbone(name, {"path": p}, "env SCANNER_BACKBONES", None)

    for key, value in flags.items():
        if key == "backbones":
            for name, p in dict(value).items():
                decl = {"path": p} if isinstance(p, str | Path) else p
                backbones[name] = _backbone(name, decl, "flag --backbone", None)
        else:
            values[key] = _FIELDS[key](value, f"flag --{key.replace('_', '-')}", None)

    return Settings(**values, backbones=tuple(backbones[n] for n in sorted(backbones)))


# --------------------------------------------------------------------------- writing


def settings_to_toml(settings: Settings) -> str:
    """A commented TOML rendering; unset values appear as commented-out examples."""
    lines = ["# scanner settings (precedence: flag > SCANNER_* env > this file > default)", ""]
    for f in dataclasses.fields(Settings):
        if f.name in ("backbones", "detector_options"):
            continue
        value = getattr(settings, f.name)
        lines.append(f"# {f.metadata.get('doc', '')}  [env {env_name(f.name)}]")
        if value is None:
            example = {"ood_dir": '"/data/ood-images"', "threshold": "6.5", "report_dir": '"scan-reports"',
                       "load_plugins": '["coop", "safetensors"]'}.get(f.name, '""')
            lines.append(f"# {f.name} = {example}")
        else:
            lines.append(tomli_w.dumps({f.name: _plain(value)}).strip())
        lines.append("")
    lines.append("# " + Settings.__dataclass_fields__["detector_options"].metadata["doc"])
    lines.append(tomli_w.dumps({"detector_options": dict(settings.detector_options)}).strip()
                 or "[detector_options]")
    lines.append("")
    lines.append("# local CLIP backbones, sha256-checked when given  [env SCANNER_BACKBONES=NAME=PATH,...]")
    if not settings.backbones:
        lines += ["# [backbones.ViT-B-16]", '# path = "/models/ViT-B-16.pt"',
                  '# format = "openai"   # ' + " | ".join(BACKBONE_FORMATS), '# arch = "ViT-B-16"',
                  '# sha256 = "..."']
    for b in settings.backbones:
        table = {"path": str(b.path), "format": b.format}
        if b.arch:
            table["arch"] = b.arch
        if b.sha256:
            table["sha256"] = b.sha256
        lines.append(tomli_w.dumps({"backbones": {b.name: table}}).strip())
    return "\n".join(lines) + "\n"


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value
