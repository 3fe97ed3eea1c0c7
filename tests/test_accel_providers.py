"""onnxruntime provider choice: CUDA > OpenVINO > CPU, the user's override, and the parity guard that
keeps a provider computing at lower precision off the scanner's path (real onnxruntime, real plugin)."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import pytest
import torch

from scanner.accel import ForwardEncoders, reset_registry
from scanner.accel import sessions as S
from scanner.accel.features import forward_features
from scanner.accel.sessions import CPU, CUDA, OPENVINO, PROVIDER_ENV, select_providers
from scanner.clip import ClipBackbone

HAS_OPENVINO = importlib.util.find_spec("onnxruntime_ep_openvino") is not None
# installed is not enough: on some CPUs (an AMD EPYC, Zen 4) the plugin loads but offers no CPU device
needs_openvino = pytest.mark.skipif(
    not HAS_OPENVINO or S.openvino_device() is None,
    reason="the openvino extra is not installed, or its plugin offers no CPU device on this machine",
)


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PROVIDER_ENV, raising=False)
    reset_registry()


def _torch_image(bb: ClipBackbone, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return bb.encode_image(x)


def test_selection_order_and_the_users_choice() -> None:
    both = [CUDA, CPU]
    assert select_providers(both, gpu_present=True, openvino=True) == [CUDA, CPU]
    assert select_providers(both, gpu_present=False, openvino=True) == [OPENVINO, CPU]
    assert select_providers([CPU], gpu_present=False, openvino=False) == [CPU]
    assert select_providers(both, gpu_present=True, openvino=True, choice="openvino") == [OPENVINO, CPU]
    assert select_providers(both, gpu_present=True, openvino=True, choice="cpu") == [CPU]
    # asked for but missing: the CPU provider, never an error mid-scan
    assert select_providers([CPU], gpu_present=False, openvino=False, choice="cuda") == [CPU]
    with pytest.raises(ValueError, match="SCANNER_ONNX_PROVIDER must be one of auto, cuda, openvino, cpu"):
        select_providers([CPU], gpu_present=False, choice="tpu")


def test_unknown_provider_setting_falls_back_to_torch_and_says_why(
    random_backbone: ClipBackbone, tmp_path: Path, fresh: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PROVIDER_ENV, "tpu")
    feats = forward_features(random_backbone, "onnx", cache_dir=tmp_path)
    assert feats is not None
    assert feats.encoders.image_backend == "torch"
    assert "SCANNER_ONNX_PROVIDER must be one of" in feats.encoders.fallback_reasons["image"]


def test_cpu_choice_keeps_onnxruntimes_own_provider(
    random_backbone: ClipBackbone, tmp_path: Path, fresh: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PROVIDER_ENV, "cpu")
    enc = ForwardEncoders.for_backbone(random_backbone, cache_dir=tmp_path)
    assert enc.providers == [CPU]


def test_openvino_without_a_cpu_device_leaves_the_cpu_provider(
    monkeypatch: pytest.MonkeyPatch, fresh: None, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(S, "openvino_device", lambda: None)  # what the plugin gives on an AMD EPYC
    monkeypatch.setattr(S, "gpu_present", lambda: False)
    assert S.best_providers() == [CPU]
    monkeypatch.setenv(PROVIDER_ENV, "openvino")
    with caplog.at_level(logging.WARNING, logger="scanner"):
        assert S.best_providers() == [CPU]
    assert "SCANNER_ONNX_PROVIDER=openvino is not available here" in caplog.text


@needs_openvino
def test_openvino_serves_fp32_within_parity(random_backbone: ClipBackbone, tmp_path: Path, fresh: None) -> None:
    enc = ForwardEncoders.for_backbone(random_backbone, cache_dir=tmp_path)
    assert enc.providers[0] == OPENVINO
    x = torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    diff = float((enc.encode_images(x) - _torch_image(random_backbone, x)).abs().max())
    assert diff <= 1e-4


@needs_openvino
def test_provider_off_parity_is_replaced_by_the_cpu_one(
    random_backbone: ClipBackbone, tmp_path: Path, fresh: None, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # OpenVINO left at its own default precision: bf16 on this CPU class (AMX), far outside 1e-4.
    monkeypatch.setattr(S, "openvino_options", lambda threads: {})
    with caplog.at_level(logging.WARNING, logger="scanner"):
        enc = ForwardEncoders.for_backbone(random_backbone, cache_dir=tmp_path)
    if "differs from torch" not in caplog.text:
        pytest.skip("OpenVINO computes fp32 by default on this CPU (no bf16 units): nothing to guard")
    assert enc.providers == [CPU]
    x = torch.rand(3, 3, 64, 64)
    assert float((enc.encode_images(x) - _torch_image(random_backbone, x)).abs().max()) <= 1e-4


@needs_openvino
def test_int8_graph_runs_on_onnxruntimes_cpu_kernels(
    random_backbone: ClipBackbone, tmp_path: Path, fresh: None
) -> None:
    gate = torch.rand(16, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    enc = ForwardEncoders.for_backbone(random_backbone, cache_dir=tmp_path, quantize=True, gate_pixels=gate,
                                       min_agreement=0.0)
    assert enc.image_backend == "onnx-int8"
    assert enc.providers == [CPU]
