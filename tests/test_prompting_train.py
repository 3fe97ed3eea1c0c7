"""Few-shot prompt tuning: it learns, it is reproducible, and it never touches the encoders."""

from __future__ import annotations

import io

import pytest
import torch

from scanner.clip import ClipBackbone
from scanner.errors import ConfigError
from scanner.prompting import CoCoOpLearner, CoOpLearner, PromptedCLIP, TrainConfig, train_prompt
from scanner.prompting.train import UNLABELLED

NAMES = ["cat", "dog", "car", "tree"]


# tiny models run fastest single-threaded (conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")
COLOURS = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]])


def _few_shot(size: int, shots: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """4 classes x ``shots``: noisy solid colours, separable even for a random-init image encoder."""
    labels = torch.arange(4).repeat_interleave(shots)
    noise = torch.rand(labels.shape[0], 3, size, size, generator=torch.Generator().manual_seed(seed))
    return (0.6 * COLOURS[labels][:, :, None, None] + 0.4 * noise).clamp(0, 1), labels


def _state_bytes(module: torch.nn.Module) -> bytes:
    buf = io.BytesIO()
    torch.save({k: v.clone() for k, v in module.state_dict().items()}, buf)
    return buf.getvalue()


CFG = TrainConfig(epochs=12, batch_size=8, lr=5e-3, seed=0)


def test_coop_training_fits_and_leaves_encoders_bit_identical(random_backbone: ClipBackbone) -> None:
    images, labels = _few_shot(random_backbone.image_size)
    model = PromptedCLIP(random_backbone, CoOpLearner(random_backbone, NAMES, n_ctx=4, seed=0))
    before = _state_bytes(random_backbone)
    ctx0 = model.learner.ctx.detach().clone()
    record = train_prompt(model, images, labels, CFG)
    assert _state_bytes(random_backbone) == before
    assert not torch.equal(model.learner.ctx.detach(), ctx0)
    assert record.precomputed_features
    assert record.steps == 12 * 2 and len(record.losses) == 12
    assert record.losses[-1] < 0.6 * record.losses[0]
    assert record.accuracies[-1] == 1.0
    assert not model.training and not random_backbone.model.training
    assert (model.predict(images).argmax(-1) == labels).float().mean() == 1.0


def test_training_is_reproducible_from_the_seed(random_backbone: ClipBackbone) -> None:
    images, labels = _few_shot(random_backbone.image_size)
    cfg = TrainConfig(epochs=3, batch_size=8, lr=5e-3, seed=7)
    ctxs = []
    for _ in range(2):
        model = PromptedCLIP(random_backbone, CoOpLearner(random_backbone, NAMES, n_ctx=4, csc=True))
        train_prompt(model, images, labels, cfg)
        ctxs.append(model.learner.ctx.detach())
    assert torch.equal(ctxs[0], ctxs[1])


def test_batch_transform_sees_every_batch_and_poisons_it(random_backbone: ClipBackbone) -> None:
    """The attack hook: relabelling every image to class 0 must teach the model to answer 0."""
    images, labels = _few_shot(random_backbone.image_size)
    seen: list[int] = []

    def to_class0(x: torch.Tensor, y: torch.Tensor,
                  gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        assert isinstance(gen, torch.Generator)
        seen.append(x.shape[0])
        return x, torch.zeros_like(y)

    model = PromptedCLIP(random_backbone, CoOpLearner(random_backbone, NAMES, n_ctx=4))
    record = train_prompt(model, images, labels, TrainConfig(epochs=4, batch_size=8, lr=5e-3),
                          batch_transform=to_class0)
    assert not record.precomputed_features
    assert seen == [8] * 8
    assert (model.predict(images).argmax(-1) == 0).all()


def test_cocoop_training_reduces_loss(random_backbone: ClipBackbone) -> None:
    images, labels = _few_shot(random_backbone.image_size)
    model = PromptedCLIP(random_backbone, CoCoOpLearner(random_backbone, NAMES, n_ctx=2))
    before = _state_bytes(random_backbone)
    record = train_prompt(model, images, labels, TrainConfig(epochs=6, batch_size=8, lr=5e-3, bf16=True))
    assert record.losses[-1] < record.losses[0]
    assert _state_bytes(random_backbone) == before


@pytest.mark.parametrize("conditioned", [False, True])
def test_anchor_pulls_the_learned_text_features_to_it(random_backbone: ClipBackbone, conditioned: bool) -> None:
    images, labels = _few_shot(random_backbone.image_size)
    # the anchor a repair uses: plain class-name prompts (the zero-shot twin's text features), (C, E)
    with torch.no_grad():
        anchor = torch.nn.functional.normalize(random_backbone.encode_tokens(
            random_backbone.tokenize([f"a photo of a {n}." for n in NAMES])).float(), dim=-1)

    def distance(weight: float) -> float:
        learner = (CoCoOpLearner(random_backbone, NAMES, n_ctx=2, seed=0) if conditioned
                   else CoOpLearner(random_backbone, NAMES, n_ctx=4, csc=True, seed=0))
        model = PromptedCLIP(random_backbone, learner)
        train_prompt(model, images, labels, TrainConfig(epochs=20, batch_size=8, lr=1e-2, anchor_weight=weight),
                     text_anchor=anchor)
        with torch.no_grad():
            txt = model.text_features(model.image_features(images))  # (C, E) or (N, C, E)
        return float((txt - anchor).square().sum(-1).mean())

    free, pulled = distance(0.0), distance(16.0)
    assert pulled < 0.5 * free, (free, pulled)


def test_guard_lowers_the_guarded_class_on_other_classes_images(random_backbone: ClipBackbone) -> None:
    images, labels = _few_shot(random_backbone.image_size, shots=6)
    # every image of classes 1-3 carries half the colour of class 0: the guarded class is where their mistakes go
    images = torch.where((labels > 0)[:, None, None, None], 0.5 * images + 0.5 * COLOURS[0][:, None, None], images)

    def guarded_share(weight: float) -> float:
        model = PromptedCLIP(random_backbone, CoOpLearner(random_backbone, NAMES, n_ctx=4, csc=True, seed=0))
        train_prompt(model, images, labels, TrainConfig(epochs=6, batch_size=8, lr=5e-3, seed=0, guard_class=0,
                                                        guard_weight=weight))
        probs = model.predict(images[labels != 0]).softmax(-1)  # (N', C)
        return float(probs[:, 0].mean())

    free, guarded = guarded_share(0.0), guarded_share(4.0)
    assert guarded < 0.7 * free, (free, guarded)


def test_bad_inputs_are_config_errors(random_backbone: ClipBackbone) -> None:
    images, labels = _few_shot(random_backbone.image_size, shots=1)
    model = PromptedCLIP(random_backbone, CoOpLearner(random_backbone, NAMES, n_ctx=4))
    with pytest.raises(ConfigError, match=r"labels must lie in \[0, 4\)"):
        train_prompt(model, images, labels + 1, CFG)
    with pytest.raises(ConfigError, match="images"):
        train_prompt(model, images, labels[:2], CFG)
    with pytest.raises(ConfigError, match="optimizer"):
        TrainConfig(optimizer="lbfgs")
    with pytest.raises(ConfigError, match="anchor_weight"):
        TrainConfig(anchor_weight=-1.0)
    with pytest.raises(ConfigError, match="outlier_weight"):
        TrainConfig(outlier_weight=-0.5)
    with pytest.raises(ConfigError, match="guard_weight"):
        TrainConfig(guard_weight=-1.0)
    with pytest.raises(ConfigError, match="guard_class"):
        TrainConfig(guard_class=-1)
    with pytest.raises(ConfigError, match="guard_class 4 is not a class index"):
        train_prompt(model, images, labels, TrainConfig(epochs=1, guard_class=4, guard_weight=1.0))
    with pytest.raises(ConfigError, match="marks an outlier"):  # -2 is no label, and outliers alone teach no class
        train_prompt(model, images, labels - 2, CFG)
    with pytest.raises(ConfigError, match="at least one row needs a class"):
        train_prompt(model, images, torch.full_like(labels, UNLABELLED), CFG)
    with pytest.raises(ConfigError, match="text_anchor must be"):
        train_prompt(model, images, labels, TrainConfig(epochs=1, anchor_weight=1.0),
                     text_anchor=torch.zeros(3, random_backbone.embed_dim))
    model.learner.requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable"):
        train_prompt(model, images, labels, CFG)


def test_outliers_are_pulled_to_the_uniform_distribution(bundled_backbone: ClipBackbone) -> None:
    """Rows labelled UNLABELLED (outlier exposure): the classes are still learnt, while photos of none of them
    get flatter predictions and stop piling into one class; only the labelled rows make the epoch's accuracy."""
    from scanner.zoo.datasets import get_spec, load_split
    from scanner.zoo.ood import default_ood_pool

    x, y = load_split("shapes", "train", shots=8, size=64)
    keep = torch.nonzero(y < 4).flatten()
    images, labels = x[keep], y[keep]
    names = list(get_spec("shapes").classnames[:4])
    ood = default_ood_pool(160, 64, seed=11)  # 96 exposed, 64 held out
    cfg = TrainConfig(epochs=10, batch_size=32, lr=3e-3, seed=0)

    def flat(model: PromptedCLIP) -> tuple[float, float]:  # held-out photos: mean entropy, largest class share
        p = model.predict(ood[96:]).float().softmax(-1)
        top = torch.bincount(p.argmax(-1), minlength=4).max() / p.shape[0]
        return float(-(p * p.clamp_min(1e-12).log()).sum(-1).mean()), float(top)

    plain = PromptedCLIP(bundled_backbone, CoOpLearner(bundled_backbone, names, n_ctx=4, csc=True, seed=0))
    exposed = PromptedCLIP(bundled_backbone, CoOpLearner(bundled_backbone, names, n_ctx=4, csc=True, seed=0))
    train_prompt(plain, images, labels, cfg)
    record = train_prompt(exposed, torch.cat([images, ood[:96]]),
                          torch.cat([labels, torch.full((96,), UNLABELLED)]), cfg)
    assert 0.0 < record.accuracies[-1] <= 1.0  # over the 32 labelled rows: outliers are neither right nor wrong
    acc = float((exposed.predict(images).argmax(-1) == labels).float().mean())
    assert acc >= float((plain.predict(images).argmax(-1) == labels).float().mean()) - 0.1
    (h_plain, top_plain), (h_exposed, top_exposed) = flat(plain), flat(exposed)
    assert h_exposed > h_plain + 0.1 and top_exposed < top_plain - 0.1, (h_plain, top_plain, h_exposed, top_exposed)
