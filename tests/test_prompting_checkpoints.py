"""Checkpoint formats: CoOp/Dassl (read safely) and safetensors; class-name decoding; shape checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from scanner.clip import ClipBackbone, create_backbone
from scanner.errors import BackboneError, CheckpointError, UnsafeFileError
from scanner.prompting import (
    CoCoOpLearner,
    CoOpLearner,
    PromptedCLIP,
    PromptLearner,
    decode_classnames,
    find_checkpoint,
    learner_from_state,
    load_checkpoint,
    save_dassl,
    save_safetensors,
)

NAMES = ["cat", "golden retriever", "fire truck", "st bernard"]


# tiny models run fastest single-threaded (conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


def _trained_like(learner: PromptLearner) -> PromptLearner:
    """Perturb every trainable tensor so a roundtrip cannot pass by reproducing the initialisation."""
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in learner.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return learner


def _logits(bb: ClipBackbone, learner: PromptLearner) -> torch.Tensor:
    pixels = torch.rand(3, 3, bb.image_size, bb.image_size, generator=torch.Generator().manual_seed(0))
    return PromptedCLIP(bb, learner).predict(pixels)


LEARNERS = {
    "coop": lambda bb: CoOpLearner(bb, NAMES, n_ctx=4),
    "coop-csc-middle": lambda bb: CoOpLearner(bb, NAMES, n_ctx=4, csc=True, class_token_position="middle"),
    "cocoop": lambda bb: CoCoOpLearner(bb, NAMES, n_ctx=3),
}


@pytest.mark.parametrize("kind", sorted(LEARNERS))
def test_dassl_roundtrip_gives_identical_logits(random_backbone: ClipBackbone, tmp_path: Path,
                                                kind: str) -> None:
    learner = _trained_like(LEARNERS[kind](random_backbone))
    path = save_dassl(learner, tmp_path / "MODEL", epoch=50)
    assert path == tmp_path / "MODEL" / "prompt_learner" / "model.pth.tar-50"
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"state_dict", "epoch", "optimizer", "scheduler"} and raw["epoch"] == 50
    assert (tmp_path / "MODEL" / "classnames.txt").read_text().splitlines() == NAMES

    loaded = load_checkpoint(tmp_path / "MODEL", random_backbone)
    assert loaded.format == "dassl" and loaded.epoch == 50 and loaded.classnames_source == "classnames.txt"
    assert loaded.learner.config() == learner.config()
    assert torch.equal(_logits(random_backbone, loaded.learner), _logits(random_backbone, learner))


@pytest.mark.parametrize("kind", sorted(LEARNERS))
@pytest.mark.parametrize("tokens", [True, False])
def test_safetensors_roundtrip_gives_identical_logits(random_backbone: ClipBackbone, tmp_path: Path,
                                                      kind: str, tokens: bool) -> None:
    learner = _trained_like(LEARNERS[kind](random_backbone))
    path = save_safetensors(learner, tmp_path / "sub" / "prompt.safetensors", include_tokens=tokens)
    loaded = load_checkpoint(path, random_backbone)
    assert loaded.format == "safetensors" and loaded.classnames_source == "metadata"
    assert loaded.metadata["backbone_sha256"] == random_backbone.content_hash()
    assert loaded.learner.config() == learner.config()
    assert torch.equal(_logits(random_backbone, loaded.learner), _logits(random_backbone, learner))
    assert [p.name for p in path.parent.iterdir()] == ["prompt.safetensors"]  # no temp file left


def test_classnames_are_decoded_from_token_suffix(random_backbone: ClipBackbone, tmp_path: Path) -> None:
    learner = _trained_like(CoOpLearner(random_backbone, ["Golden_Retriever", "cat", "st. bernard"], n_ctx=4))
    save_dassl(learner, tmp_path / "M", epoch=3, write_classnames=False, write_metadata=False)
    loaded = load_checkpoint(tmp_path / "M", random_backbone)
    assert loaded.classnames_source == "token_suffix"
    # The tokenizer lower-cases and splits punctuation; the tokens (and so the model) are identical.
    assert loaded.classnames == ["golden retriever", "cat", "st . bernard"]
    assert torch.equal(_logits(random_backbone, loaded.learner), _logits(random_backbone, learner))


def test_decoding_works_on_fp16_suffix_and_rejects_foreign_rows(random_backbone: ClipBackbone) -> None:
    suffix = CoOpLearner(random_backbone, NAMES, n_ctx=4).token_suffix
    assert decode_classnames(random_backbone, suffix.half()) == NAMES
    with pytest.raises(CheckpointError, match="not a row of the backbone's token-embedding table"):
        decode_classnames(random_backbone, suffix + 1e-2)


def test_shape_mismatch_names_expected_and_found(random_backbone: ClipBackbone) -> None:
    state = dict(CoOpLearner(random_backbone, NAMES, n_ctx=4).state_dict())
    wide = {**state, "ctx": torch.zeros(4, 512)}
    with pytest.raises(CheckpointError, match=r"ctx has shape \(4, 512\); expected \(n_ctx, 128\)"):
        learner_from_state(random_backbone, wide, NAMES, None)
    short = {**state, "token_suffix": state["token_suffix"][:, :-2]}
    with pytest.raises(CheckpointError,
                       match=r"token_suffix has shape \(4, 25, 128\); expected \(n_cls, 27, 128\)"):
        learner_from_state(random_backbone, short, NAMES, None)
    with pytest.raises(CheckpointError, match="for 4 classes but 3 class names"):
        learner_from_state(random_backbone, state, NAMES[:3], None)
    maple = {**state, "compound_prompts_text.0": torch.zeros(2, 128)}
    with pytest.raises(CheckpointError, match=r"unexpected tensors compound_prompts_text\.0; this looks like a MaPLe"):
        learner_from_state(random_backbone, maple, NAMES, None)
    with pytest.raises(CheckpointError, match="does not match the class names given"):
        learner_from_state(random_backbone, state, ["dog", *NAMES[1:]], None)


def test_learner_type_is_inferred_from_tensors(random_backbone: ClipBackbone) -> None:
    for kind, learner in (("coop", CoOpLearner(random_backbone, NAMES, n_ctx=2)),
                          ("coop-csc", CoOpLearner(random_backbone, NAMES, n_ctx=2, csc=True)),
                          ("cocoop", CoCoOpLearner(random_backbone, NAMES, n_ctx=2, meta_hidden=7))):
        # Only ctx (+ meta-net): what CoOp's own loader keeps; names given explicitly.
        state = {k: v for k, v in learner.state_dict().items() if not k.startswith("token_")}
        rebuilt = learner_from_state(random_backbone, state, NAMES, None)
        assert rebuilt.learner_type == kind and rebuilt.n_ctx == 2
    with pytest.raises(CheckpointError, match="no class names and no token_suffix"):
        learner_from_state(random_backbone, {"ctx": torch.zeros(2, 128)}, None, None)


def test_backbone_hash_mismatch_is_refused(random_backbone: ClipBackbone, tmp_path: Path) -> None:
    path = save_safetensors(CoOpLearner(random_backbone, NAMES, n_ctx=2), tmp_path / "p.safetensors")
    other = create_backbone("scanner-tiny", seed=1)
    with pytest.raises(BackboneError, match="hashes to"):
        load_checkpoint(path, other)
    # Without the hash check the stored SOS row still betrays the other backbone.
    with pytest.raises(CheckpointError, match="token_prefix"):
        load_checkpoint(path, other, verify_backbone=False)


def test_find_checkpoint_prefers_highest_epoch_then_best_then_ckpt(tmp_path: Path) -> None:
    pl = tmp_path / "MODEL" / "prompt_learner"
    pl.mkdir(parents=True)
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        find_checkpoint(tmp_path / "MODEL")
    (pl / "a.ckpt").write_bytes(b"x")
    assert find_checkpoint(tmp_path / "MODEL") == pl / "a.ckpt"
    (pl / "b.ckpt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"several \.ckpt"):
        find_checkpoint(tmp_path / "MODEL")
    (pl / "model-best.pth.tar").write_bytes(b"x")
    assert find_checkpoint(tmp_path / "MODEL") == pl / "model-best.pth.tar"
    for n in (5, 50, 10):
        (pl / f"model.pth.tar-{n}").write_bytes(b"x")
    assert find_checkpoint(tmp_path / "MODEL") == pl / "model.pth.tar-50"
    assert find_checkpoint(pl / "model.pth.tar-5") == pl / "model.pth.tar-5"
    with pytest.raises(CheckpointError, match="does not exist"):
        find_checkpoint(tmp_path / "missing")


def test_model_best_and_bare_state_dict_ckpt_load(random_backbone: ClipBackbone, tmp_path: Path) -> None:
    learner = _trained_like(CoOpLearner(random_backbone, NAMES, n_ctx=4))
    (tmp_path / "best" / "prompt_learner").mkdir(parents=True)
    torch.save({"state_dict": learner.state_dict(), "epoch": 7, "optimizer": None, "scheduler": None},
               tmp_path / "best" / "prompt_learner" / "model-best.pth.tar")
    # Some forks save the bare state dict of a wrapped model under .ckpt.
    wrapped = {f"module.prompt_learner.{k}": v for k, v in learner.state_dict().items()}
    torch.save(wrapped, tmp_path / "x.ckpt")
    expected = _logits(random_backbone, learner)
    for path in (tmp_path / "best", tmp_path / "x.ckpt"):
        loaded = load_checkpoint(path, random_backbone)
        assert torch.equal(_logits(random_backbone, loaded.learner), expected)


class _Payload:
    """Pickles as a call to Path.touch: a harmless stand-in for arbitrary code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (Path.touch, (str(self.marker),))


