"""ONNX export, onnxruntime sessions, the on-disk cache and the ForwardEncoders facade (real onnxruntime)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import onnx
import pytest
import torch
from click.testing import CliRunner

from scanner.accel import STATS, ForwardEncoders, cached_image_features, reset_registry, top1_agreement
from scanner.accel.cache import CacheKey, OnnxCache
from scanner.accel.export import ExportError, example_inputs, export_encoder
from scanner.accel.quantize import output_projection, quantize_int8
from scanner.accel.sessions import CPU, CUDA, _cpuinfo_physical_cores, provider_options, select_providers
from scanner.clip import ClipBackbone

ATOL = 1e-4


@pytest.fixture(scope="module")
def warm_cache(tmp_path_factory: pytest.TempPathFactory, random_backbone: ClipBackbone) -> Path:
    """A cache folder holding the fp32 graphs of the random-init tiny backbone."""
    root = tmp_path_factory.mktemp("onnx-cache")
    reset_registry()
    enc = ForwardEncoders.for_backbone(random_backbone, cache_dir=root)
    assert (enc.image_backend, enc.text_backend) == ("onnx-fp32", "onnx-fp32")
    return root


def _torch_image(bb: ClipBackbone, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return bb.encode_image(x)


# --------------------------------------------------------------------- sessions
def test_provider_selection_prefers_cuda_only_when_present_and_built() -> None:
    # The GPU path cannot run here; the decision itself is a pure function and is checked in full.
    assert select_providers([CUDA, CPU], gpu_present=True) == [CUDA, CPU]
    assert select_providers([CUDA, CPU], gpu_present=False) == [CPU]
    assert select_providers(["AzureExecutionProvider", CPU], gpu_present=True) == [CPU]


def test_cuda_provider_keeps_fp32_by_turning_tf32_off() -> None:
    # onnxruntime's CUDA provider defaults to TF32 products: 1.9e-3 from torch fp32 on ViT-B/16 (H100)
    assert provider_options([CUDA, CPU]) == [(CUDA, {"use_tf32": "0"}), CPU]
    assert provider_options([CPU]) == [CPU]


def test_physical_cores_ignores_hyperthreads() -> None:
    block = "processor\t: {p}\nphysical id\t: 0\ncore id\t\t: {c}\n\n"
    text = "".join(block.format(p=p, c=p // 2) for p in range(8))  # 8 logical CPUs on 4 cores
    assert _cpuinfo_physical_cores(text) == 4


# --------------------------------------------------------------------- export
@pytest.mark.parametrize("which", ["image", "text"])
def test_export_checks_and_matches_torch(random_backbone: ClipBackbone, tmp_path: Path, which: str) -> None:
    res = export_encoder(random_backbone, which, tmp_path / f"{which}.onnx")  # type: ignore[arg-type]
    assert res.exporter == "legacy"  # the default first choice (see export.py)
    assert res.parity_max_abs_diff <= ATOL
    onnx.checker.check_model(str(res.path))


@pytest.mark.slow
def test_dynamo_fallback_exporter_matches_torch(random_backbone: ClipBackbone, tmp_path: Path) -> None:
    res = export_encoder(random_backbone, "text", tmp_path / "text.onnx", exporters=("dynamo",))
    assert res.exporter == "dynamo" and res.parity_max_abs_diff <= ATOL


def test_facade_matches_torch_with_dynamic_batch(random_backbone: ClipBackbone, warm_cache: Path) -> None:
    enc = ForwardEncoders.for_backbone(random_backbone, cache_dir=warm_cache)
    x = torch.rand(5, 3, 64, 64)
    got = enc.encode_images(x, batch_size=2)  # chunks of 2, 2, 1
    assert got.shape == (5, random_backbone.embed_dim)
    assert float((got - _torch_image(random_backbone, x)).abs().max()) <= ATOL
    embeds, eot = example_inputs(random_backbone, "text", 7, seed=5)
    with torch.no_grad():
        ref = random_backbone.encode_prompts(embeds, eot)
    assert float((enc.encode_prompts(embeds, eot, batch_size=3) - ref).abs().max()) <= ATOL
    with pytest.raises(ValueError, match="expected pixels of shape"):
        enc.encode_images(torch.rand(2, 3, 32, 32))


# --------------------------------------------------------------------- sharing and cache reuse
def test_second_model_on_same_backbone_exports_and_encodes_nothing(
    random_backbone: ClipBackbone, warm_cache: Path
) -> None:
    pool = torch.rand(12, 3, 64, 64)
    first = ForwardEncoders.for_backbone(random_backbone, cache_dir=warm_cache)
    f1 = cached_image_features(first, pool, "pool-A")
    exports, sessions, encodes = STATS.exports_performed, STATS.sessions_created, STATS.pool_encodes
    second = ForwardEncoders.for_backbone(random_backbone, cache_dir=warm_cache)  # "scanning model #2"
    f2 = cached_image_features(second, pool, "pool-A")
    assert second is first
    assert (STATS.exports_performed, STATS.sessions_created, STATS.pool_encodes) == (
        exports,
        sessions,
        encodes,
    )
    assert torch.equal(f1, f2)
    cached_image_features(second, pool[:4], "pool-B")
    assert STATS.pool_encodes == encodes + 1


def test_fresh_registry_reuses_disk_cache(random_backbone: ClipBackbone, warm_cache: Path) -> None:
    reset_registry()
    exports, sessions = STATS.exports_performed, STATS.sessions_created
    ForwardEncoders.for_backbone(random_backbone, cache_dir=warm_cache)
    assert STATS.exports_performed == exports
    assert STATS.sessions_created == sessions + 2


_CHILD = textwrap.dedent(
    """
    import json, sys, time, pathlib, torch
    torch.set_num_threads(1)
    from scanner.clip import create_backbone
    from scanner.accel import STATS, ForwardEncoders
    bb = create_backbone("scanner-tiny", seed=0)
    go = pathlib.Path(sys.argv[2])
    while not go.exists():  # start line: every child exports at the same moment
        time.sleep(0.02)
    enc = ForwardEncoders.for_backbone(bb, cache_dir=pathlib.Path(sys.argv[1]), threads=1)
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        diff = float((enc.encode_images(x) - bb.encode_image(x)).abs().max())
    print(json.dumps({"exports": STATS.exports_performed, "backend": enc.image_backend, "diff": diff}))
    """
)


def _children(root: Path, n: int, go: Path) -> list[dict[str, Any]]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(root), str(go)],
            stdout=subprocess.PIPE,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(n)
    ]
    time.sleep(0.2)
    go.touch()
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=240)
        assert p.returncode == 0, stderr[-2000:]
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


@pytest.mark.slow
def test_two_processes_exporting_at_once_export_each_graph_once(
    random_backbone: ClipBackbone, tmp_path: Path
) -> None:
    root = tmp_path / "shared-cache"
    both = _children(root, 2, tmp_path / "go")
    # One image and one text graph in total: whichever process waited on a lock found the other's file.
    assert sum(int(r["exports"]) for r in both) == 2
    assert all(r["backend"] == "onnx-fp32" and float(r["diff"]) <= ATOL for r in both)
    assert not list(root.glob("*.tmp"))
    reset_registry()
    exports = STATS.exports_performed
    ForwardEncoders.for_backbone(random_backbone, cache_dir=root)  # a third process would see the same
    assert STATS.exports_performed == exports


# --------------------------------------------------------------------- bad input
def test_corrupt_cached_graph_is_reexported(
    random_backbone: ClipBackbone, warm_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (graph,) = warm_cache.glob("scanner-tiny-image-fp32-*.onnx")
    data = bytearray(graph.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\x00" * 64  # corrupt weights, still parseable protobuf
    graph.write_bytes(bytes(data))
    reset_registry()
    exports = STATS.exports_performed
    with caplog.at_level(logging.WARNING):
        enc = ForwardEncoders.for_backbone(random_backbone, cache_dir=warm_cache)
    assert "corrupt or stale" in caplog.text
    assert STATS.exports_performed == exports + 1  # only the image graph
    x = torch.rand(4, 3, 64, 64)
    assert float((enc.encode_images(x) - _torch_image(random_backbone, x)).abs().max()) <= ATOL
    assert OnnxCache(warm_cache).load(_image_key(enc)) is not None


def _image_key(enc: ForwardEncoders) -> CacheKey:
    from scanner.accel.encoders import _key

    return _key(enc.backbone, "image", "fp32")


def test_unwritable_cache_folder_falls_back_to_temp(
    random_backbone: ClipBackbone, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache folder should be")
    reset_registry()
    with caplog.at_level(logging.WARNING):
        enc = ForwardEncoders.for_backbone(random_backbone, cache_dir=blocker / "onnx")
    assert "cannot be written" in caplog.text and "temporary folder" in caplog.text
    assert enc.image_backend == "onnx-fp32" and enc.fallbacks == 0
    x = torch.rand(2, 3, 64, 64)
    assert float((enc.encode_images(x) - _torch_image(random_backbone, x)).abs().max()) <= ATOL


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_cache_with_valid_graphs_is_used(random_backbone: ClipBackbone, warm_cache: Path) -> None:
    reset_registry()
    ForwardEncoders.for_backbone(random_backbone, cache_dir=warm_cache)  # make sure both graphs are valid
    reset_registry()
    warm_cache.chmod(0o555)
    try:
        exports = STATS.exports_performed
        enc = ForwardEncoders.for_backbone(random_backbone, cache_dir=warm_cache)
        assert STATS.exports_performed == exports and enc.image_backend == "onnx-fp32"
    finally:
        warm_cache.chmod(0o755)


class _UnexportableBackbone(ClipBackbone):
    """The tiny backbone with an eigen-decomposition in its image path: no ONNX translation exists."""

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        f = super().encode_image(pixels)  # (B, E)
        w = torch.linalg.eigvalsh(f.T @ f + torch.eye(f.shape[1]))  # (E,)
        return f + 0.0 * w[:1]


@pytest.mark.slow
def test_export_failure_falls_back_to_torch(
    random_backbone: ClipBackbone, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    odd = _UnexportableBackbone(random_backbone.model, "unexportable")
    with pytest.raises(ExportError, match="could not be exported"):
        export_encoder(odd, "image", tmp_path / "x.onnx")
    events: list[tuple[str, dict[str, str]]] = []
    fallbacks = STATS.fallbacks
    with caplog.at_level(logging.WARNING):
        enc = ForwardEncoders.for_backbone(
            odd, cache_dir=tmp_path / "c", metrics_hook=lambda e, labels: events.append((e, dict(labels)))
        )
    assert enc.image_backend == "torch" and enc.text_backend == "onnx-fp32"
    assert enc.fallbacks == 1 and STATS.fallbacks == fallbacks + 1
    assert ("torch_fallback", {"encoder": "image", "reason": "export"}) in events
    assert "using torch" in caplog.text
    x = torch.rand(3, 3, 64, 64)
    assert torch.allclose(enc.encode_images(x), odd.encode_image(x).detach(), atol=1e-6)


# --------------------------------------------------------------------- int8
def test_top1_agreement_counts_argmax_matches() -> None:
    text = torch.eye(3)  # three classes along the axes
    ref = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0.2, 0]])
    cand = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [0.2, 1, 0]])  # last row flips class 0 → 1
    assert top1_agreement(ref, cand, text) == pytest.approx(0.75)
    assert top1_agreement(ref, ref, text) == 1.0


def test_int8_gate_accepts_and_rejects(random_backbone: ClipBackbone, warm_cache: Path) -> None:
    gate = torch.rand(48, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    reset_registry()
    enc = ForwardEncoders.for_backbone(random_backbone, cache_dir=warm_cache, quantize=True, gate_pixels=gate)
    assert enc.int8_agreement is not None and enc.int8_agreement >= 0.99
    assert enc.image_backend == "onnx-int8"
    x = torch.rand(6, 3, 64, 64)
    cos = torch.nn.functional.cosine_similarity(
        enc.encode_images(x), _torch_image(random_backbone, x), dim=-1
    )
    assert float(cos.min()) > 0.99
    exports = STATS.exports_performed
    strict = ForwardEncoders.for_backbone(
        random_backbone, cache_dir=warm_cache, quantize=True, gate_pixels=gate, min_agreement=1.01
    )
    assert strict.image_backend == "onnx-fp32"  # the same measured agreement now fails the gate
    assert STATS.exports_performed == exports  # the gate result was read from the sidecar, not re-measured


def test_int8_keeps_the_output_projection_in_fp32(random_backbone: ClipBackbone, warm_cache: Path,
                                                  tmp_path: Path) -> None:
    # the tower's last product (one token per image) carries most of int8's error for no speed
    graph = OnnxCache(warm_cache).load(_image_key(ForwardEncoders.for_backbone(random_backbone, cache_dir=warm_cache)))
    assert graph is not None
    src = onnx.load(str(graph.path), load_external_data=False)
    keep = output_projection(src)
    products = [n.name for n in src.graph.node if n.op_type in ("MatMul", "Gemm")]
    assert keep == [products[-1]] and "resblocks" not in keep[0]  # found by structure: the nearest to the output
    dst = tmp_path / "int8.onnx"
    quantize_int8(graph.path, dst)
    out = onnx.load(str(dst), load_external_data=False)
    ops = {n.name: n.op_type for n in out.graph.node}
    assert ops[keep[0]] == "MatMul"  # untouched, fp32 weights
    assert sum(op == "MatMulInteger" for op in ops.values()) >= 10  # the blocks' weight products are int8
    no_output: onnx.ModelProto = onnx.helper.make_model(onnx.helper.make_graph([], "empty", [], []))
    assert output_projection(no_output) == []


# --------------------------------------------------------------------- CLI
def test_cli_export_reports_cache_hit(warm_cache: Path) -> None:
    from scanner.cli import main

    res = CliRunner().invoke(main, ["onnx", "export", "scanner-tiny", "--cache-dir", str(warm_cache)])
    assert res.exit_code == 0, res.output
    assert "image encoder: onnx-fp32" in res.output
    assert "graphs exported now: 0" in res.output
