"""Forward-only work on onnxruntime inside real scans: injection into PromptedCLIP, clean-pool reuse across
models on one backbone, the settings switch, and the fallbacks (export failure, unwritable or corrupted
cache, missing onnxruntime) — with real onnxruntime sessions on the bundled tiny CLIP."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from scanner.accel import STATS, best_providers, reset_registry
from scanner.accel.export import ExportError
from scanner.accel.features import forward_features
from scanner.clip import ClipBackbone
from scanner.errors import ConfigError
from scanner.pipeline import scan_path
from scanner.prompting import CoCoOpLearner, CoOpLearner, save_safetensors
from scanner.prompting.classifier import PromptedCLIP
from scanner.report import ModelReport, Verdict
from scanner.settings import Settings, load_settings

CLASSES = ["cat", "dog", "ship", "car"]
OOD = 64  # pool size of these scans; the detector's held-out split is its last 20% (13 images)
N_HOLD = 13


def _settings(cache: Path, **kw: Any) -> Settings:
    kw.setdefault("accel", "onnx")
    kw.setdefault("detector_options", {"batch_size": 16, "candidates": 1, "bf16": False, "families": ["patch"]})
    return Settings(ood_size=OOD, cache_dir=cache, **kw)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, bundled_backbone: ClipBackbone) -> Path:
    """Two CoOp models (different prompts) on the bundled CLIP, one file each."""
    root = tmp_path_factory.mktemp("accel-models")
    for seed in (1, 2):
        learner = CoOpLearner(bundled_backbone, CLASSES, n_ctx=4, seed=seed)
        save_safetensors(learner, root / f"coop-{seed}.safetensors")
    return root


@pytest.fixture()
def fresh() -> None:
    reset_registry()


def _counters() -> tuple[int, int, int]:
    return STATS.exports_performed, STATS.sessions_created, STATS.pool_rows_encoded


# --------------------------------------------------------------------- injection
@pytest.mark.parametrize("learner_cls", [CoOpLearner, CoCoOpLearner])
def test_no_grad_calls_go_to_onnx_and_match_torch(
    bundled_backbone: ClipBackbone, tmp_path: Path, fresh: None, learner_cls: type
) -> None:
    model = PromptedCLIP(bundled_backbone, learner_cls(bundled_backbone, CLASSES, n_ctx=4, seed=3))
    x = torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x)
    feats = forward_features(bundled_backbone, "onnx", cache_dir=tmp_path)
    assert feats is not None
    calls: list[int] = []
    image_fn = feats.fp32

    def counting(p: torch.Tensor) -> torch.Tensor:
        calls.append(p.shape[0])
        return image_fn(p)

    info = feats.attach(model)
    assert (info.image, info.text) == ("onnx-fp32", "onnx-fp32")
    model.use_forward_only(counting, feats.encode_prompts)
    with torch.no_grad():
        got = model(x)
    assert calls == [5]
    assert float((got - ref).abs().max()) <= 1e-3  # logits (scale ~100) of features at parity ≤ 1e-4
    # With gradients on (trigger optimisation) the backbone serves, and gradients flow to the input.
    x.requires_grad_(True)
    model(x).sum().backward()
    assert calls == [5] and x.grad is not None and float(x.grad.abs().sum()) > 0
    model.use_forward_only(None)
    with torch.no_grad():
        assert torch.equal(model(x), ref)


# --------------------------------------------------------------------- reuse across models
def test_second_model_on_same_backbone_exports_and_encodes_nothing(
    models: Path, tmp_path: Path, fresh: None, caplog: pytest.LogCaptureFixture
) -> None:
    settings = _settings(tmp_path / "cache")
    before = _counters()
    with caplog.at_level(logging.INFO, logger="scanner"):
        first = scan_path(models / "coop-1.safetensors", settings).models[0]
    assert first.verdict in (Verdict.CLEAN, Verdict.BACKDOORED), first.message
    assert first.accel == {"image": "onnx-fp32", "text": "onnx-fp32", "provider": best_providers()[0]}
    exports, sessions, rows = _counters()
    assert (exports - before[0], sessions - before[1]) == (2, 2)  # image + text graph, once
    # The clean images the detector looks at (at least its held-out split), each encoded once by onnxruntime.
    assert N_HOLD <= rows - before[2] <= OOD
    assert "forward-only work of backbone scanner-tiny: image onnx-fp32, text onnx-fp32" in caplog.text

    second = scan_path(models / "coop-2.safetensors", settings).models[0]
    assert second.verdict in (Verdict.CLEAN, Verdict.BACKDOORED), second.message
    assert second.accel == first.accel
    assert _counters() == (exports, sessions, rows)  # no export, no session, no clean-pool encoding

    # A new process (simulated: registry forgotten) finds the graphs on disk: sessions, but no export.
    reset_registry()
    scan_path(models / "coop-1.safetensors", settings)
    assert STATS.exports_performed == exports and STATS.sessions_created == sessions + 2


def test_torch_setting_keeps_everything_in_torch(models: Path, tmp_path: Path, fresh: None) -> None:
    before = _counters()
    report = scan_path(models / "coop-1.safetensors", _settings(tmp_path / "cache", accel="torch"))
    assert report.models[0].accel == {"image": "torch", "text": "torch"}
    assert _counters() == before
    assert not (tmp_path / "cache" / "onnx").exists()


def test_onnx_and_torch_scans_agree(models: Path, tmp_path: Path, fresh: None) -> None:
    onnx = scan_path(models / "coop-2.safetensors", _settings(tmp_path / "cache")).models[0]
    torch_ = scan_path(models / "coop-2.safetensors", _settings(tmp_path / "cache", accel="torch")).models[0]
    assert onnx.verdict is torch_.verdict
    assert onnx.anomaly_score == pytest.approx(torch_.anomaly_score, abs=1e-3)


# --------------------------------------------------------------------- bad input
def test_export_failure_falls_back_to_torch_and_scan_completes(
    models: Path, tmp_path: Path, fresh: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(backbone: ClipBackbone, which: str, path: Path, **kw: Any) -> None:
        raise ExportError(f"the {which} encoder of backbone {backbone.name!r} could not be exported to ONNX (test)")

    monkeypatch.setattr("scanner.accel.encoders.export_encoder", broken)
    fallbacks = STATS.fallbacks
    with caplog.at_level(logging.WARNING):
        report = scan_path(models / "coop-1.safetensors", _settings(tmp_path / "cache"))
    (m,) = report.models
    assert m.verdict in (Verdict.CLEAN, Verdict.BACKDOORED), m.message
    assert m.accel["image"] == m.accel["text"] == "torch-fallback"
    assert "could not be exported" in m.accel["image_fallback_reason"]
    assert STATS.fallbacks == fallbacks + 2
    assert "ONNX is unavailable for the image encoder of scanner-tiny" in caplog.text
    assert "using torch" in caplog.text


def test_fallback_is_counted_in_daemon_metrics(
    models: Path, tmp_path: Path, fresh: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from scanner.daemon.accepted_risk import AcceptedRiskList
    from scanner.daemon.metrics import DaemonMetrics
    from scanner.daemon.quarantine import Quarantine
    from scanner.daemon.state import StateStore
    from scanner.daemon.worker import Processor

    def broken(backbone: ClipBackbone, which: str, path: Path, **kw: Any) -> None:
        raise ExportError("no ONNX translation (test)")

    monkeypatch.setattr("scanner.accel.encoders.export_encoder", broken)
    registry = CollectorRegistry()
    store = StateStore(tmp_path / "state.db")
    settings = _settings(tmp_path / "cache")
    proc = Processor(store, Quarantine(tmp_path / "q"), AcceptedRiskList(store), DaemonMetrics(registry),
                     lambda unit: scan_path(unit, settings), max_attempts=3, resettle=lambda p: None)
    try:
        outcome = proc.process(models / "coop-2.safetensors")
    finally:
        store.close()
    assert outcome.startswith("scanned:")
    samples = {
        (s.name, s.labels.get("encoder")): s.value
        for fam in text_string_to_metric_families(generate_latest(registry).decode())
        for s in fam.samples
        if s.name.startswith("scanner_onnx_torch_fallbacks")
    }
    assert samples[("scanner_onnx_torch_fallbacks_total", "image")] == 1.0
    assert samples[("scanner_onnx_torch_fallbacks_total", "text")] == 1.0


def test_unwritable_cache_folder_still_uses_onnx(models: Path, tmp_path: Path, fresh: None,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    # A file where the cache folder should be: unwritable for root too (unlike chmod).
    blocker = tmp_path / "cache"
    blocker.write_text("not a folder")
    with caplog.at_level(logging.WARNING):
        report = scan_path(models / "coop-1.safetensors", _settings(blocker))
    (m,) = report.models
    assert m.verdict in (Verdict.CLEAN, Verdict.BACKDOORED), m.message
    # exported to a per-process temp folder
    assert m.accel == {"image": "onnx-fp32", "text": "onnx-fp32", "provider": best_providers()[0]}
    assert "cannot be written" in caplog.text and "temporary folder" in caplog.text


def test_corrupted_cached_graph_is_reexported_not_trusted(
    models: Path, tmp_path: Path, fresh: None, caplog: pytest.LogCaptureFixture
) -> None:
    settings = _settings(tmp_path / "cache")
    scan_path(models / "coop-1.safetensors", settings)
    (graph,) = (tmp_path / "cache" / "onnx").glob("scanner-tiny-image-fp32-*.onnx")
    graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])  # truncated
    reset_registry()
    exports = STATS.exports_performed
    with caplog.at_level(logging.WARNING):
        (m,) = scan_path(models / "coop-1.safetensors", settings).models
    assert "corrupt or stale" in caplog.text
    assert STATS.exports_performed == exports + 1  # the image graph only
    assert m.verdict in (Verdict.CLEAN, Verdict.BACKDOORED) and m.accel["image"] == "onnx-fp32"


def test_missing_onnxruntime(bundled_backbone: ClipBackbone, monkeypatch: pytest.MonkeyPatch,
                             tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import raises ImportError
    assert forward_features(bundled_backbone, "auto", cache_dir=tmp_path) is None
    feats = forward_features(bundled_backbone, "onnx", cache_dir=tmp_path)
    assert feats is not None
    model = PromptedCLIP(bundled_backbone, CoOpLearner(bundled_backbone, CLASSES, n_ctx=4))
    info = feats.attach(model)
    assert (info.image, info.text) == ("torch-fallback", "torch-fallback")
    assert "onnxruntime is not installed" in info.reasons["image"]
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        got = model(x)
        model.use_forward_only(None)
        assert torch.allclose(got, model(x), atol=1e-4)


# --------------------------------------------------------------------- int8 gate and settings
def test_int8_is_gated_on_the_models_own_predictions(bundled_backbone: ClipBackbone, tmp_path: Path,
                                                     fresh: None) -> None:
    from scanner.zoo.ood import default_ood_pool

    feats = forward_features(bundled_backbone, "onnx", cache_dir=tmp_path, int8=True)
    assert feats is not None and feats.int8 is not None
    model = PromptedCLIP(bundled_backbone, CoOpLearner(bundled_backbone, CLASSES, n_ctx=4, seed=1))
    pool = default_ood_pool(96, 64, seed=0)
    loose = feats.attach(model, pool, min_agreement=0.0)
    assert loose.image == "onnx-int8" and loose.int8_agreement is not None
    strict = feats.attach(model, pool, min_agreement=1.01)
    assert strict.image == "onnx-fp32" and strict.int8_agreement == loose.int8_agreement
    assert feats.attach(model).image == "onnx-fp32"  # no gate images, no int8


def test_accel_settings_parse_and_validate() -> None:
    s = load_settings(env={"SCANNER_ACCEL": "torch", "SCANNER_ACCEL_INT8": "true"})
    assert (s.accel, s.accel_int8) == ("torch", True)
    assert load_settings(env={}).accel == "auto"
    with pytest.raises(ConfigError, match="accel"):
        load_settings(env={"SCANNER_ACCEL": "tensorrt"})
    with pytest.raises(ConfigError, match="accel_int8"):
        load_settings(env={"SCANNER_ACCEL_INT8": "maybe"})


def test_model_report_round_trips_accel() -> None:
    m = ModelReport(path="x", verdict=Verdict.CLEAN, accel={"image": "onnx-int8", "int8_agreement": 0.995})
    assert ModelReport.from_dict(m.to_dict()).accel == m.accel


def test_auto_leaves_gpu_models_to_torch(bundled_backbone: ClipBackbone, tmp_path: Path) -> None:
    # measured on an H100: onnxruntime's CUDA provider at fp32 parity is slower than torch there
    assert forward_features(bundled_backbone, "auto", cache_dir=tmp_path, device="cuda") is None
    assert forward_features(bundled_backbone, "torch", cache_dir=tmp_path) is None
