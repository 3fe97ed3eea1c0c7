"""The backbone store: user-declared local CLIP weight files (plus the bundled CLIP) as ``ClipBackbone``s.

Declared in settings (``backbones`` table) or on the command line (``--backbone NAME=PATH``); each entry
names a file, its format and optionally its architecture and the file's sha256. Built backbones are cached
per process, keyed by the file's identity, so a registry scan builds a ViT-B/16 once.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch

from scanner.backbones.arch import infer_arch, normalize_backbone_name
from scanner.backbones.formats import (
    FORMATS,
    BackboneFormat,
    Weights,
    detect_format,
    hf_weight_file,
    read_weights,
)
from scanner.clip import (
    BUNDLED_NAME,
    ClipBackbone,
    bundled_weights_path,
    create_backbone,
    load_bundled,
    register_configs,
)
from scanner.clip.backbone import OPENAI_MEAN, OPENAI_STD
from scanner.errors import BackboneError, CheckpointError
from scanner.safeload import DEFAULT_MAX_BYTES

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_QUICKGELU = "-quickgelu"
_FORMAT_ALIASES: dict[str, str] = {"auto": "auto", "safetensors": "open_clip"}


@dataclass(frozen=True)
class BackboneEntry:
    """One declared backbone.

    ``path`` is a file (``openai``/``open_clip``) or a folder (``hf``); ``arch`` an open_clip config name
    (inferred from tensor shapes when None); ``sha256`` the expected hash of the weight file (for ``hf``
    folders: of ``model.safetensors``/``pytorch_model.bin``), checked before the file is read.
    """

    name: str
    path: Path
    format: str  # a BackboneFormat, or "auto" (guessed from the file), or "safetensors" (= open_clip)
    arch: str | None = None
    sha256: str | None = None

    def __post_init__(self) -> None:
        if self.format not in (*FORMATS, *_FORMAT_ALIASES):
            raise BackboneError(
                f"backbone {self.name!r}: format {self.format!r} is not one of "
                f"{', '.join((*FORMATS, *_FORMAT_ALIASES))}"
            )
        if self.sha256 is not None and not _HEX64.match(self.sha256):
            raise BackboneError(f"backbone {self.name!r}: sha256 must be 64 lowercase hex digits")
        object.__setattr__(self, "path", Path(self.path))

    def resolved_format(self) -> BackboneFormat:
        """The concrete format: ``auto`` is guessed from the file, ``safetensors`` means open_clip."""
        if self.format == "auto":
            if not self.path.exists():
                raise BackboneError(
                    f"backbone {self.name!r}: {self.path} does not exist; fix its path in the `backbones` "
                    f"settings or pass --backbone {self.name}=PATH"
                )
            return detect_format(self.path)
        return _FORMAT_ALIASES.get(self.format, self.format)  # type: ignore[return-value]


def bundled_entry() -> BackboneEntry:
    """The always-available bundled tiny CLIP."""
    return BackboneEntry(BUNDLED_NAME, bundled_weights_path(), "bundled", BUNDLED_NAME, None)


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, streamed in 1 MiB blocks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def parse_backbone_flag(spec: str) -> BackboneEntry:
    """``NAME=PATH`` (``--backbone``), with optional ``,format=...,arch=...,sha256=...`` after the path."""
    name, sep, rest = spec.partition("=")
    if not sep or not name.strip() or not rest.strip():
        raise BackboneError(
            f"--backbone expects NAME=PATH (e.g. ViT-B-16=/models/ViT-B-16.pt), found {spec!r}"
        )
    path_s, *opts = rest.split(",")
    table: dict[str, Any] = {"path": path_s}
    for opt in opts:
        key, eq, value = opt.partition("=")
        if not eq or key not in ("format", "arch", "sha256"):
            raise BackboneError(f"--backbone option {opt!r} is not one of format=, arch=, sha256=")
        table[key] = value
    return entry_from_table(name.strip(), table)


def entry_from_table(name: str, table: Mapping[str, Any] | str) -> BackboneEntry:
    """An entry from a settings value: a path string, or ``{path, format?, arch?, sha256?}``."""
    spec: Mapping[str, Any] = {"path": table} if isinstance(table, str) else table
    unknown = set(spec) - {"path", "format", "arch", "sha256"}
    if unknown or "path" not in spec:
        raise BackboneError(
            f"backbone {name!r}: expected keys path (required), format, arch, sha256; found {sorted(spec)}"
        )
    path = Path(str(spec["path"])).expanduser()
    sha, arch = spec.get("sha256"), spec.get("arch")
    return BackboneEntry(name, path, str(spec.get("format") or "auto"), str(arch) if arch else None,
                         str(sha).lower() if sha else None)


# Process-wide cache: (format, resolved path, mtime_ns, size, arch) → backbone. Frozen modules are
# shared read-only, so handing the same instance to every caller is safe.
_CACHE: dict[tuple[str, str, int, int, str | None], ClipBackbone] = {}
_LOCK = threading.Lock()


def _cache_key(entry: BackboneEntry) -> tuple[str, str, int, int, str | None]:
    fmt = entry.resolved_format()
    target = hf_weight_file(entry.path) if fmt == "hf" else entry.path
    st = target.stat()
    return (fmt, str(target.resolve()), st.st_mtime_ns, st.st_size, entry.arch)


def _choose_arch(entry: BackboneEntry, weights: Weights) -> str:
    """The declared arch; else the entry's name when it is an open_clip config matching the shapes
    (so ``ViT-B-16-quickgelu`` keeps its activation); else inferred from the shapes."""
    if entry.arch:
        return entry.arch
    inferred = infer_arch(weights.state_dict, quick_gelu=bool(weights.quick_gelu))
    named = normalize_backbone_name(entry.name)
    if weights.quick_gelu is None and named in open_clip.list_models() \
            and named.removesuffix(_QUICKGELU) == inferred:
        return named
    return inferred


def build_backbone(entry: BackboneEntry, *, max_bytes: int = DEFAULT_MAX_BYTES) -> ClipBackbone:
    """Read, verify and build one entry (uncached); see :meth:`BackboneStore.get`."""
    fmt = entry.resolved_format()
    if fmt == "bundled":
        return load_bundled()
    if not entry.path.exists():
        raise BackboneError(
            f"backbone {entry.name!r}: {entry.path} does not exist; fix its path in the `backbones` "
            f"settings or pass --backbone {entry.name}=PATH"
        )
    if entry.sha256 is not None:
        target = hf_weight_file(entry.path) if fmt == "hf" else entry.path
        found = file_sha256(target)
        if found != entry.sha256:
            raise BackboneError(
                f"backbone {entry.name!r}: {target} has sha256 {found}, expected {entry.sha256}; the file "
                "changed or is not the declared backbone — replace it or update the declared sha256"
            )
    try:
        weights = read_weights(entry.path, fmt, max_bytes=max_bytes)
    except CheckpointError as exc:
        raise BackboneError(f"backbone {entry.name!r}: {exc}") from exc
    arch = _choose_arch(entry, weights)
    model = _instantiate(arch, weights.state_dict)
    mean, std = _preprocessing(model, weights.mean, weights.std)
    return ClipBackbone(model, arch, mean=mean, std=std)


def _instantiate(arch: str, sd: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The open_clip model ``arch`` holding ``sd``'s tensors.

    Built on the meta device and filled with ``assign=True``: random-initialising a ViT-B/16 only to
    overwrite it costs ~10 s on a busy CPU. The one non-persistent buffer (the text tower's causal mask,
    (L, L) with -inf above the diagonal) is rebuilt; any other one falls back to a normal build.
    """
    register_configs()
    if arch not in open_clip.list_models():
        return create_backbone(arch, sd).model  # raises the unknown-architecture BackboneError
    with torch.device("meta"):
        model = open_clip.create_model(arch, pretrained=None, device="meta")
    # assign=True keeps the given tensors' dtypes: cast to the model's own (fp16 files, int counters).
    expected = {k: v.dtype for k, v in model.state_dict().items()}
    sd = {k: v.to(expected[k]) if k in expected else v for k, v in sd.items()}
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as exc:
        detail = " ".join(line.strip() for line in str(exc).splitlines()[1:])[:400]
        raise BackboneError(
            f"weights do not match the {arch} architecture ({detail}); declare the right arch or format"
        ) from exc
    leftover = [n for n, b in model.named_buffers() if b.is_meta]
    if leftover != ["attn_mask"]:
        return create_backbone(arch, sd).model
    length = int(model.attn_mask.shape[0])
    model.register_buffer("attn_mask", torch.full((length, length), float("-inf")).triu_(1), persistent=False)
    return model.eval()


