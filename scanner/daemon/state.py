"""The daemon's state: one SQLite file in WAL mode, keyed by model content hash.

Crash safety rests on three states per model hash and on committing each transition before acting:

``pending`` --claim--> ``scanning`` --finish--> ``done``   (``vanished``: every copy disappeared mid-scan)

A SIGKILL during a scan leaves ``scanning``; :meth:`StateStore.recover_interrupted` turns it back into
``pending`` at the next start, and the scan runs again (its result was never recorded, so nothing is
recorded twice). A ``done`` hash is never scanned again; a path whose content changes gets a new hash.
The ``scans`` table is the audit log of recorded scans (one row per completed scan).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scanner.daemon.units import Signature
from scanner.errors import ConfigError
from scanner.report import ModelReport, Verdict

#: bump when the tables change; a file from a newer version is refused, never silently rewritten
STATE_SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS models (
    sha256      TEXT PRIMARY KEY,
    status      TEXT NOT NULL CHECK (status IN ('pending', 'scanning', 'done', 'vanished')),
    verdict     TEXT,
    report_json TEXT,
    attempts    INTEGER NOT NULL DEFAULT 0,
    first_seen  REAL NOT NULL,
    started_at  REAL,
    scanned_at  REAL
);
CREATE TABLE IF NOT EXISTS paths (
    path        TEXT PRIMARY KEY,
    sha256      TEXT NOT NULL,
    signature   TEXT NOT NULL,
    seen_at     REAL NOT NULL,
    present     INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS paths_by_sha ON paths (sha256);
CREATE TABLE IF NOT EXISTS scans (
    id          INTEGER PRIMARY KEY,
    sha256      TEXT NOT NULL,
    path        TEXT NOT NULL,
    verdict     TEXT NOT NULL,
    started_at  REAL NOT NULL,
    finished_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS scans_by_sha ON scans (sha256);
CREATE TABLE IF NOT EXISTS accepted_risk (
    sha256      TEXT PRIMARY KEY,
    accepted_by TEXT NOT NULL,
    reason      TEXT NOT NULL,
    created_at  REAL NOT NULL,
    expires_at  REAL
);
"""


@dataclass(frozen=True)
class ModelRecord:
    """One row of ``models``."""

    sha256: str
    status: str
    verdict: Verdict | None
    report: dict[str, Any] | None
    attempts: int
    first_seen: float
    scanned_at: float | None


@dataclass(frozen=True)
class PathRecord:
    """The last content hash seen at a path and the signature it had then (reconcile skips rehashing)."""

    path: str
    sha256: str
    signature: Signature
    present: bool


