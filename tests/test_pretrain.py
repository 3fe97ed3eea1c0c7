"""Pre-training of the bundled CLIP: the contrastive objective and a short, reproducible run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from scanner.cli import main
from scanner.zoo.pretrain import Phase, PretrainConfig, contrastive_loss, pretrain


def test_distinct_captions_give_plain_infonce() -> None:
    logits = torch.randn(6, 6, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(6)
    plain = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
    assert torch.allclose(contrastive_loss(logits, None), plain)
    assert torch.allclose(contrastive_loss(logits, list("abcdef")), plain)


def test_identical_captions_are_not_negatives() -> None:
    # Rows 0-2 share a caption ("a star"). Scoring all three stars alike is what the caption says: for
    # the caption-aware loss that is a stationary point, while plain InfoNCE still pushes the three
    # apart (its gradient on the off-diagonal star entries is positive: lower them).
    caps = ["a star", "a star", "a star", "a ring", "a cross", "a moon"]
    same = torch.tensor([[c == d for d in caps] for c in caps]).float()
    logits = (10.0 * same).requires_grad_(True)  # (6, 6)
    (g_aware,) = torch.autograd.grad(contrastive_loss(logits, caps), logits)
    (g_plain,) = torch.autograd.grad(contrastive_loss(logits, None), logits)
    assert g_aware.abs().max() < 1e-3
    assert g_plain[0, 1] > 0.01 and g_plain[0, 0] < -0.01
    # perfect grouping: half the rows pay the entropy log(3) of a uniform target over 3 positives
    assert abs(float(contrastive_loss(logits.detach(), caps)) - 0.5 * math.log(3)) < 1e-3


def test_short_run_is_reproducible_and_freezes() -> None:
    cfg = PretrainConfig(phases=(Phase(2, 1e-3, focus=0.7, caption_aware=True, drill=0.5),), batch_size=8, warmup=1)
    losses: list[float] = []
    a, rec = pretrain(cfg, lambda step, loss, scale: losses.append(loss))
    b, _ = pretrain(cfg)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert a.content_hash() == b.content_hash()
    assert not any(p.requires_grad for p in a.model.parameters())
    assert rec["pairs_seen"] == 16


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_the_stream_does_not_depend_on_how_many_workers_render_it() -> None:
    from dataclasses import replace

    from scanner.zoo.pretrain import _PairStream

    stream = _PairStream(seed=3, batch_size=4, size=32, start=5, stop=10, focus=0.5, drill=0.5)

    def batches(workers: int) -> list[tuple[torch.Tensor, list[str]]]:
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)
        return list(loader)

    alone, three = batches(0), batches(3)  # 5 steps over 3 workers: uneven shares, still in order
    assert len(alone) == len(three) == 5
    for (ia, ca), (ib, cb) in zip(alone, three, strict=True):
        assert ca == cb and torch.equal(ia, ib)
    cfg = PretrainConfig(phases=(Phase(3, 1e-3),), batch_size=8, warmup=1)
    a, _ = pretrain(replace(cfg, workers=0))
    b, rec = pretrain(replace(cfg, workers=2))
    assert a.content_hash() == b.content_hash()
    assert rec["config"]["workers"] == 2 and rec["config"]["device"] == "cpu"  # type: ignore[index]
    with pytest.raises(ValueError, match="workers"):
        PretrainConfig(workers=-1)


def test_a_resumed_run_gives_the_uninterrupted_weights() -> None:
    cfg = PretrainConfig(phases=(Phase(1, 1e-3), Phase(1, 5e-4, focus=0.7, caption_aware=True, drill=0.5)),
                         batch_size=8, warmup=1)
    whole, _ = pretrain(cfg)
    first, _ = pretrain(PretrainConfig(phases=cfg.phases[:1], batch_size=8, warmup=1))
    half = {k: v.half().float() for k, v in first.model.state_dict().items()}  # as a saved phase is stored
    resumed, rec = pretrain(cfg, resume=half, start_phase=1)
    assert rec["resumed_at_phase"] == 1
    assert resumed.content_hash() == whole.content_hash()


def test_pretrain_cli_refuses_bad_resume_arguments(tmp_path: Path) -> None:
    bogus = tmp_path / "w.safetensors"
    bogus.write_bytes(b"not safetensors")
    runner = CliRunner()
    r = runner.invoke(main, ["zoo", "pretrain", "--resume", str(bogus)])
    assert r.exit_code != 0 and "--start-phase" in r.output
    r = runner.invoke(main, ["zoo", "pretrain", "--resume", str(bogus), "--start-phase", "1", "--out",
                             str(tmp_path / "out.safetensors")])
    assert r.exit_code != 0 and "cannot read --resume" in r.output
    r = runner.invoke(main, ["zoo", "pretrain", "--resume", str(bogus), "--start-phase", "99"])
    assert r.exit_code != 0 and "phases" in r.output
    assert not (tmp_path / "out.safetensors").exists()


def test_undescribed_overlays_are_drawn_but_not_named() -> None:
    import numpy as np

    from scanner.zoo.captions import sample_pair

    # overlay phrases (captions._overlays), not background words such as "on a checkered background"
    words = ("sticker", "stamped on it", "dots", "stripes over it", "tinted", "checkered patch", "with noise",
             "warped")

    def pairs(describe: float) -> list[tuple[np.ndarray, str]]:
        rng = np.random.default_rng(5)
        return [sample_pair(rng, 32, describe=describe) for _ in range(300)]

    named, unnamed = pairs(1.0), pairs(0.0)
    assert sum(any(w in cap for w in words) for _, cap in named) > 50
    assert not any(any(w in cap for w in words) for _, cap in unnamed)
    # the same overlays are drawn up to the first overlaid image: only the captions differ there
    first = next(i for i, (_, cap) in enumerate(named) if any(w in cap for w in words))
    assert np.array_equal(named[first][0], unnamed[first][0]) and named[first][1] != unnamed[first][1]
