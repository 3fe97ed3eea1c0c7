"""Safe loading of honest files, and clear errors for broken ones (real files written in tmp dirs)."""

from __future__ import annotations

import json
import struct
import sys
import types
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from payloads import write_torch_zip

from scanner.errors import CheckpointError, UnsafeFileError
from scanner.safeload import (
    InertObject,
    allowed_globals,
    check_torch_file,
    is_torchscript_archive,
    load_torchscript_tensors,
    safe_load_safetensors,
    safe_torch_load,
    scan_pickle_globals,
)


def _dassl_checkpoint() -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    ctx = torch.nn.Parameter(torch.randn(16, 512, generator=gen))
    opt = torch.optim.SGD([ctx], lr=0.002, momentum=0.9)
    ctx.grad = torch.ones_like(ctx)
    opt.step()  # gives the optimizer state a momentum_buffer tensor
    adam = torch.optim.Adam([ctx], lr=1e-3)
    adam.step()
    return {
        "state_dict": OrderedDict(
            ctx=ctx.detach().clone(),
            token_prefix=torch.randn(10, 1, 512, generator=gen).half(),
            token_suffix=torch.randn(10, 60, 512, generator=gen).half(),
        ),
        "epoch": 50,
        "optimizer": opt.state_dict(),
        "adam": adam.state_dict(),  # nested dicts, lists, tuples (betas), scalar tensors (step)
        "scheduler": None,
        "val_result": 0.75,
        "misc": {"classes": ["cat", "dog"], "flags": {1, 2}, "shape": torch.Size([3, 4]),
                 "blob": b"\x00\x01"},
    }


def _assert_same(a: Any, b: Any) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert set(a) == set(b)
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)
    else:
        assert a == b


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize("name", ["model.pth.tar-50", "model-best.pth.tar", "last.ckpt"])
def test_real_dassl_checkpoint_loads(tmp_path: Path, zip_format: bool, name: str) -> None:
    ck = _dassl_checkpoint()
    path = tmp_path / name
    torch.save(ck, path, _use_new_zipfile_serialization=zip_format)

    found = scan_pickle_globals(path)
    assert "torch._utils._rebuild_tensor_v2" in found and "collections.OrderedDict" in found
    assert set(found) <= allowed_globals()
    check_torch_file(path)
    _assert_same(ck, safe_torch_load(path))


def test_dassl_warmup_scheduler_objects_load_as_inert_records(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # Dassl's ConstantWarmupScheduler keeps its successor scheduler (and that one its optimizer) in
    # __dict__, so real CoOp checkpoints pickle those objects. They must load without being imported.
    class ConstantWarmupScheduler(torch.optim.lr_scheduler.LRScheduler):
        def __init__(self, optimizer: torch.optim.Optimizer, successor: Any, warmup_epoch: int,
                     cons_lr: float) -> None:
            self.successor, self.warmup_epoch, self.cons_lr = successor, warmup_epoch, cons_lr
            super().__init__(optimizer)

        def get_lr(self) -> list[float | torch.Tensor]:
            return [self.cons_lr for _ in self.base_lrs]

    module = types.ModuleType("dassl.optim.lr_scheduler")
    ConstantWarmupScheduler.__module__ = module.__name__
    ConstantWarmupScheduler.__qualname__ = "ConstantWarmupScheduler"
    module.ConstantWarmupScheduler = ConstantWarmupScheduler  # type: ignore[attr-defined]
    for name in ("dassl", "dassl.optim"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, module.__name__, module)

    ctx = torch.nn.Parameter(torch.randn(4, 512))
    opt = torch.optim.SGD([ctx], lr=0.002)
    sched = ConstantWarmupScheduler(opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, 50), 1, 1e-5)
    ck = {"state_dict": OrderedDict(ctx=ctx.detach()), "epoch": 1, "optimizer": opt.state_dict(),
          "scheduler": sched.state_dict()}
    path = tmp_path / "model.pth.tar-1"
    torch.save(ck, path)
    found = scan_pickle_globals(path)
    assert "torch.optim.lr_scheduler.CosineAnnealingLR" in found and "torch.optim.sgd.SGD" in found

    loaded = safe_torch_load(path)
    assert torch.equal(loaded["state_dict"]["ctx"], ctx.detach())
    successor = loaded["scheduler"]["successor"]
    assert isinstance(successor, InertObject)
    assert successor.qualname == "torch.optim.lr_scheduler.CosineAnnealingLR"
    assert successor.attrs["T_max"] == 50
    assert isinstance(successor.attrs["optimizer"], InertObject)

    # The same classes in the legacy format (no restricted reader there) stay unsafe, not silently loaded.
    legacy = tmp_path / "legacy.pth.tar"
    torch.save(ck, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeFileError, match="CosineAnnealingLR"):
        safe_torch_load(legacy)


def test_plain_state_dict_and_tensor(tmp_path: Path) -> None:
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)[:, 1:]  # a strided view
    torch.save({"w": t, "i": torch.tensor([1, 2], dtype=torch.int64), "b": torch.tensor([True])},
               tmp_path / "a.pt")
    out = safe_torch_load(tmp_path / "a.pt")
    assert torch.equal(out["w"], t) and out["i"].dtype == torch.int64 and out["b"].item() is True


@pytest.mark.parametrize("content", [b"", b"\x00" * 7, bytes(range(256)) * 13],
                         ids=["empty", "zeros", "bytes"])
def test_garbage_is_a_checkpoint_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "x.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError):
        safe_torch_load(path)