class StateStore:
    """Thread-safe access to the state file (one connection behind a lock; writes are short transactions)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.RLock()
        try:
            self._conn = sqlite3.connect(
                str(path), check_same_thread=False, isolation_level=None, timeout=10.0
            )
            self._conn.row_factory = sqlite3.Row
            self._conn.execute("PRAGMA journal_mode=WAL")
            # FULL: a recorded verdict survives power loss, not only a process crash; scans dwarf the fsync
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA busy_timeout=10000")
            self._check_and_create_schema()
        except sqlite3.DatabaseError as exc:
            raise ConfigError(
                f"State file {path} is not a readable scanner state database ({exc}). Point --state at a new "
                "file, or restore the right one."
            ) from exc

    def _check_and_create_schema(self) -> None:
        with self.transaction() as c:
            has_table = c.execute(
                "SELECT 1 FROM sqlite_master WHERE type='table' AND name='schema_version'"
            ).fetchone()
            if has_table:
                row = c.execute("SELECT MAX(version) FROM schema_version").fetchone()
                found = row[0] if row and row[0] is not None else 0
                if found > STATE_SCHEMA_VERSION:
                    raise ConfigError(
                        f"State file {self.path} has schema version {found}, written by a newer scanner; "
                        f"this scanner reads up to version {STATE_SCHEMA_VERSION}. Upgrade scanner, or "
                        "point --state at another file."
                    )
            c.executescript_compat(_SCHEMA)
            if not c.execute("SELECT 1 FROM schema_version").fetchone():
                c.execute("INSERT INTO schema_version (version) VALUES (?)", (STATE_SCHEMA_VERSION,))

    @contextlib.contextmanager
    def transaction(self) -> Iterator[_Tx]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` under the store lock (rolled back on error)."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield _Tx(self._conn)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return list(self._conn.execute(sql, params).fetchall())

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # -- crash recovery -------------------------------------------------------------------------------
    def recover_interrupted(self) -> int:
        """Turn ``scanning`` rows (their process died mid-scan) back into ``pending``; returns how many."""
        with self.transaction() as c:
            return c.execute("UPDATE models SET status='pending' WHERE status='scanning'").rowcount

    # -- paths ----------------------------------------------------------------------------------------
    def path_record(self, path: Path) -> PathRecord | None:
        rows = self.query("SELECT * FROM paths WHERE path=?", (str(path),))
        if not rows:
            return None
        r = rows[0]
        sig = tuple(tuple(e) for e in json.loads(r["signature"]))
        return PathRecord(r["path"], r["sha256"], sig, bool(r["present"]))

    def record_path(self, path: Path, sha256: str, sig: Signature) -> ModelRecord:
        """Remember ``path`` holds ``sha256``; make sure the hash has a model row (``pending`` if new)."""
        now = time.time()
        with self.transaction() as c:
            c.execute(
                "INSERT INTO paths (path, sha256, signature, seen_at, present) VALUES (?, ?, ?, ?, 1) "
                "ON CONFLICT(path) DO UPDATE SET sha256=excluded.sha256, signature=excluded.signature, "
                "seen_at=excluded.seen_at, present=1",
                (str(path), sha256, json.dumps(sig), now),
            )
            c.execute(
                "INSERT INTO models (sha256, status, first_seen) VALUES (?, 'pending', ?) "
                "ON CONFLICT(sha256) DO UPDATE SET status='pending' WHERE status='vanished'",
                (sha256, now),
            )
        record = self.model(sha256)
        assert record is not None
        return record

    def mark_path_gone(self, path: Path) -> None:
        with self.transaction() as c:
            c.execute("UPDATE paths SET present=0 WHERE path=?", (str(path),))

    def present_paths(self, sha256: str) -> list[Path]:
        return [
            Path(r[0]) for r in self.query("SELECT path FROM paths WHERE sha256=? AND present=1", (sha256,))
        ]

    def pending_paths(self) -> list[Path]:
        """Present paths whose model still needs a scan (resumed first after a restart)."""
        rows = self.query(
            "SELECT p.path FROM paths p JOIN models m ON m.sha256 = p.sha256 "
            "WHERE p.present=1 AND m.status IN ('pending', 'scanning') ORDER BY p.seen_at"
        )
        return [Path(r[0]) for r in rows]

    # -- models ---------------------------------------------------------------------------------------
    def model(self, sha256: str) -> ModelRecord | None:
        rows = self.query("SELECT * FROM models WHERE sha256=?", (sha256,))
        if not rows:
            return None
        r = rows[0]
        return ModelRecord(
            sha256=r["sha256"],
            status=r["status"],
            verdict=Verdict(r["verdict"]) if r["verdict"] else None,
            report=json.loads(r["report_json"]) if r["report_json"] else None,
            attempts=r["attempts"],
            first_seen=r["first_seen"],
            scanned_at=r["scanned_at"],
        )

    def claim(self, sha256: str) -> int | None:
        """``pending`` -> ``scanning`` and count the attempt; ``None`` if the hash is not pending."""
        with self.transaction() as c:
            cur = c.execute(
                "UPDATE models SET status='scanning', attempts=attempts+1, started_at=? "
                "WHERE sha256=? AND status='pending'",
                (time.time(), sha256),
            )
            if cur.rowcount != 1:
                return None
            row = c.execute("SELECT attempts FROM models WHERE sha256=?", (sha256,)).fetchone()
            return int(row[0])

    def unclaim(self, sha256: str, status: str = "pending") -> None:
        """Give a claimed hash back (requeue on shutdown, content changed mid-scan, or ``vanished``)."""
        with self.transaction() as c:
            c.execute("UPDATE models SET status=? WHERE sha256=? AND status='scanning'", (status, sha256))

    def finish(self, sha256: str, path: Path, report: ModelReport, started_at: float) -> None:
        """Record the verdict and the report, and log the scan, in one transaction."""
        now = time.time()
        with self.transaction() as c:
            c.execute(
                "UPDATE models SET status='done', verdict=?, report_json=?, scanned_at=? WHERE sha256=?",
                (report.verdict.value, json.dumps(report.to_dict()), now, sha256),
            )
            c.execute(
                "INSERT INTO scans (sha256, path, verdict, started_at, finished_at) VALUES (?, ?, ?, ?, ?)",
                (sha256, str(path), report.verdict.value, started_at, now),
            )

    def status_counts(self) -> dict[str, int]:
        return {r[0]: r[1] for r in self.query("SELECT status, COUNT(*) FROM models GROUP BY status")}

    def scan_counts(self) -> dict[str, int]:
        """Recorded scans per hash (the soak benchmark asserts every value is 1)."""
        return {r[0]: r[1] for r in self.query("SELECT sha256, COUNT(*) FROM scans GROUP BY sha256")}


class _Tx:
    """The connection inside a transaction (``executescript`` would COMMIT implicitly: split it)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        return self._conn.execute(sql, params)

    def executescript_compat(self, script: str) -> None:
        for statement in script.split(";"):
            if statement.strip():
                self._conn.execute(statement)
