"""``Service``: wires config, state, quarantine, metrics, watcher, reconcile, workers and webhook together.

The scan function is injected (``Service(config, settings, scan_fn=scan_path)``) so the daemon machinery
is independent of the detector: tests drive it with a small real scan function, production with
``scanner.pipeline.scan_path``.

Start-up order matters for crash safety: open the state (interrupted scans -> pending), finish half-done
quarantine moves, bind ports (a busy port fails before any work starts), start workers and settler,
start the observer, then reconcile (so nothing uploaded during downtime or start-up is missed).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry

from scanner.daemon.accepted_risk import AcceptedRiskList
from scanner.daemon.config import DaemonConfig
from scanner.daemon.metrics import DaemonMetrics
from scanner.daemon.quarantine import Quarantine
from scanner.daemon.reconcile import Reconciler, ReconcileResult
from scanner.daemon.state import StateStore
from scanner.daemon.units import content_hash, unit_for_path
from scanner.daemon.watcher import OverflowSignal, Settler, UnitEventHandler, make_observer
from scanner.daemon.webhook import WebhookServer
from scanner.daemon.worker import Processor, WorkerPool, WorkQueue
from scanner.report import ScanReport

log = logging.getLogger(__name__)

#: ``scanner.pipeline.scan_path``'s shape: (path, settings) -> ScanReport
ScanFn = Callable[[Path, Any], ScanReport]

_WATCHDOG_LOGGERS = ("watchdog.observers.inotify", "watchdog.observers.inotify_c")


class Service:
    """The daemon. ``start()``/``stop()`` for embedding and tests; ``run()`` for the CLI (blocks, signals)."""

    def __init__(
        self,
        config: DaemonConfig,
        settings: Any = None,
        *,
        scan_fn: ScanFn,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.config = config
        self.settings = settings
        self._scan_fn = scan_fn
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = DaemonMetrics(self.registry)
        self.roots: tuple[Path, ...] = ()
        self.store: StateStore | None = None
        self.quarantine = Quarantine(config.quarantine_dir)
        self.work = WorkQueue(config.queue_size)
        self.settler = Settler(config.settle_seconds, self._on_settled)
        self._stop = threading.Event()
        self._reconcile_now = threading.Event()
        self._threads: list[threading.Thread] = []
        self._metrics_server: WSGIServer | None = None
        self._webhook: WebhookServer | None = None
        self._observer: Any = None
        self._pool: WorkerPool | None = None
        self._processor: Processor | None = None
        self._reconciler: Reconciler | None = None
        self._overflow_signal = OverflowSignal(self._on_overflow)
        self.last_reconcile: ReconcileResult | None = None
        self._reconcile_count = 0
        self._reconcile_cond = threading.Condition()

    # -- life cycle -----------------------------------------------------------------------------------
    def start(self) -> None:
        """Validate, open state, bind ports, start threads; raises ``ConfigError`` before any work starts."""
        cfg = self.config
        cfg.validate()
        self.roots = tuple(Path(os.path.realpath(w)) for w in cfg.watch_dirs)
        self.quarantine = Quarantine(Path(os.path.realpath(cfg.quarantine_dir)))
        store = self.store = StateStore(cfg.state_file)
        try:
            if cfg.metrics_addr is not None:
                self._metrics_server = self.metrics.serve(cfg.metrics_addr)
            if cfg.webhook_addr is not None:
                assert cfg.webhook_secret is not None  # validate() guarantees it
                self._webhook = WebhookServer(
                    cfg.webhook_addr,
                    cfg.webhook_secret,
                    submit=self._webhook_submit,
                    lookup=self.lookup,
                    health=self.health,
                    replay_window_s=cfg.replay_window_s,
                )
        except BaseException:
            self._close_servers()
            store.close()
            raise
        interrupted = store.recover_interrupted()
        moved = self.quarantine.recover()
        if interrupted or moved:
            log.warning(
                "resumed after a crash: %d interrupted scan(s) requeued, %d quarantine move(s) finished",
                interrupted,
                moved,
            )
        accepted = AcceptedRiskList(store)
        self.metrics.queue_depth.set_function(lambda: len(self.work))
        self.metrics.settling.set_function(lambda: len(self.settler))
        self._processor = Processor(
            store,
            self.quarantine,
            accepted,
            self.metrics,
            lambda path: self._scan_fn(path, self.settings),
            max_attempts=cfg.max_attempts,
            resettle=self.settler.touch,
        )
        self._pool = WorkerPool(cfg.workers, self.work, self._processor, self.metrics)
        self._reconciler = Reconciler(
            self.roots,
            store,
            accepted,
            self.metrics,
            touch=self.settler.touch,
            is_tracked=lambda u: u in self.settler or u in self.work,
            submit=self._submit,
        )
        self._pool.start()
        self.settler.start()
        for name in _WATCHDOG_LOGGERS:
            logging.getLogger(name).addHandler(self._overflow_signal)
        self._observer = make_observer(
            self.roots, UnitEventHandler(self.roots, self.settler.touch), cfg.polling, cfg.poll_interval_s
        )
        self._observer.start()
        if self._webhook is not None:
            self._webhook.start()
        t = threading.Thread(target=self._reconcile_loop, name="scanner-reconcile", daemon=True)
        t.start()
        self._threads.append(t)
        log.info(
            "watching %s (%s), quarantine %s, state %s, metrics %s, webhook %s",
            ", ".join(map(str, self.roots)),
            "polling" if cfg.polling else "inotify",
            self.quarantine.root,
            cfg.state_file,
            self.metrics_url or "off",
            self.webhook_url or "off",
        )

    def stop(self, grace_s: float | None = None) -> bool:
        """Stop watching, let in-flight scans finish (up to the grace time), requeue unfinished ones."""
        grace = self.config.shutdown_grace_s if grace_s is None else grace_s
        self._stop.set()
        self._reconcile_now.set()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
        for name in _WATCHDOG_LOGGERS:
            logging.getLogger(name).removeHandler(self._overflow_signal)
        self.settler.stop()
        finished = True
        if self._pool is not None:
            finished = self._pool.stop(grace)
        if not finished and self._processor is not None and self.store is not None:
            for sha in list(self._processor.in_flight.values()):
                self.store.unclaim(sha, "pending")  # scanned again at the next start
            log.warning(
                "shutdown: %d scan(s) did not finish in %.0f s; requeued",
                len(self._processor.in_flight),
                grace,
            )
        for t in self._threads:
            t.join(timeout=5)
        self._close_servers()
        if finished and self.store is not None:
            self.store.close()
        return finished

    def run(self) -> int:
        """Start, block until SIGTERM/SIGINT, stop gracefully; SIGHUP triggers a reconcile. Returns 0."""
        self.start()
        signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        signal.signal(signal.SIGINT, lambda *_: self._stop.set())
        signal.signal(signal.SIGHUP, lambda *_: self._reconcile_now.set())
        while not self._stop.wait(0.5):
            pass
        log.info("stopping: finishing in-flight scans")
        self.stop()
        return 0

    def _close_servers(self) -> None:
        if self._webhook is not None:
            self._webhook.stop()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()

    # -- addresses ------------------------------------------------------------------------------------
    @property
    def metrics_port(self) -> int | None:
        return None if self._metrics_server is None else int(self._metrics_server.server_address[1])

    @property
    def metrics_url(self) -> str | None:
        if self._metrics_server is None or self.config.metrics_addr is None:
            return None
        return f"http://{self.config.metrics_addr.rpartition(':')[0]}:{self.metrics_port}/metrics"

    @property
    def webhook_port(self) -> int | None:
        return None if self._webhook is None else self._webhook.port

    @property
    def webhook_url(self) -> str | None:
        if self._webhook is None or self.config.webhook_addr is None:
            return None
        return f"http://{self.config.webhook_addr.rpartition(':')[0]}:{self.webhook_port}"

    # -- plumbing -------------------------------------------------------------------------------------
    def _submit(self, unit: Path) -> bool:
        if self.work.submit(unit):
            return True
        self.metrics.overflows.labels(source="queue").inc()
        log.warning("work queue full (%d); %s waits for the next reconcile", self.config.queue_size, unit)
        return False

    def _on_settled(self, unit: Path) -> None:
        self._submit(unit)

    def _on_overflow(self) -> None:
        self.metrics.overflows.labels(source="inotify").inc()
        self._reconcile_now.set()

    def request_reconcile(self) -> None:
        self._reconcile_now.set()

    def _reconcile_loop(self) -> None:
        while not self._stop.is_set():
            assert self._reconciler is not None
            try:
                self.last_reconcile = self._reconciler.run()
            except Exception:  # a transient I/O error must not end periodic reconciling
                log.exception("reconcile failed")
                self.metrics.errors.labels(category="internal").inc()
            with self._reconcile_cond:
                self._reconcile_count += 1
                self._reconcile_cond.notify_all()
            self._reconcile_now.wait(self.config.reconcile_interval_s)
            self._reconcile_now.clear()

    def wait_reconciled(self, count: int = 1, timeout: float = 10.0) -> bool:
        """Block until ``count`` reconcile passes have completed since start (tests, the demo)."""
        with self._reconcile_cond:
            return self._reconcile_cond.wait_for(lambda: self._reconcile_count >= count, timeout=timeout)

    def is_idle(self) -> bool:
        return len(self.settler) == 0 and len(self.work) == 0 and (self._pool is None or self._pool.busy == 0)

    def wait_idle(self, timeout: float = 30.0, quiet_s: float = 0.3) -> bool:
        """Block until nothing is settling, queued or scanning for ``quiet_s`` in a row."""
        deadline = time.monotonic() + timeout
        quiet_since: float | None = None
        while time.monotonic() < deadline:
            if self.is_idle():
                quiet_since = quiet_since or time.monotonic()
                if time.monotonic() - quiet_since >= quiet_s:
                    return True
            else:
                quiet_since = None
            time.sleep(0.05)
        return False

    # -- webhook callbacks ----------------------------------------------------------------------------
    def _webhook_submit(self, raw: str) -> tuple[int, dict[str, Any]]:
        given = Path(raw)
        candidates = [given] if given.is_absolute() else [root / given for root in self.roots]
        inside: list[tuple[Path, Path]] = []
        for cand in candidates:
            real = Path(os.path.realpath(cand))  # resolves "..", and symlinks that point out of the tree
            root = next((r for r in self.roots if real == r or real.is_relative_to(r)), None)
            if root is not None:
                inside.append((real, root))
        if not inside:
            return 400, {"error": "Bad Request", "message": "path is outside every watched folder"}
        existing = [(p, r) for p, r in inside if p.exists()]
        if not existing:
            return 404, {"error": "Not Found", "message": "no such file or directory under a watched folder"}
        path, root = existing[0]
        unit = unit_for_path(path, root)
        if unit is None:
            return 422, {
                "error": "Unprocessable Entity",
                "message": "not a model: expected a checkpoint file or a folder holding prompt_learner/",
            }
        try:
            sha = content_hash(unit)
        except FileNotFoundError:
            return 404, {"error": "Not Found", "message": "the model vanished while it was hashed"}
        found = self.lookup(sha)
        if found is not None and found["status"] == "done":
            return 200, found
        if not self._submit(unit):
            return 503, {"error": "Service Unavailable", "message": "work queue full; retry later"}
        return 202, {"sha256": sha, "status": "queued", "report_url": f"/v1/scans/{sha}"}

    def lookup(self, sha256: str) -> dict[str, Any] | None:
        """Stored state of a content hash: status, verdict, report, paths, quarantine, accepted risk."""
        if self.store is None:
            return None
        model = self.store.model(sha256)
        if model is None:
            return None
        risk = AcceptedRiskList(self.store).get(sha256)
        return {
            "sha256": sha256,
            "status": model.status,
            "verdict": model.verdict.value if model.verdict else None,
            "attempts": model.attempts,
            "first_seen": model.first_seen,
            "scanned_at": model.scanned_at,
            "paths": [str(p) for p in self.store.present_paths(sha256)],
            "quarantine": [
                {"entry_id": e.entry_id, "status": e.status, "original_path": e.record.get("original_path")}
                for e in self.quarantine.entries()
                if e.record.get("sha256") == sha256
            ],
            "accepted_risk": None
            if risk is None
            else {
                "by": risk.accepted_by,
                "reason": risk.reason,
                "expires_at": risk.expires_at,
                "active": risk.active(),
            },
            "report": model.report,
        }

    def health(self) -> tuple[bool, dict[str, Any]]:
        alive = self._pool.alive() if self._pool is not None else 0
        observer_alive = bool(self._observer is not None and self._observer.is_alive())
        ok = alive == self.config.workers and observer_alive and not self._stop.is_set()
        return ok, {
            "status": "ok" if ok else "degraded",
            "workers": self.config.workers,
            "workers_alive": alive,
            "observer_alive": observer_alive,
            "queue_depth": len(self.work),
            "settling": len(self.settler),
            "scanning": self._pool.busy if self._pool is not None else 0,
        }
