"""The backbone store on the bundled architecture: every file format round-trips to the same CLIP.

Files are written here, from a random-init model, in each layout a user may declare (OpenAI state dict,
OpenAI-style TorchScript archive, open_clip .bin/.safetensors, Hugging Face CLIPModel folder).
The writers are reused by test_backbones_real.py for ViT-B/16 and RN50.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from payloads import PAYLOADS
from safetensors.torch import save_file

from scanner.backbones import (
    BackboneEntry,
    BackboneStore,
    clear_cache,
    detect_format,
    file_sha256,
    hf_to_open_clip,
    infer_arch,
    open_clip_to_hf,
    parse_backbone_flag,
)
from scanner.clip import BUNDLED_NAME, ClipBackbone, bundled_weights_path, create_backbone
from scanner.clip.backbone import OPENAI_MEAN
from scanner.errors import BackboneError, UnsafeFileError


# ----------------------------------------------------------------------------- writers
def _sd(bb: ClipBackbone) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in bb.model.state_dict().items() if k != "attn_mask"}


def write_openai_state_dict(bb: ClipBackbone, path: Path) -> Path:
    """OpenAI's layout: fp16 tensors plus the three ints their state dicts carry."""
    sd = {k: v.half() if v.is_floating_point() else v for k, v in _sd(bb).items()}
    sd.update(input_resolution=torch.tensor(bb.image_size), context_length=torch.tensor(bb.context_length),
              vocab_size=torch.tensor(bb.token_embedding.weight.shape[0]))
    torch.save(sd, path)
    return path


def write_torchscript(bb: ClipBackbone, path: Path, *, with_image: bool = True) -> Path:
    """A TorchScript archive traced like OpenAI's release (whole module tree + code, fp32 here).

    ``with_image=False`` traces only ``encode_text`` (the archive still holds every submodule's
    tensors) because tracing a ViT-B/16 image tower costs a minute on a busy 2-core machine.
    """
    s = bb.image_size
    methods = {"encode_text": (torch.zeros(1, bb.context_length, dtype=torch.long),)}
    if with_image:
        methods["encode_image"] = (torch.zeros(1, 3, s, s),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace_module(bb.model, methods)
    traced.save(str(path))
    return path


def write_open_clip_bin(bb: ClipBackbone, path: Path) -> Path:
    torch.save(_sd(bb), path)
    return path


def write_open_clip_training_checkpoint(bb: ClipBackbone, path: Path) -> Path:
    """open_clip's training checkpoint: ``{"epoch", "name", "state_dict": {"module.<key>": ...}}``."""
    torch.save({"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in _sd(bb).items()}}, path)
    return path


def write_open_clip_safetensors(bb: ClipBackbone, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in _sd(bb).items()}, str(path))
    return path


def _heads(bb: ClipBackbone) -> tuple[int, int]:
    text = bb.model.transformer.resblocks[0].attn.num_heads
    vision = bb.model.visual.transformer.resblocks[0].attn.num_heads
    return int(text), int(vision)


def write_hf_folder(bb: ClipBackbone, folder: Path, *, quick_gelu: bool, weights: str = "model.safetensors",
                    mean: tuple[float, float, float] | None = None) -> Path:
    """A Hugging Face CLIPModel folder built by the inverse key mapping (no ``transformers`` needed)."""
    folder.mkdir(parents=True, exist_ok=True)
    text_heads, vision_heads = _heads(bb)
    hf, config = open_clip_to_hf(_sd(bb), heads=text_heads, vision_heads=vision_heads, quick_gelu=quick_gelu)
    hf["text_model.embeddings.position_ids"] = torch.arange(bb.context_length)[None]  # old HF exports
    if weights.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in hf.items()}, str(folder / weights))
    else:
        torch.save(hf, folder / weights)
    (folder / "config.json").write_text(json.dumps(config))
    if mean is not None:
        (folder / "preprocessor_config.json").write_text(json.dumps(
            {"image_mean": list(mean), "image_std": [0.5, 0.5, 0.5], "crop_size": bb.image_size}))
    return folder


