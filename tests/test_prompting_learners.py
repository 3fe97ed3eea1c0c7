"""Prompt learners and the prompted classifier on the random-init tiny backbone (plumbing, not accuracy)."""

from __future__ import annotations

import pytest
import torch

from scanner.clip import ClipBackbone
from scanner.errors import ConfigError
from scanner.prompting import CoCoOpLearner, CoOpLearner, PromptedCLIP, learner_from_config

NAMES = ["cat", "golden retriever", "fire truck", "sea_lion"]


# tiny models run fastest single-threaded (conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("position", ["end", "middle", "front"])
@pytest.mark.parametrize("csc", [False, True])
def test_coop_shapes_and_coop_state_keys(random_backbone: ClipBackbone, position: str, csc: bool) -> None:
    bb = random_backbone
    learner = CoOpLearner(bb, NAMES, n_ctx=5, csc=csc, class_token_position=position, seed=1)
    d, length = bb.text_width, bb.context_length
    assert learner.ctx.shape == ((4, 5, d) if csc else (5, d))
    assert learner.token_prefix.shape == (4, 1, d)
    assert learner.token_suffix.shape == (4, length - 1 - 5, d)
    assert set(learner.state_dict()) == {"ctx", "token_prefix", "token_suffix"}
    assert learner.learner_type == ("coop-csc" if csc else "coop")
    assert learner.classnames[3] == "sea lion"  # CoOp's underscore handling
    feats = learner.text_features()
    assert feats.shape == (4, bb.embed_dim)
    assert torch.isfinite(feats).all()
    assert not learner.image_conditioned


def _linear(learner: CoCoOpLearner, name: str) -> torch.nn.Linear:
    layer = learner.meta_net.get_submodule(name)
    assert isinstance(layer, torch.nn.Linear)
    return layer


