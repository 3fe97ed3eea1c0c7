"""Quarantine: move a flagged unit out of the watched tree, atomically, with a JSON audit record beside it.

Layout: ``<quarantine>/<entry-id>/<original name>`` (the file or whole model directory) and
``<quarantine>/<entry-id>/quarantine-record.json``. Nothing is ever deleted: release moves the payload back
and the record stays, with who released it, when and why.

The move is ``os.rename`` on the same filesystem (atomic). Across filesystems: copy, fsync, verify the
content hash of the copy, rename the copy into place, then remove the source. The record is written
first with status ``moving`` and rewritten ``quarantined`` after the move, so a crash in between is
finished (or marked ``aborted``) by :meth:`Quarantine.recover` at the next start.
"""

from __future__ import annotations

import datetime as dt
import errno
import getpass
import json
import os
import secrets
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scanner import __version__
from scanner.daemon.units import content_hash
from scanner.errors import ConfigError, ScannerError

RECORD_NAME = "quarantine-record.json"


class QuarantineError(ScannerError):
    """A quarantine operation could not be completed (the payload is left where it was)."""

    category = "quarantine"


@dataclass(frozen=True)
class QuarantineEntry:
    """One quarantined unit: its folder, its payload and its audit record."""

    entry_id: str
    folder: Path
    record: dict[str, Any]

    @property
    def payload(self) -> Path:
        return self.folder / str(self.record["payload"])

    @property
    def status(self) -> str:
        return str(self.record["status"])


