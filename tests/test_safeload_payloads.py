"""≥ 20 hostile checkpoints: each is flagged unsafe with its global named and is never executed."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from payloads import PAYLOADS, Payload, detonate

from scanner.errors import UnsafeFileError
from scanner.safeload import check_torch_file, safe_torch_load, scan_pickle_globals


def test_there_are_at_least_twenty_distinct_payloads() -> None:
    assert len({p.name for p in PAYLOADS}) == len(PAYLOADS) >= 20
    assert {p.container for p in PAYLOADS} >= {"raw", "zip", "legacy", "torchscript"}


@pytest.mark.parametrize("payload", PAYLOADS, ids=lambda p: p.name)
def test_payload_is_unsafe_and_never_runs(payload: Payload, tmp_path: Path) -> None:
    path = payload.write(tmp_path)

    assert set(scan_pickle_globals(path)) & payload.expected
    with pytest.raises(UnsafeFileError) as info:
        check_torch_file(path)
    assert set(info.value.globals_found) & payload.expected
    assert any(name in str(info.value) for name in payload.expected)
    assert info.value.category == "unsafe"
    with pytest.raises(UnsafeFileError) as info2:
        safe_torch_load(path)
    assert info2.value.globals_found == info.value.globals_found

    assert not payload.fired(tmp_path), f"{payload.name} was executed"


@pytest.mark.slow
def test_payloads_are_live_when_loaded_carelessly(tmp_path: Path) -> None:
    # Proves the test above can fail: the same files, unpickled without restriction in a throw-away
    # interpreter, all leave their trace (marker file created, or victim folder deleted).
    workspaces = []
    for p in PAYLOADS:
        ws = tmp_path / p.name
        ws.mkdir()
        workspaces.append((p, ws, p.write(ws)))
    detonate([path for _, _, path in workspaces])
    deadline = time.monotonic() + 15  # Popen-style payloads finish after the interpreter exits
    while (duds := [p.name for p, ws, _ in workspaces if not p.fired(ws)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert duds == []