def features(bb: ClipBackbone, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Image features (batch, E) of seeded random pixels and text features (batch, E) of two captions."""
    gen = torch.Generator().manual_seed(0)
    pixels = torch.rand(batch, 3, bb.image_size, bb.image_size, generator=gen)
    tokens = bb.tokenize(["a photo of a cat", "a drawing of a dog"][:batch])
    with torch.no_grad():
        return bb.encode_image(pixels), bb.encode_tokens(tokens)


def assert_same_outputs(expected: ClipBackbone | tuple[torch.Tensor, torch.Tensor], loaded: ClipBackbone,
                        *, batch: int = 2, atol: float = 1e-5) -> None:
    want = features(expected, batch) if isinstance(expected, ClipBackbone) else expected
    got = features(loaded, want[0].shape[0])
    torch.testing.assert_close(got[0], want[0], atol=atol, rtol=1e-4)
    torch.testing.assert_close(got[1], want[1], atol=atol, rtol=1e-4)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny() -> ClipBackbone:
    """The bundled architecture, random init, weights rounded to fp16 so every format holds them exactly."""
    bb = create_backbone(BUNDLED_NAME, seed=0)
    bb.model.load_state_dict({k: v.half().float() for k, v in bb.model.state_dict().items()})
    return bb


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    clear_cache()


Writer = Callable[[ClipBackbone, Path], Path]
FORMATS: dict[str, tuple[str, str, Writer]] = {
    "openai-state-dict": ("ViT-B-16.pt", "openai", write_openai_state_dict),
    "openai-torchscript": ("model.pt", "openai", write_torchscript),
    "open_clip-bin": ("open_clip_pytorch_model.bin", "open_clip", write_open_clip_bin),
    "open_clip-training": ("epoch_3.pt", "open_clip", write_open_clip_training_checkpoint),
    "open_clip-safetensors": ("open_clip_model.safetensors", "open_clip", write_open_clip_safetensors),
    "hf-safetensors": ("hf", "hf", lambda bb, p: write_hf_folder(bb, p, quick_gelu=False)),
    "hf-bin": ("hf", "hf", lambda bb, p: write_hf_folder(bb, p, quick_gelu=False,
                                                         weights="pytorch_model.bin")),
}


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("kind", FORMATS)
def test_every_format_round_trips(kind: str, tiny: ClipBackbone, tmp_path: Path) -> None:
    filename, fmt, writer = FORMATS[kind]
    path = writer(tiny, tmp_path / filename)
    assert detect_format(path) == fmt
    store = BackboneStore([BackboneEntry("mine", path, "auto")])
    loaded = store.get("mine")
    assert loaded.name == BUNDLED_NAME  # architecture inferred from shapes
    assert loaded.content_hash() == tiny.content_hash()
    assert_same_outputs(tiny, loaded)
    assert store.get("mine") is loaded  # cached per process
    assert store.get(tiny.content_hash()) is loaded  # found by content hash


def test_hf_conversion_is_an_exact_inverse(tiny: ClipBackbone) -> None:
    sd = _sd(tiny)
    hf, config = open_clip_to_hf(sd, heads=4, vision_heads=3, quick_gelu=True)
    assert "vision_model.encoder.layers.0.self_attn.q_proj.weight" in hf
    assert hf["visual_projection.weight"].shape == sd["visual.proj"].shape[::-1]
    assert config["text_config"]["hidden_act"] == "quick_gelu"
    back = hf_to_open_clip(hf)
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_hf_unknown_keys_are_refused(tiny: ClipBackbone) -> None:
    hf, _ = open_clip_to_hf(_sd(tiny), heads=4, vision_heads=3, quick_gelu=False)
    hf["vision_model.extra_adapter.weight"] = torch.zeros(2)
    with pytest.raises(BackboneError, match="extra_adapter"):
        hf_to_open_clip(hf)


def test_hf_preprocessing_comes_from_its_folder(tiny: ClipBackbone, tmp_path: Path) -> None:
    folder = write_hf_folder(tiny, tmp_path / "hf", quick_gelu=False, mean=(0.5, 0.25, 0.125))
    loaded = BackboneStore([BackboneEntry("hf", folder, "hf")]).get("hf")
    torch.testing.assert_close(loaded.mean.flatten(), torch.tensor([0.5, 0.25, 0.125]))
    torch.testing.assert_close(loaded.std.flatten(), torch.tensor([0.5, 0.5, 0.5]))


def test_open_clip_file_gets_the_configs_preprocessing(tiny: ClipBackbone, tmp_path: Path) -> None:
    path = write_open_clip_safetensors(tiny, tmp_path / "m.safetensors")
    loaded = BackboneStore([BackboneEntry("m", path, "open_clip")]).get("m")
    torch.testing.assert_close(loaded.mean.flatten(), torch.tensor(OPENAI_MEAN))


def test_sha256_is_verified(tiny: ClipBackbone, tmp_path: Path) -> None:
    path = write_open_clip_safetensors(tiny, tmp_path / "m.safetensors")
    good = file_sha256(path)
    assert BackboneStore([BackboneEntry("m", path, "open_clip", sha256=good)]).get("m").name == BUNDLED_NAME
    clear_cache()
    wrong = "0" * 64
    with pytest.raises(BackboneError) as info:
        BackboneStore([BackboneEntry("m", path, "open_clip", sha256=wrong)]).get("m")
    assert wrong in str(info.value) and good in str(info.value)


def test_missing_backbone_says_how_to_declare_it() -> None:
    with pytest.raises(BackboneError) as info:
        BackboneStore().get("ViT-B/16")
    msg = str(info.value)
    assert "ViT-B/16" in msg and "backbones" in msg and "--backbone ViT-B-16=PATH" in msg


def test_declared_file_that_is_gone(tmp_path: Path) -> None:
    store = BackboneStore([BackboneEntry("ViT-B-16", tmp_path / "ViT-B-16.pt", "openai")])
    with pytest.raises(BackboneError, match="does not exist"):
        store.get("ViT-B/16")


def test_resolve_by_openai_name_and_hash(tiny: ClipBackbone, tmp_path: Path) -> None:
    path = write_open_clip_bin(tiny, tmp_path / "w.bin")
    store = BackboneStore([BackboneEntry("ViT-B-16", path, "open_clip")])
    assert store.resolve("ViT-B/16", None).content_hash() == tiny.content_hash()
    assert store.resolve(None, tiny.content_hash()).content_hash() == tiny.content_hash()
    assert store.resolve("ViT-B/16", tiny.content_hash()).content_hash() == tiny.content_hash()
    with pytest.raises(BackboneError) as info:
        store.resolve("ViT-B/16", "f" * 64)
    assert "f" * 64 in str(info.value) and tiny.content_hash() in str(info.value)


def test_wrong_declared_arch(tiny: ClipBackbone, tmp_path: Path) -> None:
    path = write_open_clip_bin(tiny, tmp_path / "w.bin")
    with pytest.raises(BackboneError, match="ViT-B-32"):
        BackboneStore([BackboneEntry("w", path, "open_clip", arch="ViT-B-32")]).get("w")


def test_not_a_clip_state_dict(tmp_path: Path) -> None:
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "x.bin")
    with pytest.raises(BackboneError, match="key layout"):
        BackboneStore([BackboneEntry("x", tmp_path / "x.bin", "open_clip")]).get("x")


def test_hostile_backbone_file_stays_unsafe(tmp_path: Path) -> None:
    payload = next(p for p in PAYLOADS if p.name == "posix_system_reduce_zip")
    path = payload.write(tmp_path)
    with pytest.raises(UnsafeFileError):
        BackboneStore([BackboneEntry("evil", path, "open_clip")]).get("evil")
    assert not payload.fired(tmp_path)


def test_corrupt_backbone_file_is_a_backbone_error(tiny: ClipBackbone, tmp_path: Path) -> None:
    path = write_open_clip_bin(tiny, tmp_path / "w.bin")
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(BackboneError, match="corrupt"):
        BackboneStore([BackboneEntry("w", path, "open_clip")]).get("w")


def test_flags_and_settings(tmp_path: Path) -> None:
    entry = parse_backbone_flag(f"ViT-B-16={tmp_path}/ViT-B-16.pt,format=openai,sha256={'a' * 64}")
    assert entry == BackboneEntry("ViT-B-16", tmp_path / "ViT-B-16.pt", "openai", None, "a" * 64)
    with pytest.raises(BackboneError, match="NAME=PATH"):
        parse_backbone_flag("no-path")
    with pytest.raises(BackboneError, match="format"):
        BackboneEntry("x", tmp_path, "onnx")
    store = BackboneStore.from_settings({"RN50": {"path": str(tmp_path / "RN50.pt"), "format": "openai"}},
                                        [f"mine={tmp_path}/m.safetensors,format=safetensors"])
    names = {e.name: e for e in store.entries}
    assert set(names) == {BUNDLED_NAME, "RN50", "mine"}
    assert names["mine"].resolved_format() == "open_clip"


def test_infer_arch_reads_shapes(tiny: ClipBackbone) -> None:
    assert infer_arch(_sd(tiny)) == BUNDLED_NAME


def test_bundled_is_always_declared() -> None:
    store = BackboneStore()
    assert [e.name for e in store.entries] == [BUNDLED_NAME]
    if not bundled_weights_path().exists():
        with pytest.raises(BackboneError, match="bundled"):
            store.resolve(None, None)
    else:
        assert store.resolve(None, None).name == BUNDLED_NAME
