"""Prompt-learner checkpoints: CoOp/Dassl's layout (read safely) and the project's safetensors format.

Dassl layout (what CoOp/CoCoOp providers deliver)::

    MODEL/prompt_learner/model.pth.tar-<epoch>   torch.save({"state_dict", "epoch", "optimizer", "scheduler"})
    MODEL/classnames.txt                         one class name per line   (ours; optional on load)
    MODEL/scanner.json                           backbone name + hash, learner config (ours; optional)

``state_dict`` holds ``ctx`` and CoOp's ``token_prefix``/``token_suffix`` buffers (and ``meta_net.*`` for
CoCoOp). Such files are pickles: they are only read through :func:`scanner.safeload.safe_torch_load`
(a static opcode allow-list scan, then ``torch.load(weights_only=True)``), never a plain ``torch.load``.

Safe format: one ``.safetensors`` file with the same tensors and string metadata (format version,
backbone name + content hash, learner type, n_ctx, csc, class-token position, class names as JSON).

Every write goes to a temporary name in the target directory and is renamed into place, so a reader
(or the registry watcher) never sees a partial file.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from scanner.clip.backbone import ClipBackbone
from scanner.errors import BackboneError, CheckpointError
from scanner.prompting.classnames import decode_classnames
from scanner.prompting.learners import CoCoOpLearner, PromptLearner, learner_from_config
from scanner.safeload import safe_load_safetensors, safe_torch_load

FORMAT_NAME = "scanner-prompt"
FORMAT_VERSION = 1
DEFAULT_MAX_BYTES = 256 * 1024 * 1024  # a CoOp ViT-B/16 learner with 1000 classes is ~160 MB
PROMPT_DIR = "prompt_learner"
CLASSNAMES_FILE = "classnames.txt"
META_FILE = "scanner.json"
_EPOCH_FILE = re.compile(r"^model\.pth\.tar-(\d+)$")
_TOKEN_KEYS = ("token_prefix", "token_suffix")
_EXTRA_KEY = "extra"  # safetensors metadata key of save_safetensors(extra_metadata=...) (one JSON object)
_ATOL = 1e-4  # stored token rows must equal the backbone's table rows up to this (in the stored dtype)


@dataclass
class PromptCheckpoint:
    """A prompt learner read from disk, with where its pieces came from."""

    learner: PromptLearner
    path: Path  # the checkpoint file that was read
    format: str  # "dassl" or "safetensors"
    epoch: int | None
    classnames_source: str  # "argument", "classnames.txt", "metadata" or "token_suffix"
    metadata: dict[str, Any] = field(default_factory=dict)  # scanner.json / safetensors metadata

    @property
    def classnames(self) -> list[str]:
        return self.learner.classnames


# --------------------------------------------------------------------- writing
def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Run ``write(tmp)`` on a temporary sibling of ``path`` and rename it into place; clean up on error."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _make_dirs(path: Path) -> list[Path]:
    """mkdir -p, returning the directories that were created (deepest last) so they can be removed."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        d.mkdir()
    return list(reversed(missing))


def _metadata(learner: PromptLearner) -> dict[str, Any]:
    backbone = learner.backbone
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "backbone": backbone.name,
        "backbone_sha256": backbone.content_hash(),
        "learner": learner.config(),
    }


def _prompt_state(learner: PromptLearner, include_tokens: bool) -> dict[str, torch.Tensor]:
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in learner.state_dict().items()}
    if not include_tokens:
        for k in _TOKEN_KEYS:
            state.pop(k, None)
    return state


