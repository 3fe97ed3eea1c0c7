"""Detection cost against the class count: CI (drift-ranked candidates, confirmed) vs the plain per-class protocol.

    python benchmarks/detect_speed.py [--n-images 1000] [--plain-classes 10] [--candidates C] [--student-steps 300]

Builds CSC-CoOp models on the bundled CLIP for the 10-class ``shapes`` and the 120-class
``colour_shape`` class lists (the prompts are not trained: cost depends on the shapes of the work, not on
the prompt's values), then times ``detect`` side by side in one run on the same OOD pool:

* ``ci`` on both models (the product's default configuration);
* ``ci`` on the 10-class model without ``search_all_families``: the patch alone, the one family the
  default "patch-margin" score reads (the default also searches the sticker, so that the patch gets the
  random draws its line was fitted with);
* the same with ``awake_candidate``: the class clean OOD images fall into most beyond plain prompts is
  confirmed too (one more candidate's search when it is not the most drifted class);
* ``ci`` on the 10-class model at the other precision than the one in force (``DetectorConfig.bf16``: bf16
  autocast where the CPU computes bf16 natively, fp32 where it would be emulated);
* ``ci`` on both models with the distilled student (``--student-steps``, default 300: the option's cost; 0 skips it);
* ``ci-plain`` (one targeted inversion per class and family, one epoch each) on the 10-class model,
  timed on ``--plain-classes`` classes and scaled linearly to the class count — the plain protocol is a
  per-class loop of identical epochs, so its cost is linear by construction (printed as "extrapolated"
  unless every class was run).

Printed figures: seconds per model, ci(120) / ci(10) (the issue's bar: <= 2x) and plain / ci ratios.
Timings on a shared machine vary; the ratios are measured in one run, side by side.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from scanner.clip.backbone import load_bundled
from scanner.engine import DetectionResult, DetectorConfig, detect
from scanner.engine.invert import native_bf16
from scanner.prompting.classifier import PromptedCLIP
from scanner.prompting.learners import CoOpLearner
from scanner.zoo.datasets import get_spec
from scanner.zoo.ood import default_ood_pool


def _timed(model: PromptedCLIP, pool: torch.Tensor, cfg: DetectorConfig) -> tuple[float, DetectionResult]:
    t0 = time.perf_counter()
    res = detect(model, pool, cfg, seed=0)
    return time.perf_counter() - t0, res


def _time(model: PromptedCLIP, pool: torch.Tensor, cfg: DetectorConfig) -> float:
    return _timed(model, pool, cfg)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-images", type=int, default=1000)
    ap.add_argument("--plain-classes", type=int, default=10, help="classes the plain protocol is timed on")
    ap.add_argument("--candidates", type=int, default=None, help="classes CI confirms (default: the engine's)")
    ap.add_argument("--student-steps", type=int, default=300, help="CI with a distilled student of this many steps "
                    "on both models (0: skip)")
    args = ap.parse_args()
    torch.manual_seed(0)
    bb = load_bundled()
    pool = default_ood_pool(args.n_images, bb.image_size, seed=0)
    cfg = DetectorConfig(n_images=args.n_images).on("cpu")  # the precision in force on this CPU
    if args.candidates is not None:
        cfg = replace(cfg, candidates=args.candidates)
    models = {n: PromptedCLIP(bb, CoOpLearner(bb, list(get_spec(d).classnames), csc=True, seed=0))
              for n, d in (("10", "shapes"), ("120", "colour_shape"))}
    _time(models["10"], pool, replace(cfg, families=("additive",), candidates=1))  # warm-up (allocations, caches)
    ci = {n: _time(m, pool, cfg) for n, m in models.items()}
    small = models["10"]
    scored_cfg = replace(cfg, search_all_families=False)
    scored = _time(small, pool, scored_cfg)
    awake, awake_res = _timed(small, pool, replace(scored_cfg, awake_candidate=True))
    n_awake = sum(int(c.evidence["candidate"]) for c in awake_res.classes)
    other = _time(small, pool, replace(cfg, bf16=not cfg.bf16))
    taught = ({n: _time(m, pool, replace(cfg, student_steps=args.student_steps)) for n, m in models.items()}
              if args.student_steps else {})
    k = min(args.plain_classes, small.n_cls)
    sub = PromptedCLIP(bb, CoOpLearner(bb, list(small.classnames[:k]), csc=True, seed=0))
    plain = _time(sub, pool, replace(cfg, detector="ci-plain")) * small.n_cls / k
    tag = "" if k == small.n_cls else f" (extrapolated from {k} classes)"
    only = ", ".join(scored_cfg.search_families(False))
    print(f"OOD images {args.n_images}, families searched {', '.join(cfg.search_families(False))}, "
          f"score {cfg.trigger_score}, candidates {cfg.candidates}, threads {torch.get_num_threads()}, "
          f"precision {'bf16' if cfg.bf16 else 'fp32'} (this CPU computes bf16 "
          f"{'natively' if native_bf16('cpu') else 'by emulation'})")
    print(f"ci        10 classes: {ci['10']:7.1f} s (bar <= 30 s)")
    print(f"ci        10 classes in {'fp32' if cfg.bf16 else 'bf16'}: {other:7.1f} s   ratio {other / ci['10']:.2f}x")
    print(f"ci        10 classes, the scored families alone ({only}): {scored:7.1f} s   "
          f"ratio {scored / ci['10']:.2f}x")
    print(f"ci        10 classes, the scored families, and the awake class ({n_awake} classes confirmed): "
          f"{awake:7.1f} s   ratio {awake / ci['10']:.2f}x")
    print(f"ci       120 classes: {ci['120']:7.1f} s   ratio 120/10 = {ci['120'] / ci['10']:.2f}x (bar <= 2x)")
    if taught:
        print(f"ci with a {args.student_steps}-step student, 10 classes: {taught['10']:7.1f} s   ratio "
              f"{taught['10'] / ci['10']:.2f}x; 120 classes: {taught['120']:7.1f} s   ratio "
              f"{taught['120'] / ci['120']:.2f}x, 120/10 = {taught['120'] / taught['10']:.2f}x")
    print(f"ci-plain  10 classes: {plain:7.1f} s{tag}   plain/ci = {plain / ci['10']:.1f}x")
    print(f"ci-plain 120 classes: {plain * 12:7.1f} s (linear in classes)   plain/ci = {plain * 12 / ci['120']:.1f}x")


if __name__ == "__main__":
    main()