def test_pickled_code_is_refused_and_never_run(tmp_path: Path, random_backbone: ClipBackbone) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "MODEL" / "prompt_learner" / "model.pth.tar-1"
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": {"ctx": torch.zeros(2, 128)}, "epoch": 1, "hook": _Payload(marker)}, path)
    with pytest.raises(UnsafeFileError):
        load_checkpoint(tmp_path / "MODEL", random_backbone)
    assert not marker.exists()


def test_failed_dassl_save_leaves_nothing_behind(random_backbone: ClipBackbone, tmp_path: Path) -> None:
    model_dir = tmp_path / "MODEL"
    (model_dir / "classnames.txt").mkdir(parents=True)  # renaming onto a directory fails
    with pytest.raises(OSError):
        save_dassl(CoOpLearner(random_backbone, NAMES, n_ctx=2), model_dir, epoch=1)
    assert sorted(p.name for p in model_dir.iterdir()) == ["classnames.txt"]  # no prompt_learner/, no temp


def test_corrupt_or_foreign_files_are_checkpoint_errors(random_backbone: ClipBackbone,
                                                        tmp_path: Path) -> None:
    bad = tmp_path / "model.pth.tar-1"
    bad.write_bytes(b"not a zip")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(bad, random_backbone)
    assert str(bad) in str(err.value)
    st = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(st))
    with pytest.raises(CheckpointError, match="no 'ctx' tensor"):
        load_checkpoint(st, random_backbone)
    meta_dir = tmp_path / "M"
    save_dassl(CoOpLearner(random_backbone, NAMES, n_ctx=2), meta_dir, epoch=1)
    (meta_dir / "scanner.json").write_text(json.dumps({"learner": {"learner_type": "cocoop"}}))
    with pytest.raises(CheckpointError, match="metadata says learner type 'cocoop'"):
        load_checkpoint(meta_dir, random_backbone)
    with pytest.raises(CheckpointError, match="10-byte"):
        load_checkpoint(meta_dir, random_backbone, max_bytes=10)