def save_dassl(learner: PromptLearner, model_dir: Path, *, epoch: int,
               optimizer: torch.optim.Optimizer | None = None, write_classnames: bool = True,
               write_metadata: bool = True, extra_metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``model_dir/prompt_learner/model.pth.tar-<epoch>`` like Dassl; returns the file's path.

    Also writes ``classnames.txt`` and ``scanner.json`` next to ``prompt_learner/`` unless disabled;
    ``extra_metadata`` (JSON-able, e.g. ``{"repair": {...}}``) joins ``scanner.json``'s top level.
    On error nothing new is left behind (files or directories created by this call).
    """
    model_dir = Path(model_dir)
    created = _make_dirs(model_dir / PROMPT_DIR)
    target = model_dir / PROMPT_DIR / f"model.pth.tar-{int(epoch)}"
    written: list[Path] = []
    try:
        payload = {
            "state_dict": _prompt_state(learner, include_tokens=True),
            "epoch": int(epoch),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scheduler": None,
        }
        atomic_write(target, lambda tmp: torch.save(payload, tmp))
        written.append(target)
        if write_classnames:
            names = model_dir / CLASSNAMES_FILE
            atomic_write(names, lambda tmp: tmp.write_text("".join(f"{c}\n" for c in learner.classnames)))
            written.append(names)
        if write_metadata:
            meta = model_dir / META_FILE
            text = json.dumps({**dict(extra_metadata or {}), **_metadata(learner)}, indent=2, sort_keys=True) + "\n"
            atomic_write(meta, lambda tmp: tmp.write_text(text))
            written.append(meta)
    except BaseException:
        for p in written:
            p.unlink(missing_ok=True)
        for d in reversed(created):
            with contextlib.suppress(OSError):  # not empty: someone else wrote there
                d.rmdir()
        raise
    return target


def save_safetensors(learner: PromptLearner, path: Path, *, include_tokens: bool = True,
                     extra_metadata: Mapping[str, Any] | None = None) -> Path:
    """Write the learner as one ``.safetensors`` file with JSON-string metadata; returns ``path``.

    ``include_tokens=False`` drops ``token_prefix``/``token_suffix`` (they are rebuilt from the stored
    class names on load), which keeps files small for real backbones. ``extra_metadata`` (JSON-able,
    e.g. ``{"repair": {...}}``) is stored as one JSON string and comes back in the loaded metadata.
    """
    path = Path(path)
    meta = _metadata(learner)
    config = meta.pop("learner")
    strings = {
        **{k: str(v) for k, v in meta.items()},
        "learner_type": learner.learner_type,
        "n_ctx": str(learner.n_ctx),
        "csc": json.dumps(learner.csc),
        "class_token_position": learner.class_token_position,
        "learner_config": json.dumps(config, sort_keys=True),
        "classnames": json.dumps(learner.classnames),
    }
    if extra_metadata:
        strings[_EXTRA_KEY] = json.dumps(dict(extra_metadata), sort_keys=True)
    tensors = _prompt_state(learner, include_tokens)
    created = _make_dirs(path.parent)
    try:
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=strings))
    except BaseException:
        for d in reversed(created):
            with contextlib.suppress(OSError):  # not empty: someone else wrote there
                d.rmdir()
        raise
    return path


# --------------------------------------------------------------------- finding
def find_checkpoint(path: Path) -> Path:
    """The checkpoint file ``path`` names, or the one to use inside a model directory.

    In ``path/prompt_learner/`` then ``path/``: ``model.pth.tar-N`` with the highest N, else
    ``model-best.pth.tar``, else a single ``*.ckpt``, else a single ``*.safetensors``.
    """
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint at {path}: the path does not exist")
    for folder in (path / PROMPT_DIR, path):
        if not folder.is_dir():
            continue
        files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
        epochs = [(int(m.group(1)), p) for p in files if (m := _EPOCH_FILE.match(p.name))]
        if epochs:
            return max(epochs)[1]
        best = folder / "model-best.pth.tar"
        if best.is_file():
            return best
        for ext in (".ckpt", ".safetensors"):
            found = sorted(p for p in files if p.suffix == ext)
            if len(found) == 1:
                return found[0]
            if len(found) > 1:
                raise CheckpointError(
                    f"{folder} holds several {ext} files ({', '.join(p.name for p in found[:5])}); "
                    "pass the one to load"
                )
    raise CheckpointError(
        f"no checkpoint found in {path}: expected {PROMPT_DIR}/model.pth.tar-<epoch>, model-best.pth.tar, "
        "a .ckpt or a .safetensors file"
    )


# --------------------------------------------------------------------- reading
def _normalise_keys(state: dict[str, Any], path: Path) -> dict[str, torch.Tensor]:
    """Strip wrappers' prefixes (``module.``, ``...prompt_learner.``) and insist on tensor values."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = str(key)
        if "prompt_learner." in name:
            name = name.rsplit("prompt_learner.", 1)[1]
        name = name.removeprefix("module.")
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{path}: state_dict entry {key!r} is a {type(value).__name__}, not a tensor"
            )
        out[name] = value
    return out


