"""Prometheus metrics of the daemon, on an injected ``CollectorRegistry`` (no process-global registry).

Labels are closed sets only (verdict, stage, category, source): never a path or a hash, which would grow
the series count with every upload. The names here are the contract of deploy/ (alerts and dashboard);
``tests/test_deploy*.py`` checks every name those files use is exposed.
"""

from __future__ import annotations

import platform
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

from scanner import __version__
from scanner.daemon.config import parse_addr
from scanner.errors import ConfigError
from scanner.report import Verdict

#: duration stages: hashing the unit, running the scan function, moving it to quarantine
STAGES = ("hash", "scan", "quarantine")
#: scans of the tiny bundled CLIP take seconds; real backbones on CPU minutes
DURATION_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
OVERFLOW_SOURCES = ("inotify", "queue")
#: encoders whose forward-only work can fall back from onnxruntime to torch
ACCEL_ENCODERS = ("image", "text")


class DaemonMetrics:
    """All daemon metrics; every series a dashboard uses exists (at 0) from start-up."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.scans = Counter("scanner_scans", "Models scanned, by verdict.", ["verdict"], registry=registry)
        self.scan_duration = Histogram(
            "scanner_scan_duration_seconds",
            "Time spent per model, by stage (hash, scan, quarantine).",
            ["stage"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.quarantined = Counter(
            "scanner_quarantined", "Models moved to quarantine, by verdict.", ["verdict"], registry=registry
        )
        self.accepted_risk_skips = Counter(
            "scanner_accepted_risk_skips",
            "Flagged models left in place because their content hash is on the accepted-risk list.",
            registry=registry,
        )
        self.queue_depth = Gauge("scanner_queue_depth", "Units waiting in the work queue.", registry=registry)
        self.settling = Gauge(
            "scanner_settling_units",
            "Units seen but not yet settled (still being written).",
            registry=registry,
        )
        self.in_flight = Gauge("scanner_scans_in_progress", "Scans running now.", registry=registry)
        self.last_success = Gauge(
            "scanner_last_success_timestamp_seconds",
            "Unix time of the last scan that produced a verdict (clean, backdoored or unsafe).",
            registry=registry,
        )
        self.errors = Counter(
            "scanner_errors",
            "Errors, by category (checkpoint, unsafe-load, vanished, ...).",
            ["category"],
            registry=registry,
        )
        self.reconcile_runs = Counter(
            "scanner_reconcile_runs", "Full-tree reconcile passes completed.", registry=registry
        )
        self.reconcile_found = Counter(
            "scanner_reconcile_found",
            "Units a reconcile pass found that no event had delivered (lost events or downtime).",
            registry=registry,
        )
        self.overflows = Counter(
            "scanner_overflows",
            "Events dropped: inotify queue overflow, or a full work queue (recovered by reconcile).",
            ["source"],
            registry=registry,
        )
        self.accel_fallbacks = Counter(
            "scanner_onnx_torch_fallbacks",
            "Scans whose forward-only encoder work wanted onnxruntime but ran in torch (export impossible, "
            "unwritable cache, onnxruntime failure), by encoder.",
            ["encoder"],
            registry=registry,
        )
        self.build_info = Info("scanner_build", "Scanner build.", registry=registry)
        self.build_info.info({"version": __version__, "python": platform.python_version()})
        for v in Verdict:
            self.scans.labels(verdict=v.value)
        for v in (Verdict.BACKDOORED, Verdict.UNSAFE):
            self.quarantined.labels(verdict=v.value)
        for stage in STAGES:
            self.scan_duration.labels(stage=stage)
        for source in OVERFLOW_SOURCES:
            self.overflows.labels(source=source)
        self.errors.labels(category="internal")
        for encoder in ACCEL_ENCODERS:
            self.accel_fallbacks.labels(encoder=encoder)

    def serve(self, addr: str) -> WSGIServer:
        """Serve ``/metrics`` on ``addr`` (``host:port``) in a daemon thread; ``ConfigError`` if busy."""
        host, port = parse_addr(addr, "metrics")
        try:
            server, _thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise ConfigError(
                f"Cannot serve metrics on {addr} ({exc.strerror or exc}). Is another daemon running? Pass "
                "--metrics-addr HOST:PORT with a free port."
            ) from exc
        return server