def test_cocoop_shapes_and_batching_equals_per_image(random_backbone: ClipBackbone) -> None:
    learner = CoCoOpLearner(random_backbone, NAMES, n_ctx=4, seed=0)
    # A non-zero meta-net output so images really produce different prompts.
    gen = torch.Generator().manual_seed(0)
    torch.nn.init.normal_(_linear(learner, "linear2").weight, std=0.5, generator=gen)
    img = torch.randn(3, random_backbone.embed_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        batched = learner.text_features(img)
        single = torch.stack([learner.text_features(img[i:i + 1])[0] for i in range(3)])
    assert batched.shape == (3, 4, random_backbone.embed_dim)
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)
    assert (batched[0] - batched[1]).abs().max() > 1e-3  # the prompt depends on the image
    embed = random_backbone.embed_dim
    assert _linear(learner, "linear1").weight.shape == (embed // 16, embed)
    assert learner.learner_type == "cocoop" and learner.image_conditioned
    with pytest.raises(ConfigError, match="image features"):
        learner.text_features(None)


@pytest.mark.parametrize("kind", ["coop-end", "coop-csc-middle", "coop-front", "cocoop"])
def test_the_padding_after_the_last_eot_is_not_encoded(random_backbone: ClipBackbone, kind: str) -> None:
    bb = random_backbone
    learner = (CoCoOpLearner(bb, NAMES, n_ctx=4, seed=0) if kind == "cocoop" else
               CoOpLearner(bb, NAMES, n_ctx=5, csc="csc" in kind, class_token_position=kind.split("-")[-1], seed=1))
    eot = learner.tokenized_prompts.argmax(dim=-1)  # (n_cls,)
    assert learner.text_length == int(eot.max()) + 1 < bb.context_length  # "golden retriever": 1 + 5 + 2 + "." + EOT
    img = torch.randn(3, bb.embed_dim, generator=torch.Generator().manual_seed(1)) if kind == "cocoop" else None
    cut = learner.text_features(img)
    learner.text_length = bb.context_length  # the whole context, padding included
    full = learner.text_features(img)
    torch.testing.assert_close(cut, full, atol=1e-5, rtol=1e-5)  # the causal encoder's EOT never reads the padding
    # and the ONNX path, whose graph takes the whole context, gets all of it
    seen: list[int] = []

    def graph(embeds: torch.Tensor, eot_index: torch.Tensor) -> torch.Tensor:
        seen.append(embeds.shape[1])
        return torch.zeros(embeds.shape[0], bb.embed_dim)

    learner.forward_prompts = graph
    with torch.no_grad():
        learner.text_features(img)
    assert seen == [bb.context_length]


@pytest.mark.parametrize(("position", "template"), [
    ("end", "a photo of a {}."),
    ("middle", "a photo {} of a."),  # half of the 4 context tokens before the name
    ("front", "{} a photo of a."),
])
def test_phrase_init_equals_plain_prompt(random_backbone: ClipBackbone, position: str, template: str) -> None:
    """With ctx = the phrase's embeddings the assembled prompt IS the tokenised sentence."""
    learner = CoOpLearner(random_backbone, NAMES, init="a photo of a", class_token_position=position)
    assert learner.n_ctx == 4
    with torch.no_grad():
        ours = learner.text_features()
        ref = random_backbone.encode_tokens(random_backbone.tokenize([template.format(n) for n in
                                                                      learner.classnames]))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_random_init_is_seeded_and_small(random_backbone: ClipBackbone) -> None:
    a = CoOpLearner(random_backbone, NAMES, seed=3).ctx.detach()
    b = CoOpLearner(random_backbone, NAMES, seed=3).ctx
    c = CoOpLearner(random_backbone, NAMES, seed=4).ctx
    assert a.shape == (16, random_backbone.text_width)  # default n_ctx
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert 0.015 < float(a.std()) < 0.025


def test_invalid_configs_are_config_errors(random_backbone: ClipBackbone) -> None:
    with pytest.raises(ConfigError, match="n_ctx=8"):
        CoOpLearner(random_backbone, NAMES, n_ctx=8, init="a photo of a")
    with pytest.raises(ConfigError, match="class_token_position"):
        CoOpLearner(random_backbone, NAMES, class_token_position="side")
    with pytest.raises(ConfigError, match="context length is 32"):
        CoOpLearner(random_backbone, ["a very long class name " * 3], n_ctx=16)
    with pytest.raises(ConfigError, match="learner type"):
        learner_from_config(random_backbone, NAMES, {"learner_type": "maple"})


def test_learner_from_config_rebuilds_same_structure(random_backbone: ClipBackbone) -> None:
    for learner in (CoOpLearner(random_backbone, NAMES, n_ctx=3, csc=True, class_token_position="front"),
                    CoCoOpLearner(random_backbone, NAMES, n_ctx=2, meta_hidden=5)):
        again = learner_from_config(random_backbone, NAMES, learner.config())
        assert again.config() == learner.config()
        assert {k: v.shape for k, v in again.state_dict().items()} == \
            {k: v.shape for k, v in learner.state_dict().items()}


def test_classifier_logits_are_scaled_cosines(random_backbone: ClipBackbone) -> None:
    bb = random_backbone
    model = PromptedCLIP(bb, CoOpLearner(bb, NAMES, n_ctx=4))
    pixels = torch.rand(5, 3, bb.image_size, bb.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(pixels)
        img = torch.nn.functional.normalize(bb.encode_image(pixels), dim=-1)
        txt = torch.nn.functional.normalize(model.learner.text_features(), dim=-1)
        expected = bb.logit_scale * img @ txt.T
    assert logits.shape == (5, 4)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(model.predict(pixels, batch_size=2), logits, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(model.logits_from_features(bb.encode_image(pixels)), logits)


def test_text_cache_follows_ctx_updates(random_backbone: ClipBackbone) -> None:
    model = PromptedCLIP(random_backbone, CoOpLearner(random_backbone, NAMES, n_ctx=4))
    with torch.no_grad():
        first = model.text_features()
        assert model.text_features() is first  # cached
        # An optimiser step is an in-place update too (a per-dim change: LayerNorm ignores uniform shifts).
        gen = torch.Generator().manual_seed(0)
        model.learner.ctx.add_(torch.randn(model.learner.ctx.shape, generator=gen))
        second = model.text_features()
    assert second is not first
    assert (second - first).abs().max() > 1e-4
    # With grad enabled and a trainable ctx nothing is cached: the result carries a graph.
    assert model.text_features().requires_grad


def test_pixel_gradients_flow_with_frozen_learner(random_backbone: ClipBackbone) -> None:
    """Trigger inversion: learner frozen, gradient w.r.t. pixels; text features from an inference cache."""
    bb = random_backbone
    model = PromptedCLIP(bb, CoOpLearner(bb, NAMES, n_ctx=4))
    model.learner.requires_grad_(False)
    pixels = torch.rand(2, 3, bb.image_size, bb.image_size)
    model.predict(pixels)  # fills the cache under inference_mode
    delta = torch.zeros_like(pixels, requires_grad=True)
    loss = model((pixels + delta).clamp(0, 1))[:, 0].sum()
    loss.backward()
    assert delta.grad is not None and delta.grad.abs().sum() > 0


def test_cocoop_classifier_shapes(random_backbone: ClipBackbone) -> None:
    bb = random_backbone
    model = PromptedCLIP(bb, CoCoOpLearner(bb, NAMES, n_ctx=2))
    pixels = torch.rand(3, 3, bb.image_size, bb.image_size)
    assert model.predict(pixels).shape == (3, 4)
