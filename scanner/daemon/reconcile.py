"""The reconcile pass: walk the watched trees and make the state agree with what is on disk.

Run at start-up (uploads made while the daemon was down, scans a crash interrupted) and periodically
(events lost to inotify overflow or to a full queue). A unit whose signature matches the one recorded
with a finished hash costs one ``stat`` and one query; anything else goes through the settle step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from scanner.daemon.accepted_risk import AcceptedRiskList
from scanner.daemon.metrics import DaemonMetrics
from scanner.daemon.state import StateStore
from scanner.daemon.units import discover_units, signature

log = logging.getLogger(__name__)


@dataclass
class ReconcileResult:
    units: int = 0  # units on disk
    unchanged: int = 0  # already scanned, nothing to do
    to_settle: int = 0  # new, changed or unfinished: handed to the settle step
    found_unseen: int = 0  # of those, ones no event had delivered (lost event or downtime)
    to_quarantine: int = 0  # scanned flagged copies still in the tree (crash before the move, expired risk)
    gone: int = 0  # recorded paths no longer on disk


class Reconciler:
    """One object per service; :meth:`run` is called from the reconcile thread only."""

    def __init__(
        self,
        roots: Sequence[Path],
        store: StateStore,
        accepted: AcceptedRiskList,
        metrics: DaemonMetrics,
        *,
        touch: Callable[[Path], None],
        is_tracked: Callable[[Path], bool],
        submit: Callable[[Path], bool],
    ) -> None:
        self._roots = tuple(roots)
        self._store = store
        self._accepted = accepted
        self._metrics = metrics
        self._touch = touch  # into the settler
        self._is_tracked = is_tracked  # already settling or queued
        self._submit = submit  # straight into the work queue (signature already verified)

    def run(self) -> ReconcileResult:
        result = ReconcileResult()
        on_disk: set[str] = set()
        for root in self._roots:
            for unit in discover_units(root):
                on_disk.add(str(unit))
                result.units += 1
                self._one(unit, result)
        for row in self._store.query("SELECT path FROM paths WHERE present=1"):
            if row[0] not in on_disk and not Path(row[0]).exists():
                self._store.mark_path_gone(Path(row[0]))
                result.gone += 1
        self._metrics.reconcile_runs.inc()
        self._metrics.reconcile_found.inc(result.found_unseen)
        log.info("reconcile: %s", result)
        return result

    def _one(self, unit: Path, result: ReconcileResult) -> None:
        try:
            sig = signature(unit)
        except FileNotFoundError:
            return
        record = self._store.path_record(unit)
        if record is not None and record.signature == sig:
            model = self._store.model(record.sha256)
            if model is not None and model.status == "done":
                if (
                    model.verdict is not None
                    and model.verdict.flagged
                    and not self._accepted.is_accepted(model.sha256)
                ):
                    result.to_quarantine += 1
                    self._submit(unit)
                else:
                    result.unchanged += 1
                return
        if self._is_tracked(unit):
            return
        result.to_settle += 1
        if record is None or record.signature != sig:
            result.found_unseen += 1
        self._touch(unit)
