"""CI's trusted twin and its trigger families: the pieces the differential search is built from."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scanner.clip import ClipBackbone
from scanner.engine.invert import REFERENCE_TEMPLATES, ReferenceModel
from scanner.engine.triggers import BlendTrigger, WarpTrigger
from scanner.prompting.classifier import PromptedCLIP
from scanner.prompting.learners import CoOpLearner


def test_blend_trigger_is_a_bounded_convex_mix() -> None:
    trig = BlendTrigger(16, 0.25, torch.Generator().manual_seed(0))
    x = torch.rand(4, 3, 16, 16)
    a = float(trig.alpha().detach())
    assert 0 < a < 0.25
    y = trig(x)
    assert torch.allclose(y, (1 - a) * x + a * trig.pattern(), atol=1e-6)
    assert float((y - x).detach().abs().max()) <= 0.25
    assert 0 < float(trig.size().detach()) < 1


def test_warp_trigger_moves_pixels_by_at_most_its_bound() -> None:
    gen = torch.Generator().manual_seed(0)
    trig = WarpTrigger(32, 2.0, gen)
    with torch.no_grad():
        trig.flow.fill_(10.0)  # saturate tanh: every control point at +2 px in x and y
    disp_px = trig.displacement().detach().abs() * 31 / 2
    assert float(disp_px.max()) <= 2.0 + 1e-4 and float(disp_px.min()) > 1.9
    # a horizontal ramp warped by +2 px in x reads 2 px further along the ramp
    ramp = torch.linspace(0, 1, 32).expand(1, 3, 32, 32).contiguous()
    y = trig(ramp)
    inner = (y - ramp)[..., 4:-4, 4:-4]
    assert torch.allclose(inner, torch.full_like(inner, 2 / 31), atol=2e-3)
    assert trig.image().shape == (3, 32, 32)
    # zero flow is the identity
    with torch.no_grad():
        trig.flow.zero_()
    assert torch.allclose(trig(ramp), ramp, atol=1e-5) and float(trig.size().detach()) == 0.0


def test_twin_is_a_template_panel_taking_each_class_at_its_most_convinced(random_backbone: ClipBackbone) -> None:
    model = PromptedCLIP(random_backbone, CoOpLearner(random_backbone, ["circle", "square", "star"], csc=True))
    ref = ReferenceModel(model)
    assert ref.text.shape == (len(REFERENCE_TEMPLATES), 3, random_backbone.embed_dim)
    feats = torch.randn(5, random_backbone.embed_dim)
    probs = (ref.scale * F.normalize(feats, dim=-1) @ ref.text.transpose(1, 2)).softmax(-1)  # (T, B, C)
    assert torch.allclose(ref.logits(feats).exp(), probs.amax(dim=0), atol=1e-5)


def test_distilled_member_learns_the_suspect_on_clean_features_and_stays_near_zero_shot(
        random_backbone: ClipBackbone) -> None:
    model = PromptedCLIP(random_backbone, CoOpLearner(random_backbone, ["circle", "square", "star", "heart"],
                                                      csc=True))
    gen = torch.Generator().manual_seed(0)
    e = random_backbone.embed_dim
    feats = torch.randn(200, e, generator=gen)
    # a "suspect" whose decisions follow a random linear rule the zero-shot prompts know nothing about
    rule = torch.randn(4, e, generator=gen)
    suspect_logits = 30 * F.normalize(feats, dim=-1) @ F.normalize(rule, dim=-1).T
    ref = ReferenceModel(model)
    zero_shot = ref.text.mean(dim=0)
    ref.distil(feats, suspect_logits, pull=1.0)
    member = ref.text[-1]
    assert ref.text.shape[0] == len(REFERENCE_TEMPLATES) + 1
    # the zero-shot view drops the distilled member and keeps the templates as they were
    plain = ref.zero_shot()
    assert plain.text.shape[0] == len(REFERENCE_TEMPLATES)
    assert torch.equal(plain.text, ReferenceModel(model).text) and plain.scale == ref.scale
    agree = lambda w: float(((F.normalize(feats, dim=-1) @ w.T).argmax(1) == suspect_logits.argmax(1)).float().mean())  # noqa: E731
    assert agree(member) > agree(zero_shot) + 0.2
    # a strong pull keeps the member where it started
    stiff = ReferenceModel(model)
    stiff.distil(feats, suspect_logits, pull=1e4)
    assert float((stiff.text[-1] - F.normalize(zero_shot, dim=-1)).abs().max()) < 0.05