def read_dassl(path: Path, *, max_bytes: int = DEFAULT_MAX_BYTES
               ) -> tuple[dict[str, torch.Tensor], int | None]:
    """The prompt-learner state dict and epoch of a Dassl-style file (or a bare state dict)."""
    obj = safe_torch_load(Path(path), max_bytes=max_bytes)  # opcode allow-list, then weights_only
    epoch: int | None = None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        raw = obj["state_dict"]
        epoch = obj["epoch"] if isinstance(obj.get("epoch"), int) else None
    elif isinstance(obj, dict):
        raw = obj
    else:
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}; expected a dict with a 'state_dict' (Dassl) "
            "or a state dict"
        )
    return _normalise_keys(raw, Path(path)), epoch


def read_safetensors(path: Path, *, max_bytes: int = DEFAULT_MAX_BYTES
                     ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and decoded metadata of a scanner ``.safetensors`` prompt file."""
    path = Path(path)
    tensors, strings = safe_load_safetensors(path, max_bytes=max_bytes)  # header validated first
    return tensors, _decode_metadata(strings, path)


def _decode_metadata(strings: dict[str, str], path: Path) -> dict[str, Any]:
    if not strings:
        return {}
    if strings.get("format") != FORMAT_NAME:
        return {}  # someone else's safetensors: tensors only
    version = int(strings.get("format_version", "0"))
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} is {FORMAT_NAME} format version {version}; this scanner reads up to {FORMAT_VERSION}. "
            "Upgrade the scanner"
        )
    try:
        config = json.loads(strings.get("learner_config", "{}"))
        names = json.loads(strings["classnames"]) if "classnames" in strings else None
        extra = json.loads(strings[_EXTRA_KEY]) if _EXTRA_KEY in strings else {}
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: metadata is not valid JSON ({exc})") from exc
    return {
        **(extra if isinstance(extra, dict) else {}),
        "format": FORMAT_NAME,
        "format_version": version,
        "backbone": strings.get("backbone"),
        "backbone_sha256": strings.get("backbone_sha256"),
        "learner": config,
        "classnames": names,
    }


def _model_dir_files(ckpt: Path) -> tuple[list[str] | None, dict[str, Any]]:
    """classnames.txt and scanner.json next to ``prompt_learner/`` (or next to the file)."""
    folders = [ckpt.parent.parent, ckpt.parent] if ckpt.parent.name == PROMPT_DIR else [ckpt.parent]
    names: list[str] | None = None
    meta: dict[str, Any] = {}
    for folder in folders:
        if names is None and (folder / CLASSNAMES_FILE).is_file():
            lines = (folder / CLASSNAMES_FILE).read_text(encoding="utf-8").splitlines()
            names = [ln.strip() for ln in lines if ln.strip()]
        if not meta and (folder / META_FILE).is_file():
            try:
                meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise CheckpointError(
                    f"{folder / META_FILE} is not valid JSON ({exc}); fix or remove it"
                ) from exc
    return names, meta


def _verify_backbone(meta: dict[str, Any], backbone: ClipBackbone, path: Path) -> None:
    expected = meta.get("backbone_sha256")
    if expected and expected != backbone.content_hash():
        raise BackboneError(
            f"{path} was tuned on backbone {meta.get('backbone')!r} with content hash {expected[:12]}…, but "
            f"the backbone given ({backbone.name!r}) hashes to {backbone.content_hash()[:12]}…; load the "
            "matching backbone weights"
        )


def load_checkpoint(path: Path, backbone: ClipBackbone, *, classnames: Sequence[str] | None = None,
                    verify_backbone: bool = True, max_bytes: int = DEFAULT_MAX_BYTES) -> PromptCheckpoint:
    """Read a prompt learner (Dassl file/directory or ``.safetensors``) onto ``backbone``.

    Class names: ``classnames`` > ``classnames.txt`` / stored metadata > decoded from ``token_suffix``.
    With ``verify_backbone`` a stored content hash must match ``backbone`` (:class:`BackboneError`).
    """
    ckpt = find_checkpoint(Path(path))
    epoch: int | None = None
    if ckpt.suffix == ".safetensors":
        fmt = "safetensors"
        state, meta = read_safetensors(ckpt, max_bytes=max_bytes)
        stored_names = meta.get("classnames")
        names_from = "metadata"
    else:
        fmt = "dassl"
        state, epoch = read_dassl(ckpt, max_bytes=max_bytes)
        stored_names, meta = _model_dir_files(ckpt)
        names_from = CLASSNAMES_FILE
    if verify_backbone:
        _verify_backbone(meta, backbone, ckpt)
    if classnames is not None:
        names: list[str] | None = list(classnames)
        source = "argument"
    elif stored_names:
        names, source = list(stored_names), names_from
    else:
        names, source = None, "token_suffix"
    config = meta.get("learner") if isinstance(meta.get("learner"), dict) else None
    learner = learner_from_state(backbone, state, names, config)
    return PromptCheckpoint(learner=learner, path=ckpt, format=fmt, epoch=epoch, classnames_source=source,
                            metadata=meta)


# --------------------------------------------------------------------- state -> learner
def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def learner_from_state(backbone: ClipBackbone, state: dict[str, torch.Tensor], classnames: list[str] | None,
                       config: dict[str, Any] | None) -> PromptLearner:
    """Rebuild a learner from a CoOp/CoCoOp state dict, checking every shape against ``backbone``.

    Type: ``meta_net.*`` keys -> CoCoOp, ``ctx`` (n_cls, M, D) -> CoOp-CSC, else CoOp; M from ``ctx``.
    Without ``classnames`` they are decoded from ``token_suffix``. Prefix/suffix are rebuilt from the
    names (as CoOp's loader does) and, when stored, must equal the rebuilt ones.
    """
    config = dict(config or {})
    width, length, embed = backbone.text_width, backbone.context_length, backbone.embed_dim
    if "ctx" not in state:
        raise CheckpointError(
            f"no 'ctx' tensor in the state dict (keys: {', '.join(sorted(state)[:8])}); expected a CoOp or "
            "CoCoOp prompt learner"
        )
    ctx = state["ctx"]
    if ctx.ndim not in (2, 3) or ctx.shape[-1] != width:
        raise CheckpointError(
            f"ctx has shape {_shape(ctx)}; expected (n_ctx, {width}) or (n_cls, n_ctx, {width}) for backbone "
            f"{backbone.name!r} (text width {width}); load it with the backbone it was tuned on"
        )
    n_ctx = int(ctx.shape[-2])
    if 1 + n_ctx + 2 > length:
        raise CheckpointError(
            f"ctx has {n_ctx} context tokens; backbone {backbone.name!r} has context length {length}, which "
            f"leaves room for at most {length - 3}"
        )
    meta_keys = sorted(k for k in state if k.startswith("meta_net."))
    kind = "cocoop" if meta_keys else ("coop-csc" if ctx.ndim == 3 else "coop")
    if kind == "cocoop" and ctx.ndim != 2:
        raise CheckpointError(f"CoCoOp ctx must be (n_ctx, {width}); found {_shape(ctx)}")
    stated = config.get("learner_type")
    if stated is not None and stated != kind:
        raise CheckpointError(f"metadata says learner type {stated!r} but the tensors are those of {kind!r}")

    prefix, suffix = state.get("token_prefix"), state.get("token_suffix")
    if suffix is not None and (suffix.ndim != 3 or suffix.shape[1:] != (length - 1 - n_ctx, width)):
        raise CheckpointError(
            f"token_suffix has shape {_shape(suffix)}; expected (n_cls, {length - 1 - n_ctx}, {width}) = "
            f"(n_cls, context_length-1-n_ctx, text width) for backbone {backbone.name!r}; the checkpoint was "
            "tuned on a different backbone"
        )
    if prefix is not None and (prefix.ndim != 3 or prefix.shape[1:] != (1, width)):
        raise CheckpointError(f"token_prefix has shape {_shape(prefix)}; expected (n_cls, 1, {width})")

    position = str(config.get("class_token_position", "end"))
    if classnames is None:
        if suffix is None:
            raise CheckpointError(
                "the checkpoint stores no class names and no token_suffix to decode them from; pass the "
                "class names (one per line in classnames.txt next to prompt_learner/, or --classnames)"
            )
        classnames = decode_classnames(backbone, suffix, position)
    n_cls = len(classnames)
    for name, t, dim in (("ctx", ctx if ctx.ndim == 3 else None, 0), ("token_suffix", suffix, 0),
                         ("token_prefix", prefix, 0)):
        if t is not None and t.shape[dim] != n_cls:
            raise CheckpointError(
                f"{name} is for {t.shape[dim]} classes but {n_cls} class names were given; pass the class "
                "list the model was tuned with"
            )

    meta_hidden: int | None = None
    if kind == "cocoop":
        expected_keys = {f"meta_net.{a}.{b}" for a in ("linear1", "linear2") for b in ("weight", "bias")}
        if set(meta_keys) != expected_keys:
            raise CheckpointError(
                f"meta_net keys {meta_keys}; expected CoCoOp's {sorted(expected_keys)}"
            )
        w1, w2 = state["meta_net.linear1.weight"], state["meta_net.linear2.weight"]
        meta_hidden = int(w1.shape[0])
        if w1.shape != (meta_hidden, embed) or w2.shape != (width, meta_hidden):
            raise CheckpointError(
                f"meta_net weights {_shape(w1)} and {_shape(w2)}; expected (hidden, {embed}) and "
                f"({width}, hidden) for backbone {backbone.name!r} (embed {embed}, text width {width})"
            )
    known = {"ctx", *_TOKEN_KEYS, *meta_keys}
    unknown = sorted(set(state) - known)
    if unknown:
        # MaPLe's deep prompts (``compound_prompts_text.*``, coupled to vision-side prompts) change the image
        # features too, so they need their own learner, not a CoOp one reading part of the state
        maple = any(k.startswith("compound_prompts") for k in unknown)
        raise CheckpointError(
            f"unsupported prompt learner: unexpected tensors {', '.join(unknown[:6])}"
            f"{' …' if len(unknown) > 6 else ''}; "
            + ("this looks like a MaPLe multi-modal prompt checkpoint, which this scanner does not read yet; "
               if maple else "")
            + "this scanner reads CoOp, CoOp-CSC and CoCoOp learners"
        )

    learner = learner_from_config(backbone, classnames, {
        "learner_type": kind, "n_ctx": n_ctx, "csc": kind == "coop-csc", "class_token_position": position,
        "init": None, "meta_hidden": meta_hidden,
    })
    learner.init = config.get("init")
    for key, stored in (("token_prefix", prefix), ("token_suffix", suffix)):
        if stored is None:
            continue
        rebuilt = getattr(learner, key).to(stored.dtype).float()
        if not torch.allclose(stored.float(), rebuilt, atol=_ATOL, rtol=0.0):
            if key == "token_prefix":
                raise CheckpointError(
                    f"the stored token_prefix (start-of-text embedding) differs from backbone "
                    f"{backbone.name!r}'s: the checkpoint was tuned on another backbone; load it with that"
                )
            raise CheckpointError(
                f"the stored {key} does not match the class names given ({', '.join(classnames[:5])}"
                f"{', …' if n_cls > 5 else ''}): pass the class names in the order the model was tuned with, "
                "or omit them to decode them from the checkpoint"
            )
    with torch.no_grad():
        learner.ctx.copy_(ctx.float())
        if isinstance(learner, CoCoOpLearner):
            learner.meta_net.load_state_dict(
                {k.removeprefix("meta_net."): state[k].float() for k in meta_keys}, strict=True
            )
    return learner
