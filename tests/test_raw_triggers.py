"""Raw triggers: every reconstructed trigger can be re-applied to new images from its raw tensor alone."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from scanner.clip import ClipBackbone
from scanner.engine import DetectorConfig, detect
from scanner.engine import triggers as T
from scanner.prompting.classifier import PromptedCLIP
from scanner.prompting.learners import CoOpLearner

S = 16
_MAKERS: dict[str, Callable[[torch.Generator], T.Trigger]] = {
    "additive": lambda g: T.AdditiveTrigger(S, 0.1, g),
    "patch": lambda g: T.PatchTrigger(S, g),
    "pixel": lambda g: T.PixelTrigger(S, g),
    "blend": lambda g: T.BlendTrigger(S, 0.25, g),
    "warp": lambda g: T.WarpTrigger(S, 2.0, g),
    "sticker": lambda g: T.StickerTrigger(S, 4, g),
}


@pytest.mark.parametrize("family", sorted(_MAKERS))
def test_raw_form_reapplies_the_trigger_exactly(family: str) -> None:
    g = torch.Generator().manual_seed(0)
    trig = _MAKERS[family](g)
    with torch.no_grad():  # move away from the initialisation so every parameter matters
        for p in trig.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    x = torch.rand(3, 3, S, S, generator=g)
    raw = trig.raw()
    assert not raw.requires_grad and raw.shape[1:] == (S, S)
    torch.testing.assert_close(T.apply_raw(raw, x), trig(x).detach(), atol=1e-6, rtol=0)
    # the random translation of a shifted trigger is an augmentation, not part of the trigger
    assert torch.equal(T.ShiftedTrigger(trig, 3, g).raw(), raw)


def test_raw_forms_and_bad_shapes() -> None:
    assert T.raw_form(torch.zeros(3, S, S)) == "additive"
    assert T.raw_form(torch.zeros(4, S, S)) == "patch"
    assert T.raw_form(torch.zeros(2, S, S)) == "warp"
    # a zero warp is the identity; a zero-mask patch leaves the image alone
    x = torch.rand(2, 3, S, S)
    torch.testing.assert_close(T.apply_raw(torch.zeros(2, S, S), x), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(T.apply_raw(torch.zeros(4, S, S), x), x)
    with pytest.raises(ValueError, match="raw trigger is"):
        T.raw_form(torch.zeros(5, S, S))
    with pytest.raises(ValueError, match="images must be"):
        T.apply_raw(torch.zeros(3, S, S), torch.rand(2, 3, 8, 8))


def test_a_sticker_changes_one_small_square_only() -> None:
    g = torch.Generator().manual_seed(3)
    trig = T.StickerTrigger(S, 4, g)
    x = torch.rand(5, 3, S, S, generator=g)
    changed = (trig(x) - x).detach().abs().amax(dim=(0, 1)) > 0  # (S, S)
    rows, cols = changed.nonzero(as_tuple=True)
    assert int(changed.sum()) == 16 and int(rows.max() - rows.min()) == 3 and int(cols.max() - cols.min()) == 3
    assert float(trig.size()) == pytest.approx(16 / S**2)
    assert list(trig.parameters()) == [trig.p]  # the square is fixed: only its pattern is learned


def test_a_grid_start_puts_nine_opaque_squares_and_keeps_the_soft_starts_pattern() -> None:
    from scanner.engine.ci import make_trigger
    from scanner.errors import ConfigError

    logits = T.grid_mask_logits(64, 6)
    assert logits.shape == (1, 64, 64)
    on = logits[0] > 0  # (64, 64)
    assert int(on.sum()) == 9 * 36
    rows, cols = on.any(dim=1).nonzero()[:, 0], on.any(dim=0).nonzero()[:, 0]
    assert len(rows) == len(cols) == 18  # three bands of 6 px each way, one square per ninth of the image
    assert {int(r) // 22 for r in rows} == {int(c) // 22 for c in cols} == {0, 1, 2}
    cfg = DetectorConfig(max_shift=0)
    soft = make_trigger("patch", 64, cfg, torch.Generator().manual_seed(5))
    grid = make_trigger("patch", 64, DetectorConfig(max_shift=0, patch_start="grid"), torch.Generator().manual_seed(5))
    assert isinstance(soft, T.PatchTrigger) and isinstance(grid, T.PatchTrigger)
    assert torch.equal(soft.p, grid.p)  # the same draws: only the mask's start differs
    assert float(soft.mask().detach().mean()) == pytest.approx(0.05, abs=0.01)
    assert torch.equal(grid.mask() > 0.5, on[None]) and float(grid.mask().detach()[on[None]].min()) > 0.999
    with pytest.raises(ConfigError, match="patch_start"):
        DetectorConfig(patch_start="corner")


@pytest.mark.parametrize("detector", ["ci", "nc"])
def test_detectors_return_reapplicable_raw_triggers(random_backbone: ClipBackbone, detector: str) -> None:
    model = PromptedCLIP(random_backbone, CoOpLearner(random_backbone, ["circle", "square", "star"], csc=True))
    pool = torch.rand(48, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    cfg = DetectorConfig(detector=detector, n_images=48, batch_size=12, holdout=0.25, candidates=1)
    res = detect(model, pool, cfg, seed=0)
    assert res.raw_triggers and set(res.raw_triggers) == set(res.trigger_images)
    for k, raw in res.raw_triggers.items():
        assert res.trigger_forms[k] in ("additive", "patch", "warp")
        out = T.apply_raw(raw, pool[:4])
        assert out.shape == (4, 3, 64, 64) and float(out.min()) >= 0 and float(out.max()) <= 1