class Quarantine:
    """A quarantine folder; the daemon and the CLI may use it at the same time (distinct entries)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def quarantine(
        self, unit: Path, sha256: str, verdict: str, report: dict[str, Any], reason: str
    ) -> QuarantineEntry:
        """Move ``unit`` (whose content hash must still be ``sha256``) into a new entry; returns the entry.

        Raises ``QuarantineError`` if the content changed since it was scanned (the caller rescans it) or
        the move fails; the unit then stays where it was. ``FileNotFoundError`` if the unit is gone before
        anything was recorded.
        """
        if not unit.exists():
            raise FileNotFoundError(unit)
        self.root.mkdir(parents=True, exist_ok=True)
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        entry_id = f"{stamp}-{sha256[:12]}-{secrets.token_hex(3)}"
        folder = self.root / entry_id
        folder.mkdir()
        record: dict[str, Any] = {
            "entry_id": entry_id,
            "status": "moving",
            "sha256": sha256,
            "verdict": verdict,
            "reason": reason,
            "original_path": str(unit),
            "payload": unit.name,
            "kind": "directory" if unit.is_dir() else "file",
            "quarantined_at": time.time(),
            "quarantined_at_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "host": socket.gethostname(),
            "scanner_version": __version__,
            "report": report,
            "history": [],
        }
        _write_json_atomic(folder / RECORD_NAME, record)
        try:
            found = content_hash(unit)
            if found != sha256:
                raise QuarantineError(
                    f"Not quarantining {unit}: its content hash is now {found[:12]}…, not the scanned "
                    f"{sha256[:12]}…. The new content will be scanned."
                )
            record["method"] = move_unit(unit, folder / unit.name, sha256)
        except (OSError, QuarantineError) as exc:
            record["status"] = "aborted"
            record["error"] = str(exc)
            _write_json_atomic(folder / RECORD_NAME, record)
            if isinstance(exc, QuarantineError):
                raise
            raise QuarantineError(
                f"Could not move {unit} into quarantine {folder} ({exc}). It is still in the watched tree; "
                "check permissions and free space of the quarantine folder."
            ) from exc
        record["status"] = "quarantined"
        _write_json_atomic(folder / RECORD_NAME, record)
        return QuarantineEntry(entry_id, folder, record)

    def entries(self) -> list[QuarantineEntry]:
        """Every entry (any status), oldest first."""
        if not self.root.is_dir():
            return []
        out = []
        for folder in sorted(self.root.iterdir()):
            rec = folder / RECORD_NAME
            if rec.is_file():
                out.append(QuarantineEntry(folder.name, folder, json.loads(rec.read_text())))
        return out

    def get(self, entry_id: str) -> QuarantineEntry:
        """The entry with this id (a unique prefix, or a full content hash, also works)."""
        entries = self.entries()
        exact = [e for e in entries if e.entry_id == entry_id]
        matches = exact or [
            e for e in entries if e.entry_id.startswith(entry_id) or e.record.get("sha256") == entry_id
        ]
        if len(matches) != 1:
            what = "No" if not matches else f"{len(matches)}"
            raise ConfigError(
                f"{what} quarantine entries match {entry_id!r} in {self.root}. Expected exactly one; "
                "see `scanner quarantine list` for the ids."
            )
        return matches[0]

    def release(
        self, entry_id: str, reason: str, by: str | None = None, to: Path | None = None
    ) -> QuarantineEntry:
        """Move the payload back to its original path (or ``to``) and record who, when and why.

        Refuses if the destination is occupied (never overwrites) or no reason is given.
        """
        if not reason.strip():
            raise ConfigError("Releasing from quarantine needs a reason: pass --reason 'why it is safe'.")
        entry = self.get(entry_id)
        if entry.status != "quarantined":
            raise ConfigError(
                f"Entry {entry.entry_id} is {entry.status}, not quarantined; nothing to release."
            )
        dest = to if to is not None else Path(entry.record["original_path"])
        if dest.exists() or dest.is_symlink():
            raise ConfigError(
                f"Cannot release {entry.entry_id} to {dest}: the path is occupied. Move that file away or "
                "pass --to PATH."
            )
        dest.parent.mkdir(parents=True, exist_ok=True)
        record = dict(entry.record)
        method = move_unit(entry.payload, dest, str(record["sha256"]))
        record["status"] = "released"
        record["history"] = [
            *record.get("history", []),
            {
                "action": "released",
                "at": time.time(),
                "at_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "by": by or _user(),
                "reason": reason.strip(),
                "to": str(dest),
                "method": method,
            },
        ]
        _write_json_atomic(entry.folder / RECORD_NAME, record)
        return QuarantineEntry(entry.entry_id, entry.folder, record)

    def recover(self) -> int:
        """Finish entries a crash left ``moving``: payload present -> quarantined, else aborted."""
        fixed = 0
        for entry in self.entries():
            if entry.status != "moving":
                continue
            record = dict(entry.record)
            record["status"] = "quarantined" if entry.payload.exists() else "aborted"
            record.setdefault("method", "rename")
            _write_json_atomic(entry.folder / RECORD_NAME, record)
            fixed += 1
        return fixed

    def quarantined_hashes(self) -> set[str]:
        return {str(e.record["sha256"]) for e in self.entries() if e.status == "quarantined"}


def move_unit(src: Path, dest: Path, sha256: str) -> str:
    """Move a file or directory to ``dest`` (must not exist); returns ``"rename"`` or ``"copy"``.

    Same filesystem: one ``os.rename``. Across filesystems: copy to a hidden name beside ``dest``, fsync,
    verify the copy's content hash equals ``sha256``, rename into place, fsync, then remove ``src``.
    """
    try:
        os.rename(src, dest)
        _fsync_dir(dest.parent)
        _fsync_dir(src.parent)
        return "rename"
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    incoming = dest.parent / f".incoming-{secrets.token_hex(4)}-{dest.name}"
    if src.is_dir():
        shutil.copytree(src, incoming, copy_function=_copy_and_fsync)
        for dirpath, _dirs, _files in os.walk(incoming):
            _fsync_dir(Path(dirpath))
    else:
        _copy_and_fsync(str(src), str(incoming))
    found = content_hash(incoming)
    if found != sha256:
        # the copy is not the scanned model (source changed or bad copy): keep the source, drop the copy
        if incoming.is_dir():
            shutil.rmtree(incoming)
        else:
            incoming.unlink()
        raise QuarantineError(
            f"The copy of {src} has hash {found[:12]}…, expected {sha256[:12]}…; "
            "the source was left in place."
        )
    os.rename(incoming, dest)
    _fsync_dir(dest.parent)
    if src.is_dir():
        shutil.rmtree(src)
    else:
        src.unlink()
    _fsync_dir(src.parent)
    return "copy"


def _copy_and_fsync(src: str, dst: str) -> str:
    shutil.copy2(src, dst)
    with open(dst, "rb") as f:
        os.fsync(f.fileno())
    return dst


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(3)}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid:{os.getuid()}"
