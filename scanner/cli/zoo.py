"""``scanner zoo ...``: the offline world — pre-training, datasets, zoo building and evaluation.

Heavy imports (torch) happen inside the commands so ``scanner --help`` stays instant.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, NoReturn

import click

from scanner.cli import main
from scanner.cli._shared import csv_list, csv_set, device_option, fail, families_or_none, trigger_score_option
from scanner.errors import ScannerError


def _fail(exc: ScannerError) -> NoReturn:
    fail(str(exc), 2)


@main.group()
def zoo() -> None:
    """The offline world: bundled CLIP pre-training, datasets, model zoos and their evaluation."""


@zoo.command()
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="where to write the weights (default: the bundled location inside the package)")
@click.option("--steps", type=int, default=None, help="optimiser steps (default: the recipe's)")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--resume", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="weights (safetensors) saved after --start-phase phases of the same recipe: continue from them")
@click.option("--start-phase", type=click.IntRange(min=0), default=0, show_default=True,
              help="how many phases the --resume weights have done")
@device_option("torch device for the training steps: cpu, cuda")
@click.option("--workers", type=click.IntRange(min=0), default=1, show_default=True,
              help="processes rendering training pairs (on a GPU: about the number of free CPU cores)")
def pretrain(out: Path | None, steps: int | None, seed: int, resume: Path | None, start_phase: int, device: str,
             workers: int) -> None:
    """Contrastively pre-train the bundled tiny CLIP from scratch, or resume it between phases
    (reproducible from the seed: a resumed run gives the weights an uninterrupted one gives)."""
    from dataclasses import replace

    from tqdm import tqdm

    from scanner.clip.backbone import bundled_weights_path, read_fp32_weights
    from scanner.zoo.pretrain import Phase, PretrainConfig, pretrain, save_weights

    cfg = PretrainConfig(seed=seed, device=device, workers=workers)
    if steps is not None:  # a short run for a smoke test: one phase at the first phase's rate
        cfg = replace(cfg, phases=(Phase(steps, cfg.phases[0].lr),))
    if (resume is None) != (start_phase == 0):
        _fail(ScannerError("--resume and --start-phase go together: the weights and how many phases they have done"))
    if start_phase >= len(cfg.phases):
        _fail(ScannerError(f"--start-phase {start_phase}: the recipe has {len(cfg.phases)} phases"))
    state = None
    if resume is not None:
        from safetensors import SafetensorError

        try:
            state = read_fp32_weights(resume)
        except (SafetensorError, OSError) as exc:
            _fail(ScannerError(f"cannot read --resume {resume} as safetensors weights: {exc}"))
    bar = tqdm(total=cfg.steps, initial=cfg.steps_before(start_phase), desc="pre-training", unit="step")

    def on_step(step: int, loss: float, scale: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", scale=f"{scale:.1f}")

    try:
        bb, record = pretrain(cfg, on_step, resume=state, start_phase=start_phase)
    except ScannerError as exc:
        _fail(exc)
    bar.close()
    dest = out or bundled_weights_path()
    digest = save_weights(bb, dest, record)
    click.echo(f"wrote {dest} (sha256 of weights {digest[:16]}…); record: {json.dumps(record)}")


@zoo.command()
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--no-coop", is_flag=True, help="skip the 16-shot CoOp column (zero-shot only, fast)")
@click.option("--no-probe", is_flag=True, help="skip the 16-shot linear-probe column")
@click.option("--datasets", help="comma-separated dataset names (default: all)")
def info(as_json: bool, seed: int, no_coop: bool, no_probe: bool, datasets: str | None) -> None:
    """Per dataset: classes, shots available, zero-shot, 16-shot linear-probe and 16-shot CoOp accuracy of
    the bundled CLIP; then the means per group (as in pre-training, shifted, generated, all) with CoOp's gain
    over zero-shot."""
    from scanner.clip import load_bundled
    from scanner.zoo.quality import dataset_table, summary_lines

    try:
        rows = dataset_table(load_bundled(), seed=seed, coop=not no_coop, probe=not no_probe,
                             datasets=csv_list(datasets),
                             progress=None if as_json else lambda n: click.echo(f"  measuring {n}…", err=True))
    except ScannerError as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'dataset':14s} {'classes':>7s} {'shots':>5s} {'zero-shot':>9s} {'probe-16':>8s} {'CoOp-16':>8s} "
               f"{'CoOp s':>7s}")
    for r in rows:
        probe = f"{r['linear_probe16']:.3f}" if r.get("linear_probe16") is not None else "-"
        coop = f"{r['coop16']:.3f}" if r.get("coop16") is not None else "-"
        secs = f"{r['coop_seconds']:.1f}" if r.get("coop_seconds") is not None else "-"
        click.echo(f"{r['dataset']:14s} {r['classes']:7d} {r['shots']:5d} {r['zero_shot']:9.3f} {probe:>8s} "
                   f"{coop:>8s} {secs:>7s}")
    for line in summary_lines(rows):
        click.echo(line)


@zoo.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--datasets",
              help="comma-separated dataset names (default: the twelve unshifted ones, or two with --quick)")
@click.option("--attacks", help="comma-separated attack names (default: all registered)")
@click.option("--clean-per-dataset", type=int, default=None,
              help="clean models per dataset (default 2; 1 with --quick)")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--quick", is_flag=True, help="a small zoo for tests and demos: 2 datasets x {1 clean, 4 attacks}")
@device_option("torch device the models train on: cpu, cuda")
def build(out: Path, datasets: str | None, attacks: str | None, clean_per_dataset: int | None, seed: int,
          quick: bool, device: str) -> None:
    """Build (or resume) a zoo of clean and backdoored prompt-tuned models with a ground-truth manifest."""
    from tqdm import tqdm

    from scanner.clip import load_bundled
    from scanner.zoo.build import ZooPlan, build_zoo, plan_jobs, summarise

    try:
        plan = ZooPlan.make(csv_list(datasets), csv_list(attacks), clean_per_dataset, seed, quick)
        bar = tqdm(total=len(plan_jobs(plan)), desc="zoo", unit="model")

        def on_model(i: int, n: int, entry: dict[str, Any] | None) -> None:
            bar.update(1)
            if entry is not None:
                asr = ""
                if entry["asr_id"] is not None:
                    asr = f" asr-id {entry['asr_id']:.2f} asr-ood {entry['asr_ood']:.2f}"
                bar.write(f"{entry['id']:24s} {entry['learner']:9s} ca {entry['ca']:.3f}{asr} "
                          f"({entry['train_seconds']:.0f}s)")

        t0 = time.perf_counter()
        manifest = build_zoo(out, plan, load_bundled(), on_model=on_model, device=device)
        bar.close()
    except ScannerError as exc:
        _fail(exc)
    click.echo(json.dumps({"zoo": str(out), "models": len(manifest["models"]),
                           "seconds": round(time.perf_counter() - t0, 1), "summary": summarise(manifest)}, indent=2))


@zoo.command("eval")
@click.argument("zoo_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--detectors", default="ci,nc,pixel", show_default=True)
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="per-model verdicts and scores (resumable)")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--n-images", type=int, default=1000, show_default=True)
@click.option("--threshold", type=float, default=None,
              help="decision threshold (default: the detector's own; CI: patch margin 6.09375, others: anomaly k 2)")
@click.option("--accel", type=click.Choice(["auto", "onnx", "torch"]), default="auto", show_default=True,
              help="forward-only encoder work: onnxruntime (torch fallback), torch, or onnx when installed")
@click.option("--int8", "accel_int8", is_flag=True, help="int8 image encoder where it keeps >= 99% top-1 agreement")
@click.option("--candidates", type=click.IntRange(1), default=None,
              help="classes CI confirms with trigger inversion, most drifted first (default: the detector's, 1)")
@click.option("--flat-candidates", type=click.IntRange(0), default=None,
              help="CI: classes confirmed when no class's ranking anomaly reaches 2 (default: the detector's, 0 = off)")
@click.option("--kappa", type=click.FloatRange(min=0.0, min_open=True), default=None,
              help="CI: the logit margin its trigger searches ask for (default: the detector's, 1)")
@click.option("--restarts", type=click.IntRange(1), default=None,
              help="CI: searches of each scored trigger family per candidate (default: the detector's, 1)")
@click.option("--restart-rule", type=click.Choice(["mean", "best"]), default=None,
              help="CI: a candidate's evidence from its restarts: their mean, or the best one's (default: mean)")
@click.option("--patch-start", type=click.Choice(["soft", "grid", "both"]), default=None,
              help="CI: start the patch search from a soft 5% mask, from nine opaque squares, or from both keeping the "
                   "better (default: both, line 6.09375; soft or grid alone: 5.96875)")
@click.option("--dormant-lift", type=float, default=None, metavar="LOGITS",
              help="CI: flag a CoOp model whose most drifted prompt wins clean OOD images by a median margin this "
                   "much above the zero-shot twin's (rule D, off by default; its judged line: -0.875; inf: off)")
@click.option("--precision", type=click.Choice(["bf16", "fp32", "auto"]), default=None,
              help="encoder passes under bf16 autocast or in fp32 (default: auto, bf16 where the device computes it "
                   "natively: emulated bf16 is slower than fp32)")
@click.option("--awake-candidate", is_flag=True,
              help="CI: also confirm the class clean OOD images fall into most beyond plain prompts")
@click.option("--families", default=None, metavar="F1,F2",
              help="trigger families CI confirms with (default: the detector's); a run of a new family alone "
                   "joins a saved run with benchmarks/family_added_cv.py")
@click.option("--conditioned-ranking", type=click.Choice(["reach", "drift"]), default=None,
              help="how CI ranks the classes of image-conditioned (CoCoOp) models (default: the detector's, reach)")
@click.option("--conditioned-families", default=None, metavar="F1,F2|none",
              help="families CI adds for image-conditioned models (default: the detector's, additive)")
@trigger_score_option
@click.option("--student-steps", type=click.IntRange(0), default=None,
              help="CI: distil student prompts from the suspect on clean OOD photos in this many Adam steps and "
                   "record what every trigger does to it (default: the detector's; 0: none; --trigger-score "
                   "patch-student scores by it)")
@click.option("--scored-families-only", is_flag=True,
              help="CI: search only the trigger families its score reads (patch-margin reads the patch alone): "
                   "half the time, other random draws; the default line was fitted with every family searched")
@device_option("torch device for the searches: cpu, cuda, cuda:1")
@click.option("--shard", default=None, metavar="K/N",
              help="evaluate only every N-th model from the K-th (parallel runs; join them with `scanner zoo report`)")
@click.option("--learners", default=None, metavar="L1,L2",
              help="evaluate only the models tuned by these learners (coop, coop-csc, cocoop)")
@click.option("--attacks", "attack_names", default=None, metavar="A1,A2",
              help="evaluate only the models of these attacks (none: the clean models)")
def eval_(zoo_dir: Path, detectors: str, json_out: Path | None, seed: int, n_images: int,
          threshold: float | None, accel: str, accel_int8: bool, candidates: int | None,
          flat_candidates: int | None, kappa: float | None,
          restarts: int | None, restart_rule: str | None, patch_start: str | None, dormant_lift: float | None,
          precision: str | None, awake_candidate: bool, families: str | None, conditioned_ranking: str | None,
          conditioned_families: str | None, trigger_score: str | None, student_steps: int | None,
          scored_families_only: bool, device: str, shard: str | None, learners: str | None,
          attack_names: str | None) -> None:
    """Run detectors on every model of a zoo; print accuracy, AUROC, TPR/FPR, target accuracy, seconds."""
    from dataclasses import replace

    from tqdm import tqdm

    from scanner.clip import load_bundled
    from scanner.engine import DETECTORS, DetectorConfig
    from scanner.zoo.detect_eval import evaluate_zoo, load_manifest, parse_shard, shard_models

    dets = csv_list(detectors) or []
    bad = [d for d in dets if d not in DETECTORS]
    if bad:
        raise click.BadParameter(f"unknown detector(s) {bad}; expected from {', '.join(DETECTORS)}")
    try:
        part = parse_shard(shard) if shard is not None else None
        cfg = DetectorConfig(n_images=n_images)
        if threshold is not None:
            cfg = replace(cfg, threshold=threshold)
        if candidates is not None:
            cfg = replace(cfg, candidates=candidates)
        if flat_candidates is not None:
            cfg = replace(cfg, flat_candidates=flat_candidates)
        if awake_candidate:
            cfg = replace(cfg, awake_candidate=True)
        if kappa is not None:
            cfg = replace(cfg, kappa=kappa)
        if restarts is not None:
            cfg = replace(cfg, restarts=restarts)
        if restart_rule is not None:
            cfg = replace(cfg, restart_rule=restart_rule)
        if patch_start is not None:
            cfg = replace(cfg, patch_start=patch_start)
        if dormant_lift is not None:
            cfg = replace(cfg, dormant_lift=dormant_lift)
        if precision is not None:
            cfg = replace(cfg, bf16=None if precision == "auto" else precision == "bf16")
        if families is not None:
            cfg = replace(cfg, families=tuple(csv_list(families) or ()))
        if conditioned_ranking is not None:
            cfg = replace(cfg, conditioned_reach=conditioned_ranking == "reach")
        if conditioned_families is not None:
            cfg = replace(cfg, conditioned_families=families_or_none(conditioned_families))
        if student_steps is not None:
            cfg = replace(cfg, student_steps=student_steps)
        if trigger_score is not None:
            cfg = replace(cfg, trigger_score=trigger_score)
        if scored_families_only:
            cfg = replace(cfg, search_all_families=False)
        manifest = load_manifest(zoo_dir)
        chosen, picked = csv_set(learners), csv_set(attack_names)
        n = len(shard_models(manifest["models"], part, chosen, picked)) * len(dets)
        bar = tqdm(total=n, desc="eval", unit="run")

        def on_result(r: dict[str, Any]) -> None:
            bar.update(1)
            bar.write(f"{r['id']:24s} {r['detector']:8s} truth={'B' if r['truth_backdoored'] else 'C'}:"
                      f"{r['truth_target']} flagged={int(r['flagged'])} target={r['target']} "
                      f"score={r['anomaly_score']:.2f} ({r['seconds']:.1f}s)")

        rows = evaluate_zoo(zoo_dir, load_bundled(), dets, out=json_out, config=cfg, seed=seed, on_result=on_result,
                            accel=accel, accel_int8=accel_int8, device=device, shard=part,
                            learners=chosen, attacks=picked)
        bar.close()
    except ScannerError as exc:
        _fail(exc)
    _print_report(rows, manifest, json_out)


@zoo.command("report")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--zoo", "zoo_dir", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="the zoo the files evaluated: adds the split by whether each backdoor works on OOD images")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="write the merged rows here (resumable)")
def report_(files: tuple[Path, ...], zoo_dir: Path | None, json_out: Path | None) -> None:
    """Print `zoo eval`'s report from saved `--json` files, joining shards or per-detector runs."""
    from scanner.zoo.detect_eval import load_manifest, merge_rows, write_rows

    try:
        merged = merge_rows(files)
        manifest = load_manifest(zoo_dir) if zoo_dir is not None else None
        if json_out is not None:
            write_rows(json_out, merged)
    except ScannerError as exc:
        _fail(exc)
    click.echo(f"{len(merged['rows'])} rows from {len(files)} file(s)")
    _print_report(merged["rows"], manifest, json_out)


def _print_report(rows: list[dict[str, Any]], manifest: dict[str, Any] | None, json_out: Path | None) -> None:
    from scanner.zoo.detect_eval import report

    rep = report(rows, manifest)
    for det, r in rep.items():
        o = r["overall"]
        auroc = None if o["auroc"] is None else round(o["auroc"], 3)
        both = "" if o["auroc_combined"] is None or det != "ci" else f" (both channels {o['auroc_combined']:.3f})"
        click.echo(f"\n== {det}: accuracy {o['accuracy']:.3f}  AUROC {auroc}{both}"
                   f"  TPR {o['tpr']}  FPR {o['fpr']}  target-acc {o['target_accuracy']}  "
                   f"s/model {o['seconds_mean']:.1f}  by #classes {o['seconds_by_classes']}")
        for key in ("by_attack", "by_dataset", "by_ood_asr"):
            for name, m in r.get(key, {}).items():
                click.echo(f"   {key[3:]:8s} {name:14s} n={m['models']:3d} acc {m['accuracy']:.2f} "
                           f"tpr {m['tpr']} fpr {m['fpr']} target {m['target_accuracy']}")
    if json_out is not None:
        click.echo(f"\nper-model rows: {json_out}")
