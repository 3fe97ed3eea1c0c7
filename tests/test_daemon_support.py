"""Shared helpers of the daemon tests (no tests here).

``content_scan`` is a real, small scan function with ``scan_path``'s signature: it reads the unit's bytes
and decides from them (``BACKDOOR`` -> backdoored, ``UNSAFE`` -> unsafe, ``CORRUPT`` or empty -> error,
else clean). It lets the tests drive every real part of the daemon (observer, settle, SQLite, quarantine,
HTTP, metrics) without the detector; end-to-end tests with ``scan_path`` live with the pipeline.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from scanner.daemon import DaemonConfig
from scanner.daemon.webhook import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign
from scanner.errors import CheckpointError
from scanner.report import ModelReport, ScanReport, Verdict

SECRET = "test-secret-0123456789abcdef"


def unit_bytes(path: Path) -> bytes:
    if path.is_dir():
        return b"".join(p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file())
    return path.read_bytes()


def content_scan(path: Path, settings: Any = None) -> ScanReport:
    """Verdict from the content; ``SCANNER_TEST_SCAN_DELAY`` seconds of "work"; ``SCANNER_TEST_SCAN_LOG``
    gets one ``<sha256 of bytes> <path>`` line per completed scan (for counting scans across restarts)."""
    started = time.time()
    data = unit_bytes(path)
    delay = float(os.environ.get("SCANNER_TEST_SCAN_DELAY", "0"))
    if delay:
        time.sleep(delay)
    if not data or b"CORRUPT" in data:
        raise CheckpointError(f"{path} is not a readable checkpoint (test content {data[:16]!r}).")
    if b"BACKDOOR" in data:
        verdict, target = Verdict.BACKDOORED, "banana"
    elif b"UNSAFE" in data:
        verdict, target = Verdict.UNSAFE, None
    else:
        verdict, target = Verdict.CLEAN, None
    log = os.environ.get("SCANNER_TEST_SCAN_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{hashlib.sha256(data).hexdigest()} {path}\n")
    model = ModelReport(
        path=str(path), verdict=verdict, target_class=target, duration_s=time.time() - started
    )
    return ScanReport(root=str(path), models=[model], finished_at=time.time())


def make_config(tmp_path: Path, **overrides: Any) -> DaemonConfig:
    """A fast config on ``tmp_path``: settle 0.2 s, ports chosen by the OS."""
    watch = tmp_path / "registry"
    watch.mkdir(exist_ok=True)
    values: dict[str, Any] = {
        "watch_dirs": (watch,),
        "quarantine_dir": tmp_path / "quarantine",
        "state_file": tmp_path / "state.sqlite",
        "metrics_addr": "127.0.0.1:0",
        "webhook_addr": "127.0.0.1:0",
        "webhook_secret": SECRET,
        "settle_seconds": 0.2,
        "reconcile_interval_s": 60.0,
        "workers": 2,
        "poll_interval_s": 0.1,
        "shutdown_grace_s": 5.0,
    }
    values.update(overrides)
    return DaemonConfig(**values)


def scrape(port: int) -> dict[str, float]:
    """``{"name{label=value,...}": value}`` of the page at ``127.0.0.1:port``, via prometheus' parser."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def http(
    port: int,
    method: str,
    path: str,
    body: bytes = b"",
    *,
    secret: str | None = SECRET,
    timestamp: float | None = None,
    signature: str | None = None,
    sign_over: bytes | None = None,
) -> tuple[int, dict[str, Any]]:
    """One request to the webhook; signed with ``secret`` unless ``secret`` is None."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body or None, method=method)
    if secret is not None:
        ts = str(int(time.time() if timestamp is None else timestamp))
        signed = sign_over if sign_over is not None else (body if method == "POST" else path.encode())
        req.add_header(TIMESTAMP_HEADER, ts)
        req.add_header(SIGNATURE_HEADER, signature or sign(secret, ts, signed))
    if body:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def write_slowly(path: Path, data: bytes, chunks: int = 4, pause: float = 0.03) -> None:
    """A producer writing the final name in pieces (each pause shorter than the settle time)."""
    step = max(1, len(data) // chunks)
    with open(path, "wb") as f:
        for i in range(0, len(data), step):
            f.write(data[i : i + step])
            f.flush()
            time.sleep(pause)


def upload_by_rename(folder: Path, name: str, data: bytes) -> Path:
    """Write ``.name.part`` then rename to ``name`` (the registry pattern)."""
    tmp = folder / f".{name}.part"
    tmp.write_bytes(data)
    final = folder / name
    os.rename(tmp, final)
    return final


def make_model_dir(parent: Path, name: str, payload: bytes, *, via_temp: bool = True) -> Path:
    """A CoOp/Dassl model directory (``prompt_learner/model.pth.tar-5``), renamed into place."""
    build = parent / (f".tmp-{name}" if via_temp else name)
    (build / "prompt_learner").mkdir(parents=True)
    (build / "prompt_learner" / "model.pth.tar-5").write_bytes(payload)
    (build / "prompt_learner" / "checkpoint").write_text("model.pth.tar-5\n")
    if not via_temp:
        return build
    final = parent / name
    os.rename(build, final)
    return final
