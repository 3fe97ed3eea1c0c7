"""The long-running registry scanner: watch folders, scan each model once, quarantine what is flagged.

Modules, one job each:

- ``config``       — ``DaemonConfig`` (frozen) and its start-up validation;
- ``units``        — which paths are model units, their content hash and their settle signature;
- ``state``        — the SQLite store (WAL) keyed by content hash; crash-safe pending/scanning/done states;
- ``accepted_risk``— reviewed models let through (who, why, expiry), kept in the state DB;
- ``quarantine``   — atomic move out of the watched tree with a JSON audit record; list/show/release;
- ``metrics``      — Prometheus metrics on an injected ``CollectorRegistry``;
- ``watcher``      — watchdog observer + settle step;
- ``reconcile``    — the full-tree pass at start-up and periodically;
- ``worker``       — the bounded queue and worker threads running the injected scan function;
- ``webhook``      — the HMAC-signed registry hook over ``http.server``;
- ``service``      — wires them together and handles SIGTERM/SIGINT.
"""

from __future__ import annotations

from scanner.daemon.config import DaemonConfig
from scanner.daemon.service import ScanFn, Service

__all__ = ["DaemonConfig", "ScanFn", "Service"]
