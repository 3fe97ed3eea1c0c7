"""Model units in a registry tree, their content hash and their settle signature.

A *unit* is what gets one verdict and moves to quarantine as a whole:

- a directory holding ``prompt_learner/`` (the CoOp/Dassl layout: ``prompt_learner/model.pth.tar-N``,
  ``model-best.pth.tar``, ``*.ckpt``) — the whole directory;
- otherwise a loose checkpoint file: ``*.safetensors``, ``*.pth.tar``, ``*.ckpt``, ``*.pt``, ``*.pth``.

Temporary upload names (``*.tmp``, ``*.part``, ``.~*``, any hidden component) are never units: producers
write those, then rename to the final name, and only the final name is scanned.

Discovery here is structural (no plugin is loaded): it must also map a single event path to its unit,
which ``scanner.pipeline.discover_models`` (adapter-driven, whole trees) does not do.
"""

from __future__ import annotations

import os
from pathlib import Path

from scanner.adapters import model_sha256, unit_files

#: CoOp/Dassl layout marker: a directory holding this sub-directory is one model unit
MODEL_DIR_MARKER = "prompt_learner"
MODEL_SUFFIXES = (".safetensors", ".pth.tar", ".ckpt", ".pt", ".pth")
TEMP_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".swp", ".lock")

#: the settle signature: per file (relative path, size, mtime_ns); a file unit has one entry with rel ""
Signature = tuple[tuple[str, int, int], ...]


def is_temp_name(name: str) -> bool:
    """True for names producers use while writing (``x.safetensors.part``, ``.~lock``, ``.hidden``)."""
    return name.startswith(".") or name.endswith("~") or name.lower().endswith(TEMP_SUFFIXES)


def has_model_suffix(name: str) -> bool:
    low = name.lower()
    return low.endswith(MODEL_SUFFIXES) or ".pth.tar-" in low


def is_model_dir(path: Path) -> bool:
    return (path / MODEL_DIR_MARKER).is_dir()


def unit_for_path(path: Path, root: Path) -> Path | None:
    """The unit an event path belongs to (``path`` under ``root``), or ``None`` if it is not part of one.

    A path inside a model directory maps to that directory (the nearest ancestor holding
    ``prompt_learner/``); a loose checkpoint file maps to itself. Temp/hidden names map to ``None``.
    """
    try:
        rel = path.relative_to(root)
    except ValueError:
        return None
    if any(is_temp_name(part) for part in rel.parts):
        return None
    # nearest enclosing model directory wins: a checkpoint inside prompt_learner/ belongs to its model dir
    candidate = path
    while True:
        if candidate != root and is_model_dir(candidate):
            return candidate
        if candidate == root:
            break
        candidate = candidate.parent
    if has_model_suffix(path.name) and not path.is_dir():
        return path
    return None


def discover_units(root: Path) -> list[Path]:
    """Every unit under ``root``, sorted; model directories are not descended into further."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not is_temp_name(d))
        if here != root and MODEL_DIR_MARKER in dirnames:
            found.append(here)
            dirnames[:] = []  # the directory is one unit
            continue
        found.extend(here / f for f in sorted(filenames) if not is_temp_name(f) and has_model_suffix(f))
    return sorted(found)


def signature(unit: Path) -> Signature:
    """Size and mtime of the unit's files; equal signatures some time apart mean the upload has settled.

    The files are the ones the content hash covers (``scanner.adapters.unit_files``). Raises
    ``FileNotFoundError`` if the unit vanished.
    """
    if unit.is_dir():
        entries = []
        for p in unit_files(unit):
            st = p.stat()
            entries.append((p.relative_to(unit).as_posix(), st.st_size, st.st_mtime_ns))
        return tuple(entries)
    st = unit.stat()
    return (("", st.st_size, st.st_mtime_ns),)


def content_hash(unit: Path) -> str:
    """The model's content hash, the same as reports carry (``scanner.adapters.model_sha256``): a file's
    SHA-256, or a directory's manifest hash (renaming the directory keeps it; editing a file changes it).

    Raises ``FileNotFoundError`` if the unit does not exist (rather than hashing an empty manifest).
    """
    if not unit.exists():
        raise FileNotFoundError(unit)
    return model_sha256(unit)
