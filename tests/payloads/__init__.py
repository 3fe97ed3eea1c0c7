"""Malicious checkpoint generators for the safe-loading tests.

Nothing hostile is stored in the repository: every payload is built at test time inside a temporary
workspace. Each one, if it were ever unpickled, leaves a trace there (a ``PWNED`` marker file, or a
deleted ``victim`` folder), so a test can prove it was *not* executed — and a separate test proves each
payload is live by executing all of them in a throw-away subprocess.
"""

from __future__ import annotations

import base64
import builtins
import codecs
import ctypes
import importlib
import os
import pickle
import pty
import runpy
import shutil
import socket
import struct
import subprocess
import sys
import webbrowser
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

MARKER = "PWNED"
VICTIM = "victim"
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class Call:
    """Pickles as ``func(*args)`` (a REDUCE); nests, so ``Call(Call(getattr, x, "system"), cmd)`` works."""

    def __init__(self, func: Any, *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (self.func, self.args)

    def __call__(self, *args: Any) -> Any:  # pickle insists a REDUCE target is callable
        raise AssertionError("payload builders never run payloads")


def _marker(ws: Path) -> str:
    return str(ws / MARKER)


def _cmd(ws: Path) -> str:
    return f"touch {_marker(ws)}"


def _code(ws: Path) -> str:
    return f"open({_marker(ws)!r}, 'w').close()"


def _fired_marker(ws: Path) -> bool:
    return (ws / MARKER).exists()


def _fired_victim(ws: Path) -> bool:
    return not (ws / VICTIM).exists()


def _arm_victim(ws: Path) -> None:
    (ws / VICTIM).mkdir(exist_ok=True)
    (ws / VICTIM / "keep.txt").write_text("precious")


@dataclass(frozen=True)
class Payload:
    """One hostile file: how to build its pickle, which container holds it, which global gives it away."""

    name: str
    container: str  # "raw" | "zip" | "legacy" | "torchscript" | "torchscript-constants"
    suffix: str
    expected: frozenset[str]  # at least one of these must be named by the scanner
    make: Callable[[Path], Any]  # workspace → pickle bytes, or an object that pickles hostile
    protocol: int = 2
    fired: Callable[[Path], bool] = _fired_marker
    arm: Callable[[Path], None] = field(default=lambda ws: None)

    def write(self, ws: Path) -> Path:
        """Build the file inside ``ws`` (armed) and return its path."""
        self.arm(ws)
        path = ws / f"{self.name}{self.suffix}"
        payload = self.make(ws)
        data = payload if isinstance(payload, bytes) else pickle.dumps(payload, protocol=self.protocol)
        if self.container == "raw":
            path.write_bytes(data)
        elif self.container == "zip":
            if isinstance(payload, bytes):
                write_torch_zip(path, data)
            else:  # the real torch.save zip writer, with the hostile object inside
                torch.save(payload, path)
        elif self.container == "legacy":
            write_legacy(path, data)
        elif self.container == "torchscript":
            write_torchscript_like(path, data_pkl=data, constants_pkl=pickle.dumps((), protocol=2))
        elif self.container == "torchscript-constants":
            write_torchscript_like(path, data_pkl=pickle.dumps({}, protocol=2), constants_pkl=data)
        else:
            raise ValueError(self.container)
        return path


def write_torch_zip(path: Path, data_pkl: bytes, *, prefix: str = "archive") -> None:
    """A zip laid out like ``torch.save``'s (``archive/data.pkl``, ``version``, ``byteorder``)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{prefix}/data.pkl", data_pkl)
        zf.writestr(f"{prefix}/byteorder", "little")
        zf.writestr(f"{prefix}/version", "3\n")


def write_legacy(path: Path, main_pickle: bytes) -> None:
    """torch's legacy (pre-1.6, non-zip) layout: magic, protocol, sys_info, the object, storage keys."""
    sys_info = {"protocol_version": 1001, "little_endian": True,
                "type_sizes": {"short": 2, "int": 4, "long": 4}}
    with path.open("wb") as fh:
        fh.write(pickle.dumps(_LEGACY_MAGIC, protocol=2))
        fh.write(pickle.dumps(1001, protocol=2))
        fh.write(pickle.dumps(sys_info, protocol=2))
        fh.write(main_pickle)
        fh.write(pickle.dumps([], protocol=2))


def write_torchscript_like(path: Path, *, data_pkl: bytes, constants_pkl: bytes) -> None:
    """A zip shaped like ``torch.jit.save`` output (``constants.pkl`` marks it as TorchScript)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("model/data.pkl", data_pkl)
        zf.writestr("model/constants.pkl", constants_pkl)
        zf.writestr("model/code/__torch__/model.py", "class Model(Module):\n  pass\n")
        zf.writestr("model/version", "3\n")


def _short_unicode(s: str) -> bytes:
    raw = s.encode()
    return b"\x8c" + bytes([len(raw)]) + raw


def _stack_global_memo(ws: Path) -> bytes:
    """Protocol 4, names routed through the memo with decoys in between (defeats 'last two strings')."""
    ops = [b"\x80\x04",
           _short_unicode("os"), b"\x94",            # memo[0] = "os"
           _short_unicode("system"), b"\x94",        # memo[1] = "system"
           b"0", b"0",                               # POP POP
           _short_unicode("collections"), _short_unicode("OrderedDict"), b"0", b"0",  # decoys, popped
           b"h\x00", b"h\x01", b"\x93",              # BINGET 0, BINGET 1, STACK_GLOBAL → os.system
           _short_unicode(_cmd(ws)), b"\x85", b"R", b"."]  # TUPLE1 REDUCE STOP
    return b"".join(ops)


def _dassl(extra: dict[str, Any]) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    state = OrderedDict(ctx=torch.randn(4, 8, generator=gen),
                        token_prefix=torch.randn(3, 1, 8, generator=gen))
    return {"state_dict": state, "epoch": 10, "optimizer": None, "scheduler": None, **extra}


def _importlib_chain(ws: Path) -> bytes:
    system = Call(builtins.getattr, Call(importlib.import_module, "os"), "system")
    return pickle.dumps(Call(system, _cmd(ws)), protocol=2)


def _socket_bind(ws: Path) -> Any:
    # AF_UNIX as a plain int (the enum would pickle as a global too); binding creates the marker file
    bind = Call(builtins.getattr, Call(socket.socket, int(socket.AF_UNIX)), "bind")
    return Call(bind, _marker(ws))


def _rot13_eval(ws: Path) -> bytes:
    decoded = Call(codecs.decode, codecs.encode(_code(ws), "rot13"), "rot13")
    return pickle.dumps(Call(builtins.eval, decoded), protocol=2)


def _optimizer_nested(ws: Path) -> bytes:
    hidden = {"y": Call(subprocess.Popen, ["touch", _marker(ws)])}
    optimizer = {"state": {0: {"momentum_buffer": torch.zeros(2), "x": [1, hidden]}},
                 "param_groups": [{"lr": 0.1, "params": [0]}]}
    return pickle.dumps(_dassl({"optimizer": optimizer}), protocol=2)


def _b64_exec(ws: Path) -> Any:
    return Call(builtins.exec, Call(base64.b64decode, base64.b64encode(_code(ws).encode())))


PAYLOADS: tuple[Payload, ...] = (
    Payload("os_system_global_p0", "raw", ".pkl", frozenset({"os.system"}),
            lambda ws: b"cos\nsystem\n(V" + _cmd(ws).encode() + b"\ntR."),
    Payload("posix_system_reduce_zip", "zip", ".pth", frozenset({"posix.system", "os.system"}),
            lambda ws: Call(os.system, _cmd(ws))),
    Payload("posix_system_p4_ckpt", "raw", ".ckpt", frozenset({"posix.system", "os.system"}),
            lambda ws: Call(os.system, _cmd(ws)), protocol=4),
    Payload("posix_system_p5_zip", "zip", ".pt", frozenset({"posix.system", "os.system"}),
            lambda ws: pickle.dumps(Call(os.system, _cmd(ws)), protocol=5)),
    Payload("stack_global_memo_zip", "zip", ".pth", frozenset({"os.system"}), _stack_global_memo),
    Payload("inst_opcode_p0", "raw", ".pkl", frozenset({"os.system"}),
            lambda ws: b"(V" + _cmd(ws).encode() + b"\nios\nsystem\n."),
    Payload("obj_opcode_p1_legacy", "legacy", ".pth", frozenset({"os.system"}),
            lambda ws: b"(cos\nsystem\nX" + struct.pack("<I", len(_cmd(ws))) + _cmd(ws).encode() + b"o."),
    Payload("subprocess_popen_zip", "zip", ".pth.tar", frozenset({"subprocess.Popen"}),
            lambda ws: Call(subprocess.Popen, ["touch", _marker(ws)])),
    Payload("subprocess_check_output_legacy", "legacy", ".pth", frozenset({"subprocess.check_output"}),
            lambda ws: pickle.dumps(Call(subprocess.check_output, ["touch", _marker(ws)]), protocol=2)),
    Payload("subprocess_call_ckpt", "raw", ".ckpt", frozenset({"subprocess.call"}),
            lambda ws: Call(subprocess.call, ["touch", _marker(ws)])),
    Payload("builtins_exec_zip", "zip", ".pth", frozenset({"builtins.exec"}),
            lambda ws: Call(builtins.exec, _code(ws))),
    Payload("builtins_eval_zip", "zip", ".pth", frozenset({"builtins.eval"}),
            lambda ws: Call(builtins.eval, _code(ws))),
    Payload("getattr_import_chain_zip", "zip", ".pth", frozenset({"builtins.getattr", "builtins.__import__"}),
            lambda ws: Call(Call(builtins.getattr, Call(builtins.__import__, "os"), "system"), _cmd(ws))),
    Payload("runpy_zip", "zip", ".pth", frozenset({"runpy._run_module_code"}),
            lambda ws: Call(runpy._run_module_code, _code(ws), None, "pwn")),  # type: ignore[attr-defined]
    Payload("importlib_chain_legacy", "legacy", ".pth", frozenset({"importlib.import_module"}),
            _importlib_chain),
    Payload("pty_spawn_zip", "zip", ".pth", frozenset({"pty.spawn"}),
            lambda ws: Call(pty.spawn, ["touch", _marker(ws)])),
    Payload("webbrowser_open_zip", "zip", ".pth", frozenset({"webbrowser.open"}),
            lambda ws: Call(webbrowser.open, _marker(ws))),
    Payload("shutil_rmtree_zip", "zip", ".pth", frozenset({"shutil.rmtree"}),
            lambda ws: Call(shutil.rmtree, str(ws / VICTIM)), fired=_fired_victim, arm=_arm_victim),
    Payload("socket_bind_zip", "zip", ".pth", frozenset({"socket.socket"}),
            _socket_bind),
    Payload("ctypes_libc_system_zip", "zip", ".pth", frozenset({"ctypes.CDLL"}),
            lambda ws: Call(Call(builtins.getattr, Call(ctypes.CDLL, None), "system"), _cmd(ws).encode())),
    Payload("nested_pickle_loads_zip", "zip", ".pth", frozenset({"_pickle.loads", "pickle.loads"}),
            lambda ws: Call(pickle.loads, pickle.dumps(Call(os.system, _cmd(ws)), protocol=2))),
    Payload("base64_exec_zip", "zip", ".pth", frozenset({"builtins.exec", "base64.b64decode"}), _b64_exec),
    Payload("codecs_rot13_eval_legacy", "legacy", ".pth", frozenset({"builtins.eval", "_codecs.decode"}),
            _rot13_eval),
    Payload("dassl_epoch_evil_zip", "zip", ".pth.tar-10", frozenset({"posix.system", "os.system"}),
            lambda ws: _dassl({"epoch": Call(os.system, _cmd(ws))})),
    Payload("dassl_optimizer_nested_legacy", "legacy", ".pth.tar", frozenset({"subprocess.Popen"}),
            _optimizer_nested),
    Payload("dassl_ckpt_zip", "zip", ".ckpt", frozenset({"builtins.exec"}),
            lambda ws: _dassl({"hyper_parameters": Call(builtins.exec, _code(ws))})),
    Payload("torchscript_data_pkl", "torchscript", ".pt", frozenset({"posix.system", "os.system"}),
            lambda ws: Call(os.system, _cmd(ws))),
    Payload("torchscript_constants_pkl", "torchscript-constants", ".pt",
            frozenset({"posix.system", "os.system"}),
            lambda ws: Call(os.system, _cmd(ws))),
)


# Executed in a throw-away interpreter by the liveness test: unpickles every .pkl stream of each file
# with no restriction at all (what a careless loader would do).
DETONATOR = r"""
import io, os, pickle, sys, time, zipfile

class Careless(pickle.Unpickler):
    def persistent_load(self, pid):
        return None

import torch

for path in sys.argv[1:]:
    try:
        torch.load(path, weights_only=False)  # real torch containers: storages and all
    except Exception:
        pass
    try:
        if zipfile.is_zipfile(path):
            zf = zipfile.ZipFile(path)
            for name in zf.namelist():
                if name.endswith(".pkl"):
                    try:
                        Careless(io.BytesIO(zf.read(name))).load()
                    except Exception:
                        pass
        else:
            with open(path, "rb") as fh:
                for _ in range(5):
                    Careless(fh).load()
    except Exception:
        pass
time.sleep(0.5)  # let Popen-style payloads finish touching their marker
"""


def detonate(paths: list[Path], timeout: float = 60.0) -> None:
    """Unpickle ``paths`` carelessly in a subprocess (``BROWSER`` points webbrowser at ``touch``)."""
    env = {**os.environ, "BROWSER": "touch %s"}
    subprocess.run([sys.executable, "-c", DETONATOR, *map(str, paths)], env=env, timeout=timeout, check=False,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


__all__ = ["MARKER", "PAYLOADS", "Call", "Payload", "detonate", "write_legacy", "write_torch_zip",
           "write_torchscript_like"]
