"""Daemon building blocks on real files and a real SQLite file: units, state, accepted risk, quarantine,
config."""

from __future__ import annotations

import os
import socket
import sqlite3
import time
from pathlib import Path

import pytest
from test_daemon_support import content_scan, make_config, make_model_dir

from scanner.daemon import DaemonConfig, Service
from scanner.daemon.accepted_risk import AcceptedRiskList
from scanner.daemon.quarantine import RECORD_NAME, Quarantine, QuarantineError, move_unit
from scanner.daemon.state import STATE_SCHEMA_VERSION, StateStore
from scanner.daemon.units import content_hash, discover_units, is_temp_name, signature, unit_for_path
from scanner.errors import ConfigError
from scanner.report import ModelReport, Verdict

# ------------------------------------------------------------------------------------------------ units


def test_units_temp_names_model_dirs_and_loose_files(tmp_path: Path) -> None:
    root = tmp_path
    (root / "a.safetensors").write_bytes(b"x")
    (root / "sub").mkdir()
    (root / "sub" / "b.pth.tar").write_bytes(b"y")
    (root / "sub" / "notes.txt").write_text("not a model")
    (root / "c.safetensors.part").write_bytes(b"partial")
    (root / ".~upload.ckpt").write_bytes(b"hidden")
    coop = make_model_dir(root, "coop", b"weights")
    assert discover_units(root) == sorted([root / "a.safetensors", root / "sub" / "b.pth.tar", coop])
    # an event inside the model directory maps to the directory; temp names map to nothing
    assert unit_for_path(coop / "prompt_learner" / "model.pth.tar-5", root) == coop
    assert unit_for_path(root / "c.safetensors.part", root) is None
    assert unit_for_path(root / "sub" / "notes.txt", root) is None
    assert all(is_temp_name(n) for n in ("x.tmp", "x.part", ".~lock", ".hidden", "x~"))
    assert not is_temp_name("model.safetensors")


def test_directory_hash_survives_rename_and_changes_with_content(tmp_path: Path) -> None:
    d = make_model_dir(tmp_path, "m1", b"weights-1")
    h = content_hash(d)
    moved = tmp_path / "m2"
    os.rename(d, moved)
    assert content_hash(moved) == h
    (moved / "prompt_learner" / "model.pth.tar-5").write_bytes(b"weights-2")
    assert content_hash(moved) != h
    sig = signature(moved)
    assert [e[0] for e in sig] == ["prompt_learner/checkpoint", "prompt_learner/model.pth.tar-5"]
    with pytest.raises(FileNotFoundError):
        content_hash(tmp_path / "gone")


# ------------------------------------------------------------------------------------------------ state


def _report(verdict: Verdict) -> ModelReport:
    return ModelReport(path="p", verdict=verdict)


def test_state_is_wal_claims_once_and_recovers_interrupted_scans(tmp_path: Path) -> None:
    db = tmp_path / "state.sqlite"
    store = StateStore(db)
    assert store.query("PRAGMA journal_mode")[0][0] == "wal"
    sha = "a" * 64
    rec = store.record_path(tmp_path / "m.safetensors", sha, (("", 1, 1),))
    assert rec.status == "pending"
    assert store.claim(sha) == 1
    assert store.claim(sha) is None  # a second worker cannot take the same hash
    store.close()
    # the process "died" mid-scan: a new store finds it scanning and requeues it
    store = StateStore(db)
    assert store.model(sha).status == "scanning"  # type: ignore[union-attr]
    assert store.recover_interrupted() == 1
    assert store.claim(sha) == 2  # attempts count every try
    store.finish(sha, tmp_path / "m.safetensors", _report(Verdict.CLEAN), time.time())
    assert store.model(sha).status == "done"  # type: ignore[union-attr]
    assert store.scan_counts() == {sha: 1}
    # the same content seen again stays done (no rescan); a vanished hash comes back as pending
    assert store.record_path(tmp_path / "copy.safetensors", sha, (("", 1, 2),)).status == "done"
    assert sorted(p.name for p in store.present_paths(sha)) == ["copy.safetensors", "m.safetensors"]
    store.close()


def test_state_refuses_newer_schema_and_non_database(tmp_path: Path) -> None:
    db = tmp_path / "state.sqlite"
    StateStore(db).close()
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE schema_version SET version=?", (STATE_SCHEMA_VERSION + 1,))
    with pytest.raises(ConfigError, match="newer scanner"):
        StateStore(db)
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ConfigError, match="not a readable scanner state database"):
        StateStore(junk)


