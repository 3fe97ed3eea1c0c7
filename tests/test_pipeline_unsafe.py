"""Malicious pickles through the whole pipeline: each is reported ``unsafe`` and none ever runs.

Every payload would create a marker file (or delete a sentinel directory) if anything unpickled it. They
are written in the places a provider would put them: bare files, Dassl model directories, nested inside
the Dassl dict, in torch's zip and legacy formats, and as hand-assembled opcode streams.
"""

from __future__ import annotations

import importlib
import os
import pickle
import runpy
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from scanner.pipeline import scan_path
from scanner.report import ExitCode, Verdict


class Reduce:
    """Pickles as ``func(*args)``."""

    def __init__(self, func: Callable[..., Any], *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (self.func, self.args)


def _raw(obj: Any, protocol: int) -> Callable[[Path], object]:
    return lambda p: p.write_bytes(pickle.dumps(obj, protocol=protocol))


def _torch(obj: Any, *, legacy: bool = False) -> Callable[[Path], object]:
    return lambda p: torch.save(obj, p, _use_new_zipfile_serialization=not legacy)


def _bytes(data: bytes) -> Callable[[Path], object]:
    return lambda p: p.write_bytes(data)


def _s(text: str) -> bytes:
    """SHORT_BINUNICODE opcode."""
    raw = text.encode()
    return b"\x8c" + bytes([len(raw)]) + raw


def payloads(marker: Path, sentinel: Path) -> dict[str, tuple[str, Callable[[Path], object]]]:
    """name -> (relative file path in the registry, writer)."""
    touch = f"touch {marker}"
    argv = ["touch", str(marker)]
    ctx = torch.zeros(4, 128)
    system = Reduce(os.system, touch)
    return {
        "os.system-p2": ("a.pth", _raw(system, 2)),
        "os.system-p0": ("b.pth", _raw(system, 0)),
        "os.system-p4": ("c.pth", _raw(system, 4)),
        "os.system-p5": ("d.ckpt", _raw(system, 5)),
        "subprocess.Popen": ("e.pth.tar", _raw(Reduce(subprocess.Popen, argv), 4)),
        "subprocess.check_output": ("f.pth", _raw(Reduce(subprocess.check_output, argv), 2)),
        "exec": ("g.pth", _raw(Reduce(exec, f"open({str(marker)!r}, 'w')"), 2)),
        "eval": ("h.pth", _raw(Reduce(eval, f"open({str(marker)!r}, 'w')"), 4)),
        "shutil.rmtree": ("i.pth", _raw(Reduce(shutil.rmtree, str(sentinel)), 2)),
        "open-write": ("j.pth", _raw(Reduce(open, str(marker), "w"), 2)),
        "nested-in-dassl-optimizer": (
            "k/prompt_learner/model.pth.tar-3",
            _torch({"state_dict": {"ctx": ctx}, "epoch": 3, "optimizer": {"state": system}}),
        ),
        "nested-in-state-dict": (
            "l/prompt_learner/model-best.pth.tar",
            _torch({"state_dict": {"ctx": ctx, "token_suffix": system}}),
        ),
        "deeply-nested-list": ("m.pth", _torch({"a": [[[{"b": (system,)}]]]})),
        "torch-legacy-format": ("n/prompt_learner/model.pth.tar-1",
                                _torch({"state_dict": {"ctx": ctx}, "x": system}, legacy=True)),
        "lightning-ckpt": ("o.ckpt", _torch({"state_dict": {"prompt_learner.ctx": ctx},
                                             "callbacks": Reduce(eval, "1")})),
        # hand-assembled streams: opcodes a naive "GLOBAL only" scanner would miss
        "INST-opcode": ("p.pth", _bytes(b"(S'" + touch.encode() + b"'\nios\nsystem\n.")),
        "OBJ-opcode": ("q.pth", _bytes(b"\x80\x02(cos\nsystem\nX" + len(touch).to_bytes(4, "little")
                                        + touch.encode() + b"o.")),
        "STACK_GLOBAL-through-memo": ("r.pth", _bytes(
            b"\x80\x04" + _s("os") + b"\x94" + _s("system") + b"\x94" + b"00"  # memoize both, pop both
            + b"h\x00h\x01\x93" + _s(touch) + b"\x85R.")),  # BINGET 0, BINGET 1, STACK_GLOBAL, call
        "getattr-chain": ("s.pth", _bytes(
            b"\x80\x04" + _s("builtins") + _s("getattr") + b"\x93"
            + _s("builtins") + _s("__import__") + b"\x93" + _s("os") + b"\x85R"
            + _s("system") + b"\x86R" + _s(touch) + b"\x85R.")),
        "importlib.import_module": ("t.pth", _raw(Reduce(importlib.import_module, "antigravity"), 2)),
        "runpy": ("u.pth", _raw(Reduce(runpy.run_path, "/dev/null"), 2)),
        "copyreg-extension": ("v.pth", _bytes(b"\x80\x02\x82\x01)R.")),  # EXT1 code 1
    }


@pytest.fixture(scope="module")
def unsafe_scan(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, dict[str, Any]]:
    base = tmp_path_factory.mktemp("unsafe")
    root, marker, sentinel = base / "registry", base / "PWNED", base / "sentinel"
    sentinel.mkdir()
    cases = payloads(marker, sentinel)
    for rel, write in cases.values():
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        write(target)
    report = scan_path(root)
    return root, marker, sentinel, {"report": report, "cases": cases}


def test_at_least_twenty_distinct_payloads(unsafe_scan: tuple[Path, Path, Path, dict[str, Any]]) -> None:
    assert len(unsafe_scan[3]["cases"]) >= 20


def test_every_payload_is_unsafe_and_none_ran(unsafe_scan: tuple[Path, Path, Path, dict[str, Any]]) -> None:
    root, marker, sentinel, data = unsafe_scan
    report, cases = data["report"], data["cases"]
    by_unit = {Path(m.path).relative_to(root).parts[0]: m for m in report.models}
    assert not marker.exists(), "a payload executed"
    assert sentinel.is_dir(), "shutil.rmtree payload executed"
    for name, (rel, _) in cases.items():
        m = by_unit[Path(rel).parts[0]]
        assert m.verdict is Verdict.UNSAFE, (name, m.verdict, m.message)
        assert m.unsafe_globals, name
        assert m.category == "unsafe"
    assert report.exit_code() is ExitCode.FLAGGED
