"""The daemon as a real process: SIGKILL mid-scan then restart resumes (nothing unscanned, nothing twice),
SIGTERM stops cleanly, bad start-up configuration exits non-zero with one clear line; and the CLI's
quarantine / accept-risk commands on real files."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_daemon_support import content_scan, make_config, upload_by_rename

from scanner.cli import main
from scanner.daemon import Service

SUPPORT = Path(__file__).with_name("test_daemon_support.py")


def _spawn(tmp_path: Path, scan_log: Path | None = None, delay: float = 0.0) -> subprocess.Popen[bytes]:
    """The daemon in a child process (``Service.run``: signals, start-up recovery) with ``content_scan``.

    Not through ``scanner.cli``: importing every CLI module costs seconds (torch) on a loaded machine.
    """
    env = dict(os.environ, SCANNER_TEST_SCAN_DELAY=str(delay), SCANNER_TEST_SCAN_LOG=str(scan_log or ""))
    code = "\n".join(
        [
            f"import logging, sys; sys.path.insert(0, {str(SUPPORT.parent)!r})",
            "from pathlib import Path",
            "from test_daemon_support import content_scan, make_config",
            "from scanner.daemon import Service",
            "logging.basicConfig(level=logging.INFO)",
            f"cfg = make_config(Path({str(tmp_path)!r}), webhook_addr=None, workers=1)",
            "sys.exit(Service(cfg, scan_fn=content_scan).run())",
        ]
    )
    log = open(tmp_path / "daemon.log", "ab")  # noqa: SIM115 (the child owns it)
    return subprocess.Popen([sys.executable, "-c", code], env=env, stderr=log)


def _db(tmp_path: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(tmp_path / "state.sqlite", timeout=10) as conn:
        return list(conn.execute(sql))


def _wait(predicate, timeout: float = 30.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if predicate():
                return True
        except sqlite3.OperationalError:
            pass  # the daemon has not created its tables yet
        time.sleep(0.1)
    return False


def test_sigkill_mid_scan_then_restart_resumes_without_loss_or_double_scan(tmp_path: Path) -> None:
    reg = tmp_path / "registry"
    reg.mkdir()
    scan_log = tmp_path / "scans.log"
    contents = {
        f"m{i}.safetensors": (b"BACKDOOR " if i % 3 == 0 else b"clean ") + bytes([65 + i]) * 50
        for i in range(6)
    }
    proc = _spawn(tmp_path, scan_log, delay=0.4)
    try:
        for name, data in contents.items():
            upload_by_rename(reg, name, data)
        # kill while a scan is in progress: at least one recorded, the next one claimed
        assert _wait(
            lambda: (
                len(_db(tmp_path, "SELECT 1 FROM scans")) >= 2
                and _db(tmp_path, "SELECT 1 FROM models WHERE status='scanning'")
            )
        )
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert _db(tmp_path, "SELECT COUNT(*) FROM models WHERE status='scanning'")[0][0] == 1
    done_before = _db(tmp_path, "SELECT COUNT(*) FROM scans")[0][0]
    assert done_before < len(contents)

    proc = _spawn(tmp_path, scan_log, delay=0.05)
    try:
        assert _wait(lambda: _db(tmp_path, "SELECT COUNT(*) FROM models WHERE status='done'")[0][0] == 6)
        assert _wait(
            lambda: not any((reg / n).exists() for n, d in contents.items() if d.startswith(b"BACKDOOR"))
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0  # graceful stop
    finally:
        if proc.poll() is None:
            proc.kill()
    per_hash = _db(tmp_path, "SELECT sha256, COUNT(*) FROM scans GROUP BY sha256")
    assert len(per_hash) == 6 and all(n == 1 for _, n in per_hash)  # nothing unscanned, nothing twice
    records = [json.loads(p.read_text()) for p in (tmp_path / "quarantine").glob("*/quarantine-record.json")]
    assert sorted(r["payload"] for r in records if r["status"] == "quarantined") == [
        "m0.safetensors",
        "m3.safetensors",
    ]
    assert sorted(p.name for p in reg.iterdir()) == [
        "m1.safetensors",
        "m2.safetensors",
        "m4.safetensors",
        "m5.safetensors",
    ]
    assert "resumed after a crash: 1 interrupted scan(s) requeued" in (tmp_path / "daemon.log").read_text()


def _daemon_args(tmp_path: Path, *extra: str) -> list[str]:
    return ["daemon", "--quarantine", str(tmp_path / "q"), "--state", str(tmp_path / "s.sqlite"),
            "--scan-fn", f"{SUPPORT}:content_scan", *extra]  # fmt: skip


def test_start_up_errors_exit_non_zero_with_one_clear_line(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(main, _daemon_args(tmp_path, "--watch", str(tmp_path / "missing")))
    assert (
        result.exit_code == 2 and "error: Watch folder" in result.output and "Traceback" not in result.output
    )
    (tmp_path / "reg").mkdir()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        args = _daemon_args(tmp_path, "--watch", str(tmp_path / "reg"), "--metrics-addr", f"127.0.0.1:{port}")
        result = runner.invoke(main, args)
    assert result.exit_code == 2 and "Cannot serve metrics" in result.output


def test_quarantine_and_accept_risk_commands(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, webhook_addr=None, metrics_addr=None)
    svc = Service(cfg, scan_fn=content_scan)
    svc.start()
    try:
        upload_by_rename(cfg.watch_dirs[0], "evil.safetensors", b"BACKDOOR cli")
        time.sleep(0.3)
        assert svc.wait_idle(10)
    finally:
        svc.stop()
    q, s = str(cfg.quarantine_dir), str(cfg.state_file)
    runner = CliRunner()
    listed = runner.invoke(main, ["quarantine", "list", "--quarantine", q])
    assert listed.exit_code == 0 and "evil.safetensors" in listed.output and "backdoored" in listed.output
    entry_id = listed.output.split()[0]
    shown = runner.invoke(main, ["quarantine", "show", "--quarantine", q, entry_id])
    sha = json.loads(shown.output)["sha256"]
    no_reason = runner.invoke(main, ["quarantine", "release", "--quarantine", q, entry_id])
    assert no_reason.exit_code == 2 and "--reason" in no_reason.output
    released = runner.invoke(
        main,
        [
            "quarantine",
            "release",
            "--quarantine",
            q,
            "--state",
            s,
            entry_id,
            "--reason",
            "false positive",
            "--by",
            "carol",
            "--expires",
            "30",
        ],
    )
    assert released.exit_code == 0, released.output
    assert (cfg.watch_dirs[0] / "evil.safetensors").read_bytes() == b"BACKDOOR cli"
    risks = runner.invoke(main, ["accept-risk", "list", "--state", s])
    assert sha in risks.output and "carol" in risks.output and "active" in risks.output
    # the daemon restarted leaves the released, accepted model in place
    svc = Service(cfg, scan_fn=content_scan)
    svc.start()
    try:
        assert svc.wait_reconciled(1) and svc.wait_idle(10)
        assert (cfg.watch_dirs[0] / "evil.safetensors").exists()
    finally:
        svc.stop()
    assert runner.invoke(main, ["accept-risk", "revoke", "--state", s, sha]).output.strip() == "revoked"
    bad = runner.invoke(main, ["accept-risk", "add", "--state", s, "not-a-hash", "--reason", "x"])
    assert bad.exit_code == 2 and "64 hex" in bad.output


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_stop_the_service_loop(tmp_path: Path, sig: signal.Signals) -> None:
    """``run()`` in a child process exits 0 on SIGTERM and SIGINT."""
    proc = _spawn(tmp_path)
    assert _wait(lambda: (tmp_path / "state.sqlite").exists(), timeout=20)
    time.sleep(0.5)
    proc.send_signal(sig)
    assert proc.wait(15) == 0
