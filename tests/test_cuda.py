"""The CUDA paths: the detector and scan_path with ``device = "cuda"`` give the CPU's verdicts.

Skipped where torch sees no GPU (CI has none); run them on a GPU machine with ``pytest tests/test_cuda.py``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_pipeline_support import CLASSNAMES, build_registry

from scanner.clip.backbone import ClipBackbone
from scanner.engine import DetectorConfig, detect
from scanner.engine.result import DetectionResult
from scanner.pipeline import scan_path
from scanner.prompting.classifier import PromptedCLIP
from scanner.prompting.learners import CoCoOpLearner, CoOpLearner
from scanner.report import Verdict
from scanner.zoo.ood import default_ood_pool

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CFG = DetectorConfig(n_images=240, batch_size=32, bf16=False)


def _pair(model: PromptedCLIP, pool: torch.Tensor, cfg: DetectorConfig) -> tuple[DetectionResult, DetectionResult]:
    cpu = detect(model, pool, cfg, seed=3)
    try:
        gpu = detect(model.to("cuda"), pool.to("cuda"), cfg, seed=3)
    finally:
        model.to("cpu")  # the backbone is a session fixture
    return cpu, gpu


@pytest.mark.parametrize("learner", ["coop", "cocoop"])
@pytest.mark.parametrize("detector", ["ci", "nc", "pixel"])
def test_detect_on_cuda_gives_the_cpu_verdict(bundled_backbone: ClipBackbone, learner: str, detector: str) -> None:
    make = CoOpLearner if learner == "coop" else CoCoOpLearner
    model = PromptedCLIP(bundled_backbone, make(bundled_backbone, CLASSNAMES, n_ctx=4, seed=1))
    pool = default_ood_pool(CFG.n_images, bundled_backbone.image_size, seed=0)
    cpu, gpu = _pair(model, pool, replace(CFG, detector=detector))
    assert gpu.backdoored == cpu.backdoored and gpu.target_index == cpu.target_index
    # the evidence comes back on the CPU whatever ran the search
    assert all(t.device.type == "cpu" for t in [*gpu.trigger_images.values(), *gpu.raw_triggers.values()])
    gpu_scores = torch.tensor([c.anomaly_score for c in gpu.classes])
    cpu_scores = torch.tensor([c.anomaly_score for c in cpu.classes])
    assert torch.isfinite(gpu_scores).all()
    if detector == "ci":
        # fp32 on both; convolutions may use TF32 on the GPU, so scores agree closely, not bit for bit.
        # (NC / Pixel indices divide by a MAD floored at 1e-6: rounding moves them by orders of magnitude.)
        assert float((gpu_scores - cpu_scores).abs().max()) < 0.5, (cpu_scores, gpu_scores)
    assert gpu.ood_sha256 == cpu.ood_sha256


def test_bf16_detection_runs_on_cuda(bundled_backbone: ClipBackbone) -> None:
    model = PromptedCLIP(bundled_backbone, CoOpLearner(bundled_backbone, CLASSNAMES, n_ctx=4, seed=1)).to("cuda")
    pool = default_ood_pool(CFG.n_images, bundled_backbone.image_size, seed=0).to("cuda")
    try:
        a = detect(model, pool, replace(CFG, bf16=True), seed=5)
        b = detect(model, pool, replace(CFG, bf16=True), seed=5)
    finally:
        model.to("cpu")  # the backbone is a session fixture
    assert a.backdoored == b.backdoored and a.target_index == b.target_index
    assert all(torch.isfinite(torch.tensor(c.anomaly_score)) for c in a.classes)


def test_scan_path_on_cuda_matches_cpu(tmp_path_factory: pytest.TempPathFactory) -> None:
    reg = build_registry(tmp_path_factory.getbasetemp() / "cuda-scan-models")
    cpu = scan_path(reg.root, reg.settings())
    gpu = scan_path(reg.root, reg.settings(device="cuda"))
    by_path = {m.path: m for m in cpu.models}
    assert len(gpu.models) == len(cpu.models)
    for m in gpu.models:
        ref = by_path[m.path]
        assert m.verdict is ref.verdict, (Path(m.path).name, m.message)
        assert m.target_class == ref.target_class
    assert any(m.verdict in (Verdict.CLEAN, Verdict.BACKDOORED) for m in gpu.models)


def test_zoo_eval_on_cuda_gives_the_cpu_rows(tmp_path_factory: pytest.TempPathFactory,
                                             bundled_backbone: ClipBackbone) -> None:
    from scanner.prompting.train import TrainConfig
    from scanner.zoo.build import ZooPlan, build_zoo
    from scanner.zoo.detect_eval import evaluate_zoo

    root = tmp_path_factory.mktemp("cuda-zoo")
    build_zoo(root, ZooPlan(datasets=("sizes",), attacks=("badnets",), clean_per_dataset=1, seed=0,
                            train=TrainConfig(epochs=1), ood_size=40), bundled_backbone)
    cpu = evaluate_zoo(root, bundled_backbone, ["ci", "nc"], config=CFG, accel="torch")
    gpu = evaluate_zoo(root, bundled_backbone, ["ci", "nc"], config=CFG, accel="torch", device="cuda")
    assert [(r["id"], r["detector"], r["flagged"], r["target"]) for r in gpu] == \
        [(r["id"], r["detector"], r["flagged"], r["target"]) for r in cpu]
    assert {r["device"] for r in gpu} == {"cuda"}
    # the shared backbone is handed back on the CPU, where the next caller's learners are built
    assert all(p.device.type == "cpu" for p in bundled_backbone.parameters())


def test_pretraining_steps_run_on_cuda() -> None:
    from scanner.zoo.pretrain import Phase, PretrainConfig, pretrain

    losses: list[float] = []
    cfg = PretrainConfig(phases=(Phase(3, 1e-3, caption_aware=True),), batch_size=16, warmup=1, device="cuda",
                         workers=2)
    bb, _ = pretrain(cfg, lambda step, loss, scale: losses.append(loss))
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    # handed back frozen, on the CPU, where learners are built
    assert all(p.device.type == "cpu" and not p.requires_grad for p in bb.parameters())
    assert bb.mean.device.type == "cpu"


def test_a_zoo_builds_on_cuda_with_working_backdoors(tmp_path_factory: pytest.TempPathFactory,
                                                     bundled_backbone: ClipBackbone) -> None:
    from scanner.prompting.train import TrainConfig
    from scanner.zoo.build import ZooPlan, build_zoo
    from scanner.zoo.detect_eval import load_manifest

    plan = ZooPlan(datasets=("sizes",), attacks=("badnets", "badclip"), clean_per_dataset=1, seed=0,
                   train=TrainConfig(epochs=10), ood_size=64)
    root = tmp_path_factory.mktemp("cuda-zoo-build")
    manifest = build_zoo(root, plan, bundled_backbone, device="cuda")
    assert {m["device"] for m in manifest["models"]} == {"cuda"} and len(manifest["models"]) == 3
    assert all(p.device.type == "cpu" for p in bundled_backbone.parameters())
    cpu = build_zoo(tmp_path_factory.mktemp("cpu-zoo-build"), plan, bundled_backbone)
    by_id = {m["id"]: m for m in cpu["models"]}
    for m in load_manifest(root)["models"]:  # the same recipe reaches the same place (not bit for bit)
        ref = by_id[m["id"]]
        assert abs(m["ca"] - ref["ca"]) < 0.1, (m["id"], m["ca"], ref["ca"])
        if m["asr_id"] is not None:
            assert abs(m["asr_id"] - ref["asr_id"]) < 0.15, (m["id"], m["asr_id"], ref["asr_id"])
