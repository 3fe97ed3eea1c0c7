"""Accepted risk: a reviewed model (by content hash) whose verdict is recorded but which is not quarantined.

Keyed by content hash, never by path: a different file at the same path is a different model. Every entry
says who accepted it, why, and optionally until when; an expired entry no longer applies (the next
reconcile quarantines the model).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from scanner.daemon.state import StateStore
from scanner.errors import ConfigError

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class AcceptedRisk:
    sha256: str
    accepted_by: str
    reason: str
    created_at: float
    expires_at: float | None  # epoch seconds; None: until revoked

    def active(self, now: float | None = None) -> bool:
        return self.expires_at is None or self.expires_at > (time.time() if now is None else now)


def check_sha256(value: str) -> str:
    """Lower-case hex SHA-256 or ``ConfigError``."""
    v = value.strip().lower()
    if not _SHA256.match(v):
        raise ConfigError(
            f"{value!r} is not a SHA-256 content hash. Expected 64 hex characters, as printed by "
            "`scanner quarantine list` or in a report's `sha256` field."
        )
    return v


class AcceptedRiskList:
    """The ``accepted_risk`` table of a :class:`StateStore`."""

    def __init__(self, store: StateStore) -> None:
        self._store = store

    def accept(
        self, sha256: str, accepted_by: str, reason: str, expires_at: float | None = None
    ) -> AcceptedRisk:
        """Add or replace the entry for ``sha256``; a reason is mandatory (it is the audit trail)."""
        sha256 = check_sha256(sha256)
        if not reason.strip():
            raise ConfigError(
                "Accepting a risk needs a reason: pass --reason 'why this model is acceptable'."
            )
        if not accepted_by.strip():
            raise ConfigError("Accepting a risk needs a name: pass --by NAME.")
        entry = AcceptedRisk(sha256, accepted_by.strip(), reason.strip(), time.time(), expires_at)
        with self._store.transaction() as c:
            c.execute(
                "INSERT OR REPLACE INTO accepted_risk (sha256, accepted_by, reason, created_at, expires_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (entry.sha256, entry.accepted_by, entry.reason, entry.created_at, entry.expires_at),
            )
        return entry

    def revoke(self, sha256: str) -> bool:
        with self._store.transaction() as c:
            return (
                c.execute("DELETE FROM accepted_risk WHERE sha256=?", (check_sha256(sha256),)).rowcount == 1
            )

    def get(self, sha256: str) -> AcceptedRisk | None:
        rows = self._store.query("SELECT * FROM accepted_risk WHERE sha256=?", (sha256,))
        return _row(rows[0]) if rows else None

    def is_accepted(self, sha256: str, now: float | None = None) -> bool:
        entry = self.get(sha256)
        return entry is not None and entry.active(now)

    def entries(self) -> list[AcceptedRisk]:
        return [_row(r) for r in self._store.query("SELECT * FROM accepted_risk ORDER BY created_at")]


def _row(r: object) -> AcceptedRisk:
    return AcceptedRisk(r["sha256"], r["accepted_by"], r["reason"], r["created_at"], r["expires_at"])  # type: ignore[index]