def test_accepted_risk_expiry_and_validation(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s.sqlite")
    risks = AcceptedRiskList(store)
    sha = "b" * 64
    risks.accept(sha, "alice", "reviewed: trigger is the watermark", expires_at=time.time() + 60)
    assert risks.is_accepted(sha)
    assert not risks.is_accepted(sha, now=time.time() + 120)
    with pytest.raises(ConfigError, match="reason"):
        risks.accept(sha, "alice", "  ")
    with pytest.raises(ConfigError, match="64 hex"):
        risks.accept("xyz", "alice", "why")
    assert risks.revoke(sha) and not risks.is_accepted(sha)
    store.close()


# ------------------------------------------------------------------------------------------------ quarantine


def test_quarantine_moves_with_record_and_release_restores(tmp_path: Path) -> None:
    watch = tmp_path / "registry"
    watch.mkdir()
    model = watch / "evil.safetensors"
    model.write_bytes(b"BACKDOOR")
    sha = content_hash(model)
    q = Quarantine(tmp_path / "quarantine")
    entry = q.quarantine(model, sha, "backdoored", {"verdict": "backdoored"}, reason="verdict backdoored")
    assert not model.exists() and entry.payload.read_bytes() == b"BACKDOOR"
    assert entry.record["status"] == "quarantined" and entry.record["method"] == "rename"
    assert (entry.folder / RECORD_NAME).is_file()
    with pytest.raises(ConfigError, match="reason"):
        q.release(entry.entry_id, reason="")
    model.write_bytes(b"someone else's upload")
    with pytest.raises(ConfigError, match="occupied"):
        q.release(entry.entry_id, reason="false positive")
    model.unlink()
    released = q.release(entry.entry_id[:20], reason="false positive", by="bob")
    assert model.read_bytes() == b"BACKDOOR"
    assert released.status == "released" and released.record["history"][-1]["by"] == "bob"
    assert (entry.folder / RECORD_NAME).is_file()  # the audit record stays


def test_quarantine_refuses_changed_content(tmp_path: Path) -> None:
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"BACKDOOR v1")
    sha = content_hash(model)
    model.write_bytes(b"clean v2")
    with pytest.raises(QuarantineError, match="content hash is now"):
        Quarantine(tmp_path / "q").quarantine(model, sha, "backdoored", {}, reason="x")
    assert model.read_bytes() == b"clean v2"
    (aborted,) = Quarantine(tmp_path / "q").entries()
    assert aborted.status == "aborted"


@pytest.mark.skipif(
    not Path("/dev/shm").is_dir() or os.stat("/dev/shm").st_dev == os.stat("/tmp").st_dev,
    reason="needs /dev/shm on another filesystem than /tmp",
)
def test_cross_filesystem_move_copies_verifies_and_removes(tmp_path: Path) -> None:
    src = make_model_dir(tmp_path, "coop", b"UNSAFE")
    sha = content_hash(src)
    dest_root = Path(f"/dev/shm/scanner-test-{os.getpid()}")
    dest_root.mkdir()
    try:
        assert move_unit(src, dest_root / "coop", sha) == "copy"
        assert not src.exists() and content_hash(dest_root / "coop") == sha
    finally:
        import shutil

        shutil.rmtree(dest_root)


def test_quarantine_recover_finishes_interrupted_moves(tmp_path: Path) -> None:
    import json

    q = Quarantine(tmp_path / "q")
    for name, has_payload in (("e1", True), ("e2", False)):
        folder = q.root / name
        folder.mkdir(parents=True)
        if has_payload:
            (folder / "m.safetensors").write_bytes(b"x")
        record = {"entry_id": name, "status": "moving", "payload": "m.safetensors", "sha256": "c" * 64}
        (folder / RECORD_NAME).write_text(json.dumps(record))
    assert q.recover() == 2
    assert {e.entry_id: e.status for e in q.entries()} == {"e1": "quarantined", "e2": "aborted"}


# ------------------------------------------------------------------------------------------------ config


