"""The user's labelled images for a repair: an image folder with one sub-folder per class name.

    DATA/
      circle/   img001.png img002.jpg ...
      square/   ...

Sub-folder names are matched to the model's class names after CoOp's normalisation ("golden_retriever"
= "golden retriever") and case folding. Every class of the model needs a folder and every folder must
name a class: a mismatch is an error that lists both sides, never a silent partial repair.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from scanner.errors import DatasetError
from scanner.prompting.learners import clean_classname
from scanner.zoo.ood import IMAGE_SUFFIXES, read_images


@dataclass
class LabelledImages:
    images: torch.Tensor  # (N, 3, S, S) float in [0, 1]
    labels: torch.Tensor  # (N,) class indices into the model's class names
    files: list[Path]  # the image files used, in order
    sha256: str  # content hash of the data used: relative path + file hash per image, sorted
    skipped: list[Path]  # unreadable files (not used)

    def counts(self, n_cls: int) -> list[int]:
        return [int(c) for c in torch.bincount(self.labels, minlength=n_cls)]


def _key(name: str) -> str:
    return " ".join(clean_classname(name).lower().split())


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _hash(root: Path, files: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.relative_to(root).as_posix()}\0{hashlib.sha256(p.read_bytes()).hexdigest()}\n".encode())
    return h.hexdigest()


def load_image_folder(folder: Path, classnames: Sequence[str], size: int, *, shots: int | None = None,
                      min_per_class: int = 2) -> LabelledImages:
    """Labelled images of ``folder`` for a model with ``classnames``, resized to ``size``; at most
    ``shots`` per class (the first by path). DatasetError when the folder does not fit the model."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"data folder {folder} does not exist or is not a directory; pass --data DIR with one "
                           "sub-folder of images per class name")
    if shots is not None and shots < 1:
        raise DatasetError(f"--shots must be >= 1; got {shots}")
    wanted = {_key(c): i for i, c in enumerate(classnames)}
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [d.name for d in subdirs if _key(d.name) not in wanted]
    found = {_key(d.name) for d in subdirs}
    missing = [c for c in classnames if _key(c) not in found]
    if unknown or missing:
        parts = []
        if unknown:
            parts.append(f"folders that name no class of the model: {', '.join(map(repr, unknown[:8]))}"
                         f"{' …' if len(unknown) > 8 else ''}")
        if missing:
            parts.append(f"classes without a folder: {', '.join(map(repr, missing[:8]))}"
                         f"{' …' if len(missing) > 8 else ''}")
        raise DatasetError(
            f"the class folders in {folder} do not match the model's {len(classnames)} classes ("
            + "; ".join(parts)
            + f"). Expected one sub-folder per class: {', '.join(map(repr, list(classnames)[:12]))}"
            + (" …" if len(classnames) > 12 else "")
        )
    used: list[Path] = []
    chunks: list[torch.Tensor] = []
    labels: list[int] = []
    bad: list[Path] = []
    for d in subdirs:
        files = _files(d)
        pixels, unreadable = read_images(files, size)  # unreadable files are skipped, not counted as shots
        readable = [p for p in files if p not in set(unreadable)]
        keep = len(readable) if shots is None else min(shots, len(readable))
        used += readable[:keep]
        chunks.append(pixels[:keep])
        labels += [wanted[_key(d.name)]] * keep
        bad += unreadable
    images = torch.cat(chunks) if chunks else torch.zeros(0, 3, size, size)
    y = torch.tensor(labels, dtype=torch.long)
    counts = torch.bincount(y, minlength=len(classnames)) if len(y) else torch.zeros(len(classnames), dtype=torch.long)
    short = [(classnames[k], int(counts[k])) for k in range(len(classnames)) if counts[k] < min_per_class]
    if short:
        listed = ", ".join(f"{n!r} ({c})" for n, c in short[:6]) + (" …" if len(short) > 6 else "")
        raise DatasetError(
            f"too few readable images in {folder}: every class needs at least {min_per_class} (few-shot is "
            f"enough, 16 per class is typical); these have fewer: {listed}"
            + (f"; {len(bad)} file(s) could not be read, e.g. {bad[0].name}" if bad else "")
        )
    return LabelledImages(images=images, labels=y, files=used, sha256=_hash(folder, used), skipped=list(bad))
