"""The daemon end to end with a real watchdog observer, a real SQLite file, real HTTP on 127.0.0.1 and the
metrics page parsed back with prometheus-client's parser. The scan function is ``content_scan`` (real,
content-based); the detector is exercised by the pipeline's own tests."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_daemon_support import (
    SECRET,
    content_scan,
    http,
    make_config,
    make_model_dir,
    scrape,
    upload_by_rename,
    write_slowly,
)

from scanner.daemon import Service
from scanner.daemon.accepted_risk import AcceptedRiskList
from scanner.daemon.units import content_hash
from scanner.daemon.webhook import sign
from scanner.report import ScanReport


@pytest.fixture(params=["inotify", "polling"])
def service(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Service]:
    svc = Service(make_config(tmp_path, polling=request.param == "polling"), scan_fn=content_scan)
    svc.start()
    assert svc.wait_reconciled(1)
    yield svc
    svc.stop(grace_s=5)


def _registry(svc: Service) -> Path:
    return svc.roots[0]


def _settle(svc: Service, timeout: float = 15.0) -> None:
    time.sleep(0.3 + (svc.config.poll_interval_s if svc.config.polling else 0))
    assert svc.wait_idle(timeout), "daemon did not go idle"


def test_uploads_are_scanned_once_and_flagged_ones_quarantined(service: Service) -> None:
    reg = _registry(service)
    write_slowly(reg / "clean.safetensors", b"clean weights " * 100)  # final name, written in pieces
    upload_by_rename(reg, "evil.safetensors", b"BACKDOOR weights")  # temp name then rename
    (reg / "copy-of-clean.safetensors").write_bytes(b"clean weights " * 100)  # duplicate content
    (reg / "broken.ckpt").write_bytes(b"CORRUPT")
    (reg / "sub").mkdir()
    coop = make_model_dir(reg / "sub", "coop-unsafe", b"UNSAFE pickle")
    (reg / "half.safetensors.part").write_bytes(b"BACKDOOR never finished")  # abandoned temp upload
    _settle(service)

    store = service.store
    assert store is not None
    counts = store.scan_counts()
    # clean (two copies), evil, broken, coop: four hashes, each scanned once
    assert sorted(counts.values()) == [1] * 4
    assert (reg / "clean.safetensors").exists() and (reg / "copy-of-clean.safetensors").exists()
    assert not (reg / "evil.safetensors").exists() and not coop.exists()
    assert (reg / "half.safetensors.part").exists()  # temp names are never scanned nor moved
    assert (reg / "broken.ckpt").exists()  # an error is recorded, not quarantined
    entries = {Path(e.record["original_path"]).name: e for e in service.quarantine.entries()}
    assert set(entries) == {"evil.safetensors", "coop-unsafe"}
    assert entries["evil.safetensors"].record["verdict"] == "backdoored"
    assert entries["coop-unsafe"].payload.is_dir()
    assert entries["evil.safetensors"].record["report"]["target_class"] == "banana"

    broken = store.model(content_hash(reg / "broken.ckpt"))
    assert broken is not None and broken.verdict is not None and broken.verdict.value == "error"
    assert broken.report is not None and broken.report["category"] == "checkpoint"

    assert service.metrics_port is not None
    m = scrape(service.metrics_port)
    assert m["scanner_scans_total{verdict=clean}"] == 1
    assert m["scanner_scans_total{verdict=backdoored}"] == 1
    assert m["scanner_scans_total{verdict=unsafe}"] == 1
    assert m["scanner_scans_total{verdict=error}"] == 1
    assert m["scanner_quarantined_total{verdict=backdoored}"] == 1
    assert m["scanner_quarantined_total{verdict=unsafe}"] == 1
    assert m["scanner_errors_total{category=checkpoint}"] == 1
    assert m["scanner_queue_depth"] == 0
    assert m["scanner_scan_duration_seconds_count{stage=scan}"] == 4
    assert m["scanner_last_success_timestamp_seconds"] > time.time() - 60
    assert m["scanner_reconcile_runs_total"] >= 1
    assert any(k.startswith("scanner_build_info{") for k in m)
    assert not any("path=" in k or "sha256=" in k for k in m)  # no unbounded labels


def test_in_place_change_is_rescanned_and_a_duplicate_of_a_flagged_model_is_quarantined(
    service: Service,
) -> None:
    reg = _registry(service)
    target = reg / "model.safetensors"
    target.write_bytes(b"version one")
    _settle(service)
    target.write_bytes(b"version two BACKDOOR")
    _settle(service)
    assert not target.exists()  # the new content was scanned and flagged
    upload_by_rename(reg, "again.safetensors", b"version two BACKDOOR")  # same flagged content, new name
    _settle(service)
    assert not (reg / "again.safetensors").exists()
    assert service.store is not None
    assert sorted(service.store.scan_counts().values()) == [1, 1]  # v1 and v2, each once
    assert len(service.quarantine.entries()) == 2


def test_accepted_risk_is_recorded_not_quarantined(tmp_path: Path) -> None:
    svc = Service(make_config(tmp_path), scan_fn=content_scan)
    svc.start()
    try:
        assert svc.store is not None
        data = b"BACKDOOR but reviewed"
        sha = __import__("hashlib").sha256(data).hexdigest()
        AcceptedRiskList(svc.store).accept(sha, "alice", "vendor watermark, reviewed")
        (svc.roots[0] / "reviewed.safetensors").write_bytes(data)
        _settle(svc)
        assert (svc.roots[0] / "reviewed.safetensors").exists()
        model = svc.store.model(sha)
        assert model is not None and model.verdict is not None and model.verdict.value == "backdoored"
        assert scrape(svc.metrics_port or 0)["scanner_accepted_risk_skips_total"] >= 1
        # revoking the risk: the next reconcile quarantines it
        AcceptedRiskList(svc.store).revoke(sha)
        svc.request_reconcile()
        assert svc.wait_reconciled(2)
        _settle(svc)
        assert not (svc.roots[0] / "reviewed.safetensors").exists()
    finally:
        svc.stop()


def test_start_up_reconcile_finds_what_arrived_while_down(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    reg = cfg.watch_dirs[0]
    (reg / "before.safetensors").write_bytes(b"BACKDOOR uploaded while the daemon was down")
    make_model_dir(reg, "coop", b"clean")
    svc = Service(cfg, scan_fn=content_scan)
    svc.start()
    try:
        assert svc.wait_reconciled(1)
        _settle(svc)
        assert svc.last_reconcile is not None and svc.last_reconcile.found_unseen == 2
        assert not (reg / "before.safetensors").exists()
        assert svc.store is not None and sum(svc.store.scan_counts().values()) == 2
        assert scrape(svc.metrics_port or 0)["scanner_reconcile_found_total"] == 2
    finally:
        svc.stop()
    # a restart changes nothing: everything is already done
    svc = Service(cfg, scan_fn=content_scan)
    svc.start()
    try:
        assert svc.wait_reconciled(1)
        _settle(svc)
        assert svc.last_reconcile is not None and svc.last_reconcile.unchanged == 1
        assert svc.store is not None and sum(svc.store.scan_counts().values()) == 2
    finally:
        svc.stop()


def test_a_unit_vanishing_mid_scan_is_recorded_not_a_crash(tmp_path: Path) -> None:
    started = threading.Event()
    release = threading.Event()

    def slow_scan(path: Path, settings: object) -> ScanReport:
        started.set()
        release.wait(10)
        return content_scan(path)  # the file is gone by now: raises FileNotFoundError

    svc = Service(make_config(tmp_path, workers=1), scan_fn=slow_scan)
    svc.start()
    try:
        victim = svc.roots[0] / "victim.safetensors"
        victim.write_bytes(b"soon gone")
        assert started.wait(10)
        victim.unlink()
        release.set()
        _settle(svc)
        assert svc.store is not None
        model = svc.store.model(content_hash_of(b"soon gone"))
        assert model is not None and model.status == "vanished"
        assert svc.store.scan_counts() == {}
        assert scrape(svc.metrics_port or 0)["scanner_errors_total{category=vanished}"] == 1
        ok, health = svc.health()
        assert ok and health["workers_alive"] == 1
    finally:
        svc.stop()


def content_hash_of(data: bytes) -> str:
    return __import__("hashlib").sha256(data).hexdigest()


# ------------------------------------------------------------------------------------------------ webhook


@pytest.fixture
def hooked(tmp_path: Path) -> Iterator[Service]:
    # a long settle: only the webhook (which skips settling) can get a unit scanned within the test
    svc = Service(make_config(tmp_path, settle_seconds=30.0), scan_fn=content_scan)
    svc.start()
    assert svc.wait_reconciled(1)
    yield svc
    svc.stop()


def test_webhook_signed_request_scans_and_report_is_served(hooked: Service) -> None:
    port = hooked.webhook_port
    assert port is not None
    model = hooked.roots[0] / "upload.safetensors"
    model.write_bytes(b"BACKDOOR via hook")
    status, body = http(port, "POST", "/v1/scan", json.dumps({"path": "upload.safetensors"}).encode())
    assert status == 202 and body["status"] == "queued"
    sha = body["sha256"]
    deadline = time.time() + 10
    while time.time() < deadline:
        status, found = http(port, "GET", f"/v1/scans/{sha}")
        if status == 200 and found["status"] == "done" and found["quarantine"]:
            break
        time.sleep(0.1)
    assert status == 200 and found["verdict"] == "backdoored"
    assert found["report"]["sha256"] == sha and found["quarantine"][0]["status"] == "quarantined"
    assert not model.exists()
    status, health = http(port, "GET", "/healthz", secret=None)
    assert status == 200 and health["status"] == "ok"
    assert http(port, "GET", "/v1/scans/" + "0" * 64)[0] == 404


def test_webhook_rejects_unsigned_forged_stale_replayed_and_escaping_requests(
    hooked: Service, tmp_path: Path
) -> None:
    port = hooked.webhook_port
    assert port is not None
    reg = hooked.roots[0]
    (reg / "ok.safetensors").write_bytes(b"fine")
    body = json.dumps({"path": str(reg / "ok.safetensors")}).encode()
    assert http(port, "POST", "/v1/scan", body, secret=None)[0] == 401  # unsigned
    assert http(port, "POST", "/v1/scan", body, secret="wrong-secret-0123456789")[0] == 403  # forged
    assert http(port, "POST", "/v1/scan", body, timestamp=time.time() - 301)[0] == 401  # stale
    assert http(port, "POST", "/v1/scan", body, timestamp=time.time() + 301)[0] == 401  # from the future
    # a valid signature over another body does not authorise this one
    assert http(port, "POST", "/v1/scan", body, sign_over=b'{"path": "x"}')[0] == 403
    ts = str(int(time.time()))
    fixed = sign(SECRET, ts, body)
    assert http(port, "POST", "/v1/scan", body, timestamp=float(ts), signature=fixed)[0] == 202
    assert http(port, "POST", "/v1/scan", body, timestamp=float(ts), signature=fixed)[0] == 403  # replay

    outside = tmp_path / "secret.safetensors"
    outside.write_bytes(b"outside the registry")
    os.symlink(outside, reg / "link.safetensors")
    for escaping in (
        "../secret.safetensors",
        str(reg / ".." / "secret.safetensors"),
        "link.safetensors",
        "/etc/passwd",
    ):
        status, reply = http(port, "POST", "/v1/scan", json.dumps({"path": escaping}).encode())
        assert status == 400, (escaping, reply)
    assert http(port, "POST", "/v1/scan", b"not json")[0] == 400
    assert http(port, "POST", "/v1/scan", json.dumps({"path": "missing.safetensors"}).encode())[0] == 404
    (reg / "notes.txt").write_text("hi")
    assert http(port, "POST", "/v1/scan", json.dumps({"path": "notes.txt"}).encode())[0] == 422
    assert http(port, "GET", "/v1/scans/" + "0" * 64, secret=None)[0] == 401
    assert outside.exists() and hooked.store is not None
    assert all(str(tmp_path / "secret") not in str(p) for p in hooked.store.query("SELECT path FROM paths"))
