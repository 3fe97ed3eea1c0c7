"""The bounded work queue and the per-unit processing the worker threads run.

Processing one settled unit (every state change is committed before the next step, see ``state``):

1. hash it (signature before and after must agree, else it is still changing: back to settling);
2. record path -> hash; a hash already ``done`` is not scanned again (duplicates, re-events, restarts);
3. claim the hash (``pending`` -> ``scanning``, attempts + 1), run the injected scan function;
4. if the unit vanished or changed during the scan, give the claim back instead of recording a verdict;
5. record verdict + report, then quarantine every present copy of a flagged hash (unless accepted).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path

from scanner.daemon.accepted_risk import AcceptedRiskList
from scanner.daemon.metrics import ACCEL_ENCODERS, DaemonMetrics
from scanner.daemon.quarantine import Quarantine, QuarantineError
from scanner.daemon.state import ModelRecord, StateStore
from scanner.daemon.units import content_hash, signature
from scanner.errors import ScannerError
from scanner.report import ModelReport, ScanReport, Verdict

log = logging.getLogger(__name__)

#: the daemon's view of the scan: a path in, a report out (``Service`` binds the settings)
UnitScanFn = Callable[[Path], ScanReport]

# worst first: the verdict a unit gets when the scan function reports several models inside it
_SEVERITY = (Verdict.BACKDOORED, Verdict.UNSAFE, Verdict.ERROR, Verdict.SKIPPED, Verdict.CLEAN)


class WorkQueue:
    """Bounded FIFO of units with de-duplication (a unit queued twice is scanned from one entry)."""

    def __init__(self, maxsize: int) -> None:
        self._q: queue.Queue[Path] = queue.Queue(maxsize=maxsize)
        self._members: set[Path] = set()
        self._lock = threading.Lock()

    def submit(self, unit: Path) -> bool:
        """Queue ``unit``; ``False`` if the queue is full (the caller counts an overflow)."""
        with self._lock:
            if unit in self._members:
                return True
            try:
                self._q.put_nowait(unit)
            except queue.Full:
                return False
            self._members.add(unit)
            return True

    def get(self, timeout: float) -> Path | None:
        try:
            unit = self._q.get(timeout=timeout)
        except queue.Empty:
            return None
        with self._lock:
            self._members.discard(unit)
        return unit

    def __contains__(self, unit: Path) -> bool:
        with self._lock:
            return unit in self._members

    def __len__(self) -> int:
        return self._q.qsize()


class Processor:
    """What a worker does with one unit. Thread-safe: state lives in the store, claims are transactional."""

    def __init__(
        self,
        store: StateStore,
        quarantine: Quarantine,
        accepted: AcceptedRiskList,
        metrics: DaemonMetrics,
        scan_fn: UnitScanFn,
        *,
        max_attempts: int,
        resettle: Callable[[Path], None],
    ) -> None:
        self._store = store
        self._quarantine = quarantine
        self._accepted = accepted
        self._metrics = metrics
        self._scan_fn = scan_fn
        self._max_attempts = max_attempts
        self._resettle = resettle
        self._lock = threading.Lock()
        self._enforce_lock = threading.Lock()
        self.in_flight: dict[int, str] = {}  # thread id -> hash being scanned (requeued on shutdown)

    def process(self, unit: Path) -> str:
        """Handle one unit; returns what happened (for logs and tests). Never raises for a bad unit."""
        t0 = time.perf_counter()
        try:
            sig = signature(unit)
            sha = content_hash(unit)
            if signature(unit) != sig:
                self._resettle(unit)
                return "changing"
        except FileNotFoundError:
            self._store.mark_path_gone(unit)
            return "vanished-before-scan"
        self._metrics.scan_duration.labels(stage="hash").observe(time.perf_counter() - t0)
        model = self._store.record_path(unit, sha, sig)
        if model.status == "done":
            self._enforce(model)
            return "already-scanned"
        attempts = self._store.claim(sha)
        if attempts is None:
            # another worker holds it (a copy uploaded at the same time); its enforcement covers this path
            current = self._store.model(sha)
            if current is not None and current.status == "done":
                self._enforce(current)
            return "claimed-elsewhere"
        return self._scan_claimed(unit, sha, sig, attempts)

    def _scan_claimed(self, unit: Path, sha: str, sig: tuple, attempts: int) -> str:
        started = time.time()
        if attempts > self._max_attempts:
            report = ModelReport(
                path=str(unit),
                verdict=Verdict.ERROR,
                sha256=sha,
                category="interrupted",
                message=(
                    f"The scan of this model was interrupted {attempts - 1} times (the daemon died while "
                    "scanning it). Recorded as an error instead of retrying; scan it by hand with "
                    "`scanner scan-once` to see why."
                ),
            )
            self._store.finish(sha, unit, report, started)
            self._count(report)
            return "gave-up"
        ident = threading.get_ident()
        with self._lock:
            self.in_flight[ident] = sha
        self._metrics.in_flight.inc()
        t0 = time.perf_counter()
        try:
            report = self._run_scan(unit, sha)
        finally:
            self._metrics.in_flight.dec()
            with self._lock:
                self.in_flight.pop(ident, None)
        self._metrics.scan_duration.labels(stage="scan").observe(time.perf_counter() - t0)
        try:
            unchanged = signature(unit) == sig
        except FileNotFoundError:
            self._store.mark_path_gone(unit)
            others = [p for p in self._store.present_paths(sha) if p.exists()]
            self._store.unclaim(sha, "pending" if others else "vanished")
            for other in others:
                self._resettle(other)
            self._metrics.errors.labels(category="vanished").inc()
            log.warning("%s vanished during its scan; recorded, not scanned", unit)
            return "vanished-during-scan"
        if not unchanged:
            # the report may describe a half-old, half-new file: do not record it; scan the new content
            self._store.unclaim(sha, "pending")
            self._resettle(unit)
            return "changed-during-scan"
        self._store.finish(sha, unit, report, started)
        self._count(report)
        record = self._store.model(sha)
        assert record is not None
        self._enforce(record)
        return f"scanned:{report.verdict.value}"

    def _run_scan(self, unit: Path, sha: str) -> ModelReport:
        try:
            scan = self._scan_fn(unit)
            report = _unit_report(scan, unit)
        except ScannerError as exc:
            report = ModelReport(
                path=str(unit), verdict=Verdict.ERROR, category=exc.category, message=str(exc)
            )
        except Exception as exc:  # a scan-function bug must cost one verdict, never the daemon
            log.exception("scan of %s failed", unit)
            report = ModelReport(
                path=str(unit),
                verdict=Verdict.ERROR,
                category="internal",
                message=f"{type(exc).__name__}: {exc}",
            )
        if report.sha256 is None:
            report.sha256 = sha
        return report

    def _count(self, report: ModelReport) -> None:
        self._metrics.scans.labels(verdict=report.verdict.value).inc()
        if report.verdict in (Verdict.CLEAN, Verdict.BACKDOORED, Verdict.UNSAFE):
            self._metrics.last_success.set(time.time())
        if report.verdict is Verdict.ERROR:
            self._metrics.errors.labels(category=report.category or "error").inc()
        for encoder in ACCEL_ENCODERS:
            if report.accel.get(encoder) == "torch-fallback":
                self._metrics.accel_fallbacks.labels(encoder=encoder).inc()

    def _enforce(self, model: ModelRecord) -> None:
        """Quarantine every present copy of a flagged hash, unless its risk was accepted."""
        if model.verdict is None or not model.verdict.flagged:
            return
        if self._accepted.is_accepted(model.sha256):
            self._metrics.accepted_risk_skips.inc()
            return
        # one enforcer at a time: two workers holding copies of one hash must not race for the same path
        with self._enforce_lock:
            self._enforce_locked(model)

    def _enforce_locked(self, model: ModelRecord) -> None:
        assert model.verdict is not None
        for path in self._store.present_paths(model.sha256):
            record = self._store.path_record(path)
            try:
                current = signature(path)
            except FileNotFoundError:
                self._store.mark_path_gone(path)
                continue
            if record is None or record.signature != current:
                self._resettle(path)  # changed since hashed: it is another model now
                continue
            t0 = time.perf_counter()
            try:
                entry = self._quarantine.quarantine(
                    path,
                    model.sha256,
                    model.verdict.value,
                    model.report or {},
                    reason=f"verdict {model.verdict.value}",
                )
            except FileNotFoundError:
                self._store.mark_path_gone(path)  # removed by its producer meanwhile: nothing to move
                continue
            except QuarantineError as exc:
                log.error("%s", exc)
                self._metrics.errors.labels(category="quarantine").inc()
                self._resettle(path)
                continue
            self._store.mark_path_gone(path)
            self._metrics.quarantined.labels(verdict=model.verdict.value).inc()
            self._metrics.scan_duration.labels(stage="quarantine").observe(time.perf_counter() - t0)
            log.warning("quarantined %s (%s) as %s", path, model.verdict.value, entry.entry_id)


def _unit_report(scan: ScanReport, unit: Path) -> ModelReport:
    """The one verdict of a unit: the only model report, or the worst of several."""
    if not scan.models:
        return ModelReport(
            path=str(unit),
            verdict=Verdict.SKIPPED,
            category="unsupported",
            message="The scanner found nothing it can load in this unit; it was not scanned (not clean).",
        )
    return min(scan.models, key=lambda m: _SEVERITY.index(m.verdict))


class WorkerPool:
    """``n`` threads taking units from the queue until stopped; the current unit is always finished."""

    def __init__(self, n: int, work: WorkQueue, processor: Processor, metrics: DaemonMetrics) -> None:
        self._n = n
        self._work = work
        self._processor = processor
        self._metrics = metrics
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.busy = 0
        self._busy_lock = threading.Lock()

    def start(self) -> None:
        for i in range(self._n):
            t = threading.Thread(target=self._loop, name=f"scanner-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def _loop(self) -> None:
        while not self._stop.is_set():
            unit = self._work.get(timeout=0.2)
            self._metrics.queue_depth.set(len(self._work))
            if unit is None:
                continue
            with self._busy_lock:
                self.busy += 1
            try:
                outcome = self._processor.process(unit)
                log.info("%s: %s", unit, outcome)
            except Exception:  # e.g. the state file's disk is full: log, count, keep serving
                log.exception("processing %s failed", unit)
                self._metrics.errors.labels(category="internal").inc()
            finally:
                with self._busy_lock:
                    self.busy -= 1

    def alive(self) -> int:
        return sum(t.is_alive() for t in self._threads)

    def stop(self, grace_s: float) -> bool:
        """Stop taking work and wait up to ``grace_s`` for current scans; ``True`` if all finished."""
        self._stop.set()
        deadline = time.monotonic() + grace_s
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)