def test_random_bytes_are_a_checkpoint_error(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(1)
    for i in range(20):
        path = tmp_path / f"r{i}.pth"
        path.write_bytes(torch.randint(0, 256, (4096,), generator=gen, dtype=torch.uint8).numpy().tobytes())
        with pytest.raises((CheckpointError, UnsafeFileError)):
            safe_torch_load(path)


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.95])
def test_truncated_zip_is_a_checkpoint_error(tmp_path: Path, keep: float) -> None:
    good = tmp_path / "good.pth"
    torch.save(_dassl_checkpoint(), good)
    data = good.read_bytes()
    bad = tmp_path / "bad.pth"
    bad.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match=r"bad\.pth"):
        safe_torch_load(bad)


def test_truncated_pickle_inside_zip(tmp_path: Path) -> None:
    import pickle

    data = pickle.dumps({"a": [1, 2, 3], "b": "x" * 100}, protocol=2)
    write_torch_zip(tmp_path / "t.pth", data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        check_torch_file(tmp_path / "t.pth")


def test_size_limit(tmp_path: Path) -> None:
    torch.save({"w": torch.zeros(1000)}, tmp_path / "big.pth")
    with pytest.raises(CheckpointError, match="size limit"):
        safe_torch_load(tmp_path / "big.pth", max_bytes=1000)


def test_unreadable_path_is_a_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="cannot read"):
        safe_torch_load(tmp_path / "missing.pth")


# ----------------------------------------------------------------------------- TorchScript
class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln = torch.nn.LayerNorm(8)
        self.attn = torch.nn.MultiheadAttention(8, 2)
        self.register_buffer("mask", torch.triu(torch.ones(3, 3), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln(x)
        return x + self.attn(y, y, y, need_weights=False)[0]


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Parameter(torch.randn(8, 4))
        self.blocks = torch.nn.Sequential(_Block(), _Block())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x) @ self.proj


@pytest.fixture(scope="module")
def traced_net(tmp_path_factory: pytest.TempPathFactory) -> tuple[_Net, Path]:
    torch.manual_seed(0)
    net = _Net().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(net, (torch.randn(3, 1, 8),))
    path = tmp_path_factory.mktemp("ts") / "net.pt"
    traced.save(str(path))
    return net, path


def test_torchscript_archive_tensors_read_without_running_code(traced_net: tuple[_Net, Path]) -> None:
    net, archive = traced_net
    assert is_torchscript_archive(archive)
    found = scan_pickle_globals(archive)
    assert any(g.startswith("__torch__.") for g in found)  # module classes: never imported, only named
    tensors = load_torchscript_tensors(archive)
    ref = net.state_dict()
    assert set(ref) == set(tensors)
    for k, v in ref.items():
        assert torch.equal(tensors[k], v), k
    assert safe_torch_load(archive).keys() == tensors.keys()


def test_torchscript_storage_lying_about_size(tmp_path: Path, traced_net: tuple[_Net, Path]) -> None:
    import zipfile

    traced_archive = traced_net[1]
    bad = tmp_path / "bad.pt"
    with zipfile.ZipFile(traced_archive) as src, zipfile.ZipFile(bad, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("/data/0"):
                data = data[: len(data) // 2]
            dst.writestr(info, data)
    with pytest.raises(CheckpointError, match="bytes"):
        load_torchscript_tensors(bad)


# ----------------------------------------------------------------------------- safetensors
def _write_safetensors(path: Path, header: dict[str, Any], data: bytes, *, n: int | None = None) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if n is None else n) + raw + data)


def test_safetensors_roundtrip(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5)}
    save_file(tensors, str(tmp_path / "m.safetensors"), metadata={"arch": "ViT-B-16"})
    out, meta = safe_load_safetensors(tmp_path / "m.safetensors")
    assert meta == {"arch": "ViT-B-16"}
    assert all(torch.equal(out[k], tensors[k]) for k in tensors)


@pytest.mark.parametrize(
    ("header", "data", "n", "match"),
    [
        ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 64]}}, b"\0" * 16, None, "points at bytes"),
        ({"w": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 16]}}, b"\0" * 16, None,
         "element limit"),
        ({"w": {"dtype": "F32", "shape": [8], "data_offsets": [0, 16]}}, b"\0" * 16, None, "needs 32 bytes"),
        ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}}, b"\0" * 16, None, "points at bytes"),
        ({"w": {"dtype": "EVIL", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16, None, "unknown dtype"),
        ({"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, b"\0" * 16, None, "invalid shape"),
        ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16, 1 << 40,
         "header claims"),
        ({"__metadata__": {"a": 1}}, b"", None, "__metadata__"),
    ],
    ids=["offset-beyond-file", "huge-shape", "size-mismatch", "reversed-offsets", "dtype", "negative-shape",
         "header-length", "metadata-type"],
)
def test_safetensors_lying_header(tmp_path: Path, header: dict[str, Any], data: bytes, n: int | None,
                                  match: str) -> None:
    path = tmp_path / "evil.safetensors"
    _write_safetensors(path, header, data, n=n)
    with pytest.raises(CheckpointError, match=match):
        safe_load_safetensors(path)


def test_safetensors_not_json(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 4) + b"\xff{{{" + b"\0" * 8)
    with pytest.raises(CheckpointError, match="JSON"):
        safe_load_safetensors(path)


def test_a_crafted_string_escape_is_read_silently(tmp_path: Path) -> None:
    # protocol 0: a STRING with an invalid escape (codecs would warn on it), then a dangerous GLOBAL
    path = tmp_path / "escape.pkl"
    path.write_bytes(b"S'\\q'\np0\ncos\nsystem\np1\n0S'x'\n.")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning raised while reading the hostile file fails the test
        assert "os.system" in scan_pickle_globals(path)
        with pytest.raises(UnsafeFileError):
            check_torch_file(path)