def test_config_resolve_precedence_and_secret_sources(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("from-a-file-0123456789\n")
    cfg = DaemonConfig.resolve(
        {"watch_dirs": (tmp_path,), "workers": 3, "quarantine_dir": None},
        {
            "SCANNER_WORKERS": "5",
            "SCANNER_QUARANTINE_DIR": "/q-env",
            "SCANNER_POLLING": "yes",
            "SCANNER_WEBHOOK_SECRET": "env-secret-0123456789",
        },
        {"state_file": "/s.sqlite", "workers": 7, "quarantine_dir": "/q-toml", "settle_seconds": 4.5},
    )
    assert cfg.workers == 3 and cfg.quarantine_dir == Path("/q-env") and cfg.state_file == Path("/s.sqlite")
    assert cfg.polling is True and cfg.settle_seconds == 4.5
    assert cfg.webhook_secret == "env-secret-0123456789"
    assert "env-secret" not in repr(cfg)  # never in a log line
    cfg2 = DaemonConfig.resolve(
        {
            "watch_dirs": (tmp_path,),
            "quarantine_dir": "/q",
            "state_file": "/s",
            "webhook_secret_file": secret_file,
        },
        {"SCANNER_WEBHOOK_SECRET": "ignored-because-file-given"},
    )
    assert cfg2.webhook_secret == "from-a-file-0123456789"
    with pytest.raises(ConfigError, match="SCANNER_WORKERS"):
        DaemonConfig.resolve(
            {"watch_dirs": (tmp_path,), "quarantine_dir": "/q", "state_file": "/s"},
            {"SCANNER_WORKERS": "many"},
        )
    with pytest.raises(ConfigError, match="--quarantine"):
        DaemonConfig.resolve({"watch_dirs": (tmp_path,)}, {})
    with pytest.raises(ConfigError, match="Unknown key"):
        DaemonConfig.resolve({"watch_dirs": (tmp_path,)}, {}, {"wach_dirs": []})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"watch_dirs": (Path("/nonexistent/registry"),)}, "does not exist"),
        ({"quarantine_dir": "INSIDE"}, "overlaps watched folder"),
        ({"quarantine_dir": "FILE"}, "not a writable directory"),
        ({"webhook_secret": None}, "no shared secret"),
        ({"webhook_secret": "short"}, "at least 16"),
        ({"metrics_addr": "localhost"}, "not HOST:PORT"),
    ],
)
def test_bad_configuration_is_refused_at_start(tmp_path: Path, change: dict, message: str) -> None:
    cfg_values = dict(change)
    if cfg_values.get("quarantine_dir") == "INSIDE":
        cfg_values["quarantine_dir"] = tmp_path / "registry" / "quarantine"
    if cfg_values.get("quarantine_dir") == "FILE":
        (tmp_path / "a-file").write_text("x")
        cfg_values["quarantine_dir"] = tmp_path / "a-file"
    cfg = make_config(tmp_path, **cfg_values)
    with pytest.raises(ConfigError, match=message):
        Service(cfg, scan_fn=content_scan).start()


def test_busy_port_is_a_config_error_and_releases_everything(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for field in ("metrics_addr", "webhook_addr"):
            svc = Service(make_config(tmp_path, **{field: f"127.0.0.1:{port}"}), scan_fn=content_scan)
            with pytest.raises(ConfigError, match="free port"):
                svc.start()


# ------------------------------------------------------------------------------------------------ watcher


def test_a_directory_renamed_into_place_is_seen_once_and_quietly(tmp_path: Path) -> None:
    import threading
    import warnings

    from scanner.daemon.watcher import UnitEventHandler, make_observer

    root = tmp_path / "registry"
    root.mkdir()
    seen: list[Path] = []
    got = threading.Event()

    def touch(unit: Path) -> None:
        seen.append(unit)
        if (root / "model") in unit.parents:
            got.set()

    with warnings.catch_warnings(record=True) as caught:
        observer = make_observer([root], UnitEventHandler([root], touch), polling=False, poll_interval_s=1.0)
        observer.start()
        try:
            for i in range(5):  # written under a temp name, renamed at once, as registries upload folders
                tmp = root / f".model-{i}.part"
                (tmp / "a" / "b").mkdir(parents=True)
                (tmp / "a" / "b" / "prompt_learner.pth").write_bytes(b"x")
                os.rename(tmp, root / ("model" if i == 0 else f"model-{i}"))
            assert got.wait(10), f"no event for the renamed folder; saw {seen}"
            time.sleep(0.3)
        finally:
            observer.stop()
            observer.join(10)
    # nothing inside the temp-named folder was handed on while it was being written
    assert seen and all(not any(p.startswith(".") for p in u.relative_to(root).parts) for u in seen), seen
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in caught]


def test_a_folder_that_becomes_a_model_directory_mid_look_is_one_unit(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from scanner.daemon import watcher

    root = tmp_path / "registry"
    model = root / "vendor-x"
    model.mkdir(parents=True)  # the folder event arrives while the copy has made only the folder
    real = watcher.unit_for_path
    calls = {"n": 0}

    def racing(path: Path, r: Path) -> Path | None:
        calls["n"] += 1
        out = real(path, r)
        if calls["n"] == 1:  # the copy finishes right after the watcher looked at the folder
            make_model_dir(root, model.name, b"weights", via_temp=False)
        return out

    monkeypatch.setattr(watcher, "unit_for_path", racing)
    seen: list[Path] = []
    watcher.UnitEventHandler([root], seen.append).intake(model, is_dir=True, new=True)
    assert seen == [model]  # the model directory, not its checkpoint file as a loose unit