def _preprocessing(model: torch.nn.Module, mean: tuple[float, ...] | None,
                   std: tuple[float, ...] | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    # The file's own statement wins (HF preprocessor_config.json); otherwise the open_clip config's
    # preprocess_cfg (OpenAI statistics for every OpenAI-style architecture).
    cfg = getattr(model.visual, "preprocess_cfg", None) or {}
    return (tuple(mean or cfg.get("mean") or OPENAI_MEAN), tuple(std or cfg.get("std") or OPENAI_STD))


class BackboneStore:
    """The declared backbones by name; builds each on first use and caches it per process."""

    def __init__(self, entries: Iterable[BackboneEntry] = (), *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self._entries: dict[str, BackboneEntry] = {BUNDLED_NAME: bundled_entry()}
        for e in entries:
            self._entries[e.name] = e
        self._max_bytes = max_bytes

    @classmethod
    def from_settings(cls, backbones: Mapping[str, Any] | None = None, flags: Iterable[str] = (),
                      *, max_bytes: int = DEFAULT_MAX_BYTES) -> BackboneStore:
        """Entries from the settings ``backbones`` table plus ``--backbone NAME=PATH`` flags (flags win)."""
        entries = [entry_from_table(n, t) for n, t in (backbones or {}).items()]
        entries += [parse_backbone_flag(f) for f in flags]
        return cls(entries, max_bytes=max_bytes)

    @property
    def entries(self) -> list[BackboneEntry]:
        return list(self._entries.values())

    def _find_entry(self, name: str) -> BackboneEntry | None:
        if name in self._entries:
            return self._entries[name]
        want = normalize_backbone_name(name).lower()
        for e in self._entries.values():
            names = {normalize_backbone_name(e.name).lower()}
            if e.arch:
                names |= {e.arch.lower(), e.arch.lower().removesuffix(_QUICKGELU)}
            if want in names:
                return e
        return None

    def _build(self, entry: BackboneEntry) -> ClipBackbone:
        if entry.format == "bundled" or not entry.path.exists():
            return build_backbone(entry)  # bundled: cached by scanner.clip; absent: raises the error
        key = _cache_key(entry)
        with _LOCK:
            cached = _CACHE.get(key)
            if cached is None:
                cached = build_backbone(entry, max_bytes=self._max_bytes)
                _CACHE[key] = cached
        return cached

    def _missing(self, what: str) -> BackboneError:
        declared = ", ".join(sorted(self._entries))
        return BackboneError(
            f"backbone {what!r} is not available (declared: {declared}); declare it in the settings "
            f"under `backbones` ([backbones.\"{normalize_backbone_name(what)}\"] path = \"/models/x.pt\") "
            f"or pass --backbone {normalize_backbone_name(what)}=PATH"
        )

    def get(self, name_or_content_hash: str) -> ClipBackbone:
        """The backbone declared under this name (OpenAI spellings accepted), or whose content hash
        (:meth:`ClipBackbone.content_hash`) or file sha256 is this. Raises :class:`BackboneError`."""
        entry = self._find_entry(name_or_content_hash)
        if entry is not None:
            return self._build(entry)
        key = name_or_content_hash.lower()
        if _HEX64.match(key):
            for e in self._entries.values():
                if e.sha256 == key:
                    return self._build(e)
            for e in self._entries.values():
                try:
                    bb = self._build(e)
                except BackboneError:
                    continue  # a broken or absent entry cannot be the one with this hash
                if bb.content_hash() == key:
                    return bb
        raise self._missing(name_or_content_hash)

    def resolve(self, name: str | None, content_hash: str | None) -> ClipBackbone:
        """The backbone a checkpoint's metadata names: by content hash when given (verified against the
        named one), else by name; neither → the bundled CLIP."""
        if content_hash:
            try:
                return self.get(content_hash)
            except BackboneError:
                if not name:
                    raise
            bb = self.get(name)
            raise BackboneError(
                f"the checkpoint was tuned on backbone {name!r} with content hash {content_hash}, but the "
                f"declared {name!r} has hash {bb.content_hash()}; declare the exact backbone it was trained "
                "on (`backbones` settings or --backbone NAME=PATH)"
            )
        return self.get(name or BUNDLED_NAME)


def clear_cache() -> None:
    """Forget every built backbone (tests; a daemon reloading its settings)."""
    with _LOCK:
        _CACHE.clear()


__all__ = [
    "BackboneEntry",
    "BackboneStore",
    "build_backbone",
    "bundled_entry",
    "clear_cache",
    "entry_from_table",
    "file_sha256",
    "parse_backbone_flag",
]
