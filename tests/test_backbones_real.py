"""Real architectures offline: random-init ViT-B/16 and RN50 written in each file format, loaded back
through the store, same forward pass. Each architecture is built once per module."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from open_clip.transformer import QuickGELU
from test_backbones import (
    _heads,
    assert_same_outputs,
    features,
    write_hf_folder,
    write_open_clip_safetensors,
    write_openai_state_dict,
    write_torchscript,
)

from scanner.backbones import BackboneEntry, BackboneStore, clear_cache
from scanner.clip import ClipBackbone, create_backbone

pytestmark = pytest.mark.slow


def _quick_gelu_twin(bb: ClipBackbone) -> ClipBackbone:
    """The same weights with QuickGELU (what OpenAI's weights need), built by swapping the activations."""
    twin = copy.deepcopy(bb)
    for module in twin.model.modules():
        if hasattr(module, "gelu") and isinstance(module.gelu, torch.nn.GELU):
            module.gelu = QuickGELU()
    return twin


@dataclass
class Real:
    """One architecture: the reference model, its QuickGELU twin and their features (batch 1)."""

    ref: ClipBackbone
    quick: ClipBackbone
    ref_features: tuple[torch.Tensor, torch.Tensor]
    quick_features: tuple[torch.Tensor, torch.Tensor]


@pytest.fixture(scope="module", params=["ViT-B-16", "RN50"])
def real(request: pytest.FixtureRequest) -> Real:
    torch.set_num_threads(2)
    bb = create_backbone(request.param, seed=0)
    # fp16-exact weights, so OpenAI's fp16 files hold exactly what the reference computes with
    bb.model.load_state_dict({k: v.half().float() for k, v in bb.model.state_dict().items()})
    quick = _quick_gelu_twin(bb)
    return Real(bb, quick, features(bb, 1), features(quick, 1))


def _load(path: Path, fmt: str = "auto") -> ClipBackbone:
    clear_cache()
    return BackboneStore([BackboneEntry("declared", path, fmt)]).get("declared")


def test_openai_state_dict(real: Real, tmp_path: Path) -> None:
    ref = real.ref
    # A neutral file name: the OpenAI ints in the state dict alone must mark it as OpenAI (QuickGELU).
    loaded = _load(write_openai_state_dict(ref, tmp_path / "weights.pt"))
    assert loaded.name == f"{ref.name}-quickgelu"
    assert loaded.content_hash() == ref.content_hash()
    assert_same_outputs(real.quick_features, loaded)


def test_openai_torchscript_archive(real: Real, tmp_path: Path) -> None:
    ref, ref_quick = real.ref, real.quick
    archive = write_torchscript(ref_quick, tmp_path / "traced.pt", with_image=False)
    loaded = _load(archive)
    assert loaded.name == f"{ref.name}-quickgelu"
    assert loaded.content_hash() == ref.content_hash()
    assert_same_outputs(real.quick_features, loaded)


def test_open_clip_safetensors_and_dassl_names(real: Real, tmp_path: Path) -> None:
    ref = real.ref
    path = write_open_clip_safetensors(ref, tmp_path / "w.safetensors")
    clear_cache()
    store = BackboneStore([BackboneEntry(ref.name, path, "open_clip")])
    # Dassl configs name backbones "ViT-B/16" / "RN50"; the store maps them to the declared file.
    loaded = store.resolve(ref.name.replace("ViT-B-16", "ViT-B/16"), ref.content_hash())
    assert loaded.name == ref.name
    assert loaded.content_hash() == ref.content_hash()
    assert loaded.text_width == 512  # what a 512-wide CoOp learner needs
    assert_same_outputs(real.ref_features, loaded)


def test_hf_folder(real: Real, tmp_path: Path) -> None:
    ref, ref_quick = real.ref, real.quick
    if ref.name.startswith("RN"):
        pytest.skip("Hugging Face's CLIPModel has no ResNet variant")
    folder = write_hf_folder(ref_quick, tmp_path / "hf", quick_gelu=True)
    loaded = _load(folder)
    assert loaded.name == f"{ref.name}-quickgelu"
    assert _heads(loaded) == _heads(ref)
    assert loaded.content_hash() == ref.content_hash()
    assert_same_outputs(real.quick_features, loaded)
