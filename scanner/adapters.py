"""The adapter contract: how a model format becomes a :class:`LoadedModel` the detector can scan.

An adapter recognises a *model unit* (one checkpoint file, or a model directory) and loads it safely
(safetensors, or ``torch.load(weights_only=True)`` behind the allow-list) onto a backbone from the
:class:`~scanner.backbones.BackboneStore`. Nothing here is format-specific: the first-party adapters
(``coop``, ``safetensors``) live in the ``plugins/`` distributions and arrive through the same
``register_adapters`` hook as third-party ones. Importing this module does not import torch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

from scanner.errors import BackboneError, CheckpointError

if TYPE_CHECKING:
    from scanner.backbones import BackboneStore
    from scanner.clip.backbone import ClipBackbone
    from scanner.prompting.classifier import PromptedCLIP

T = TypeVar("T")

_CHUNK = 1 << 20
DEFAULT_MAX_FILE_BYTES = 1 << 30


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def unit_files(path: Path) -> list[Path]:
    """The regular files that make up a model unit, sorted (hidden files and symlinks excluded)."""
    if path.is_file():
        return [path]
    out = []
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path)
        if any(part.startswith(".") for part in rel.parts) or p.is_symlink() or not p.is_file():
            continue
        out.append(p)
    return out


def model_sha256(path: Path) -> str:
    """Content hash of a model unit: the file's sha256, or for a directory the sha256 of its manifest
    (one ``<relative path>\\0<file sha256>\\n`` line per file, sorted) so renaming the folder keeps it."""
    if path.is_file():
        return _file_sha256(path)
    manifest = hashlib.sha256()
    for p in unit_files(path):
        manifest.update(f"{p.relative_to(path).as_posix()}\0{_file_sha256(p)}\n".encode())
    return manifest.hexdigest()


@dataclass
class LoadContext:
    """What an adapter may use while loading: the backbone store, the limits and the device."""

    backbones: BackboneStore
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES  # files above this are refused (CheckpointError)
    device: str = "cpu"
    _hashes: dict[Path, str] = field(default_factory=dict, repr=False)

    def sha256(self, path: Path) -> str:
        """:func:`model_sha256` of ``path``, computed once per context (the pipeline hashes first)."""
        key = path.resolve()
        if key not in self._hashes:
            self._hashes[key] = model_sha256(path)
        return self._hashes[key]

    def fit_backbone(self, name: str | None, content_hash: str | None,
                     build: Callable[[ClipBackbone], T]) -> tuple[ClipBackbone, T]:
        """Find the backbone a checkpoint belongs to and ``build`` the model on it.

        When the checkpoint's metadata names a backbone (``name``/``content_hash``) only that one is
        used (:meth:`BackboneStore.resolve` raises :class:`BackboneError` naming it when missing) and
        ``build``'s error propagates. Without metadata (real CoOp/Dassl files) every declared backbone
        is tried, then the bundled one; ``build`` rejects a wrong one with :class:`CheckpointError`
        (shape mismatch, token rows not in its vocabulary table), and when none fits the error lists
        each backbone tried and why.
        """
        if name or content_hash:
            backbone = self.backbones.resolve(name, content_hash)
            return backbone, build(backbone)
        entries = sorted(self.backbones.entries, key=lambda e: e.format == "bundled")  # declared first
        tried: list[str] = []
        for entry in entries:
            try:
                backbone = self.backbones.get(entry.name)
                return backbone, build(backbone)
            except (BackboneError, CheckpointError) as exc:
                tried.append(f"{entry.name}: {exc}")
        raise BackboneError(
            "the checkpoint names no backbone and none of the available ones fits it ("
            + " | ".join(tried)
            + "); declare the backbone it was tuned on (`backbones` settings or --backbone NAME=PATH)"
        )


@dataclass
class LoadedModel:
    """A model ready for the detector, plus the provenance a report needs."""

    model: PromptedCLIP  # frozen backbone + prompt learner; forward(pixels (B,3,S,S) in [0,1]) -> logits
    classnames: list[str]
    adapter: str  # name of the adapter that loaded it
    path: Path  # the model unit (file or directory) as discovered
    sha256: str  # model_sha256(path)
    backbone_name: str
    backbone_sha256: str  # ClipBackbone.content_hash()
    # format-specific facts worth reporting: checkpoint file, epoch, learner type, where names came from
    meta: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Adapter(Protocol):
    """A model format. Register instances through the ``register_adapters`` hook."""

    #: unique, lower-case name shown in reports (``coop``, ``safetensors``)
    name: str

    def claims(self, path: Path) -> bool:
        """Whether ``path`` (a file or a directory) is a model unit of this format.

        Must be cheap and side-effect free: decide from layout, suffix or a few magic bytes; never
        unpickle or load tensors. A claimed path that then fails to load is reported as ``error``
        (or ``unsafe``), so claim corrupt files of your format too.
        """
        ...

    def load(self, path: Path, ctx: LoadContext) -> LoadedModel:
        """Load ``path`` safely. Raise :class:`~scanner.errors.UnsafeFileError` (never executed),
        :class:`~scanner.errors.CheckpointError` or :class:`~scanner.errors.BackboneError`."""
        ...
