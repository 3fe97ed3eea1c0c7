"""``scanner repair`` and ``scanner zoo repair-eval`` / ``repair-bench``: thin shells over scanner.repair.

Exit codes of ``repair``: 0 a repaired model was written (warnings, e.g. "the model scans clean", go to
stderr); 2 usage or input the user can fix (bad flag, data folder that does not match the model's
classes, too few images, output path that exists or would touch the input, saved detection of another
model) — nothing written; 3 the model could not be loaded or processed (corrupt, unsafe, missing
backbone, detector failure) — nothing written; 4 no adapter recognises MODEL.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from scanner.cli import main
from scanner.cli._shared import csv_set, fail, families_or_none, model_source_options, settings_or_exit
from scanner.cli.zoo import zoo
from scanner.errors import ConfigError, DatasetError, ScannerError
from scanner.report import ExitCode

# RepairConfig's modes, its default first, and its OOD labellers (repeated here so that `scanner --help` does not
# import torch; a test checks they agree). reinit became the default in session 28 (docs/preregistrations.md)
REPAIR_MODES = ("reinit", "finetune")
OOD_LABEL_CHOICES = ("zero-shot", "model", "outlier")


# one flag for `repair` and `zoo repair-eval`: RepairConfig.target_guard, None keeping the repair's default
target_guard_option = click.option(
    "--target-guard", type=float, default=None, metavar="W",
    help="Weight of a cost on sending images of other classes to the suspected target (-log(1 - p_target); "
         "0 = off; default: the repair's).")

# one flag for `repair` and `zoo repair-eval`: RepairConfig.reference_suspect, None keeping the repair's default
reference_suspect_option = click.option(
    "--reference-suspect/--no-reference-suspect", default=None,
    help="Check the guarded class against the labelled images: the class whose prompt drifted furthest from a fresh "
         "prompt tuned on them replaces the detection's suspect when it stands out further (one more tuning pass; "
         "CoOp prompts; default: the repair's).")

# one flag for `repair` and `zoo repair-eval`: RepairConfig.twin_anchor
twin_anchor_option = click.option(
    "--twin-anchor", type=float, default=0.0, show_default=True, metavar="W",
    help="Pull the repaired text features towards the zero-shot twin's with weight W (KgCoOp's regulariser; "
         "0 = off). Raises clean accuracy; see the README for what it does to ASR.")


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


@main.command("repair")
@click.argument("model", type=click.Path(exists=True, path_type=Path))
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Labelled images: one sub-folder of PNG/JPEG images per class name (few-shot is enough).")
@click.option("--shots", type=int, help="Use at most K images per class (the first by path).")
@click.option("--out", type=click.Path(path_type=Path),
              help="Where to write the repaired model (default: MODEL-repaired/ or NAME.repaired.safetensors).")
@click.option("--report", type=click.Path(exists=True, path_type=Path),
              help="Reuse a saved detection (detection.safetensors, or a scan-once --report-dir) instead of "
                   "detecting again.")
@click.option("--save-detection", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the detection used (detection.safetensors) here, for later --report.")
@click.option("--mode", type=click.Choice(REPAIR_MODES), default=REPAIR_MODES[0], show_default=True,
              help="reinit: a fresh context tuned on the repair set (the prompt is all a provider could plant a "
                   "backdoor in); finetune: re-align the delivered prompt.")
@twin_anchor_option
@target_guard_option
@reference_suspect_option
@model_source_options
@click.option("--json", "as_json", is_flag=True, help="Print the repair record as JSON on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress on stderr.")
def repair_cmd(model: Path, data_dir: Path, shots: int | None, out: Path | None, report: Path | None,
               save_detection: Path | None, mode: str, twin_anchor: float, target_guard: float | None,
               reference_suspect: bool | None, ood_dir: Path | None, seed: int | None,
               config: Path | None, backbones: tuple[str, ...], as_json: bool, quiet: bool) -> None:
    """Repair a backdoored prompt: fine-tune it on labelled clean images plus the same images carrying the
    reconstructed trigger under their true labels; write the result next to MODEL (never over it).

    \b
    Exit codes: 0 repaired model written; 2 usage / input to fix (nothing written);
    3 model could not be loaded or processed; 4 no adapter recognises MODEL.
    """
    settings = settings_or_exit(config, backbones, {"seed": seed, "ood_dir": ood_dir})
    from scanner.repair import RepairConfig
    from scanner.repair.run import NothingToRepair, repair_path

    try:
        cfg = RepairConfig(mode=mode, twin_anchor=twin_anchor)
        given: dict[str, Any] = {"target_guard": target_guard, "reference_suspect": reference_suspect}
        cfg = replace(cfg, **{k: v for k, v in given.items() if v is not None})
    except ConfigError as exc:
        fail(str(exc), int(ExitCode.USAGE))

    def emit(msg: str) -> None:
        if not quiet:
            click.echo(f"scanner: {msg}", err=True)

    try:
        outcome = repair_path(model, data_dir, settings, out=out, shots=shots, report=report, config=cfg,
                              save_detection_to=save_detection, emit=emit)
    except (ConfigError, DatasetError) as exc:
        fail(f"{exc} (nothing was written)", int(ExitCode.USAGE))
    except NothingToRepair as exc:
        fail(str(exc), int(ExitCode.NOTHING_SCANNABLE))
    except ScannerError as exc:
        fail(f"{exc} (nothing was written)", int(ExitCode.ERROR))
    for w in outcome.warnings:
        click.echo(f"scanner: warning: {w}", err=True)
    if as_json:
        click.echo(json.dumps({"output": str(outcome.output), "format": outcome.format, "warnings": outcome.warnings,
                               "repair": outcome.metadata}, indent=2))
        return
    r = outcome.result
    click.echo(f"repaired model: {outcome.output} ({outcome.format}, {r.mode}, {r.steps} steps, {r.seconds:.1f} s)")
    trig = outcome.metadata["trigger"]
    click.echo(f"detection: {'backdoored' if trig['flagged'] else 'clean'}"
               + (f", suspected target {trig['target_name']!r}" if trig["target_name"] else "")
               + f", {len(trig['classes'])} reconstructed trigger(s) used ({trig['detection']})")
    click.echo(f"on the {r.n_images} labelled images (the repair's own data):  before -> after")
    b, a = r.before, r.after
    for label, before, after in (("clean accuracy", b.clean_accuracy, a.clean_accuracy),
                                 ("accuracy with reconstructed trigger", b.triggered_accuracy, a.triggered_accuracy),
                                 ("triggered images sent to target", b.target_share, a.target_share)):
        click.echo(f"  {label:36s} {_pct(before):>6s} -> {_pct(after)}")
    if outcome.detection_path is not None:
        click.echo(f"detection saved: {outcome.detection_path}")


def _row_line(r: dict[str, Any]) -> str:
    def f(v: float | None) -> str:
        return "  – " if v is None else f"{v:.2f}"

    guard = "" if r.get("guarded", r["suspect"]) == r["suspect"] else f"->{r['guarded']}"
    return (f"{r['id']:22s} flagged={int(r['flagged'])} suspect={r['suspect']}{guard}/{r['truth_target']} "
            f"ASR-ID {f(r['asr_id_before'])}->{f(r['asr_id_after'])} ASR-OOD {f(r['asr_ood_before'])}->"
            f"{f(r['asr_ood_after'])} CA {r['ca_before']:.3f}->{r['ca_after']:.3f} "
            f"rescan={'B' if r['rescan_flagged'] else 'C'} ({r['repair_seconds']:.1f}s repair)")


@zoo.command("repair-eval")
@click.argument("zoo_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--out", "json_out", type=click.Path(dir_okay=False, path_type=Path),
              help="per-model rows (resumable JSON)")
@click.option("--mode", type=click.Choice(REPAIR_MODES), default=REPAIR_MODES[0], show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--n-images", type=int, default=1000, show_default=True, help="OOD images for detection / re-scan")
@click.option("--reinvert", default=None, metavar="F1,F2|none",
              help="families inverted against the repaired prompt for a second pass (default: the repair's)")
@click.option("--models", default=None, metavar="ID1,ID2", help="repair only these models of the zoo")
@twin_anchor_option
@click.option("--detections", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="save each model's detection here and reuse it in later runs with the same detector settings")
@click.option("--candidates", type=int, default=None, metavar="N",
              help="classes the repair's detection confirms, each giving a trigger (default: the detector's); "
                   "the re-scan keeps the default")
@click.option("--ood-images", type=int, default=None, metavar="N",
              help="pseudo-labelled OOD photos in the repair set (default: the repair's; 0 = none)")
@click.option("--ood-labels", type=click.Choice(OOD_LABEL_CHOICES), default=None,
              help="who labels those photos: the zero-shot twin, the delivered model, or no one (outlier exposure: "
                   "pulled to the uniform distribution); default: the repair's")
@click.option("--ood-balance/--no-ood-balance", default=None,
              help="pick those photos with a per-class quota of their pseudo-labels (default: the repair's)")
@click.option("--ood-avoid-target/--no-ood-avoid-target", default=None,
              help="never label a photo with the suspected target (default: the repair's)")
@target_guard_option
@reference_suspect_option
def repair_eval(zoo_dir: Path, json_out: Path | None, mode: str, seed: int, n_images: int, reinvert: str | None,
                models: str | None, twin_anchor: float, detections: Path | None, candidates: int | None,
                ood_images: int | None, ood_labels: str | None, ood_balance: bool | None,
                ood_avoid_target: bool | None, target_guard: float | None, reference_suspect: bool | None) -> None:
    """Repair every backdoored model of a zoo with its dataset's few-shot split; per attack: ASR-ID / ASR-OOD
    with the real trigger and clean accuracy before -> after, share of repaired models that re-scan clean."""
    from scanner.clip import load_bundled
    from scanner.engine import DetectorConfig
    from scanner.repair import RepairConfig
    from scanner.zoo.repair_eval import evaluate_repairs, summarise

    try:
        rep = RepairConfig(mode=mode, twin_anchor=twin_anchor)
        if reinvert is not None:
            rep = replace(rep, reinvert_families=families_or_none(reinvert))
        given: dict[str, Any] = {"ood_images": ood_images, "ood_labels": ood_labels, "ood_balance": ood_balance,
                                 "ood_avoid_target": ood_avoid_target, "target_guard": target_guard,
                                 "reference_suspect": reference_suspect}
        rep = replace(rep, **{k: v for k, v in given.items() if v is not None})
        chosen = csv_set(models)
        det = DetectorConfig(n_images=n_images)
        rep_det = replace(det, candidates=candidates) if candidates is not None else None
        rows = evaluate_repairs(zoo_dir, load_bundled(), out=json_out, config=det, repair=rep, seed=seed,
                                models=chosen, detections=detections, repair_detector=rep_det,
                                on_result=lambda r: click.echo(_row_line(r), err=True))
    except ScannerError as exc:
        fail(str(exc), int(ExitCode.USAGE))
    def f(v: float | None) -> str:
        return "  –  " if v is None else f"{v:5.3f}"

    click.echo(f"{'attack':9s} {'n':>2s}  {'ASR-ID before->after (clean model)':34s} "
               f"{'ASR-OOD before->after (clean model)':35s} {'CA before->after':17s} {'flagged':>7s} "
               f"{'rescan clean':>12s} {'repair s':>8s}")
    summary = summarise(rows)
    for name, s in summary.items():
        click.echo(f"{name:9s} {s['models']:2d}  {f(s['asr_id_before'])} -> {f(s['asr_id_after'])} "
                   f"({f(s['asr_id_clean_model'])}){'':13s} {f(s['asr_ood_before'])} -> {f(s['asr_ood_after'])} "
                   f"({f(s['asr_ood_clean_model'])}){'':14s} {f(s['ca_before'])} -> {f(s['ca_after'])}  "
                   f"{s['flagged_before']:7.2f} {s['rescan_clean']:12.2f} {s['repair_seconds']:8.1f}")
    twins = [(name, s["asr_id_twin"], s["asr_ood_twin"]) for name, s in summary.items()
             if s.get("asr_id_twin") is not None]
    if twins:
        click.echo("\nthe real trigger on the zero-shot twin (no tuned prompt), ASR-ID / ASR-OOD: "
                   + "; ".join(f"{n} {f(i)} / {f(o)}" for n, i, o in twins))
    for line in bar_lines(summary):
        click.echo(line)
    if json_out is not None:
        click.echo(f"\nper-model rows: {json_out}")


def bar_lines(summary: dict[str, dict[str, Any]]) -> list[str]:
    """The issue's bars, per attack: ASR (real trigger) <= 5% after, CA within 2 points, >= 90% re-scan clean."""
    from scanner.zoo.repair_eval import ASR_BAR

    out = ["", f"bars (per attack, averaged): ASR-ID / ASR-OOD after <= {ASR_BAR:.2f}; CA after >= before - 0.02; "
           "re-scan clean >= 0.90"]
    for name, s in summary.items():
        if name == "all":
            continue
        checks = []
        for key in ("asr_id_after", "asr_ood_after"):
            v = s[key]
            checks.append(f"{key[:-6]} {'–' if v is None else ('met' if v <= ASR_BAR else 'NOT met')}")
        ca = s["ca_change"]
        checks.append("CA –" if ca is None else f"CA {'met' if ca >= -0.02 else 'NOT met'} ({ca:+.3f})")
        checks.append(f"rescan {'met' if s['rescan_clean'] >= 0.9 else 'NOT met'}")
        out.append(f"  {name:9s} " + "; ".join(checks))
    out.append(f"per model, ASR-ID and ASR-OOD after <= {ASR_BAR:.2f} / <= max({ASR_BAR:.2f}, the zero-shot twin's "
               "own ASR):")
    for name, s in summary.items():
        n = s["models"]
        counts = [("–" if s.get(k) is None else f"{round(s[k] * n)}/{n}") for k in ("within_bar", "within_twin_floor")]
        out.append(f"  {name:9s} {counts[0]} / {counts[1]}")
    return out


@zoo.command("repair-bench")
@click.argument("zoo_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--model", "model_id", default=None, help="zoo model id (default: the first backdoored one)")
@click.option("--mode", type=click.Choice(REPAIR_MODES), default=REPAIR_MODES[0], show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def repair_bench(zoo_dir: Path, model_id: str | None, mode: str, seed: int) -> None:
    """Time the repair of one zoo model (detection timed separately): the "one tiny model" figure."""
    import time

    import torch

    from scanner.clip import load_bundled
    from scanner.engine import DetectorConfig, detect
    from scanner.prompting.checkpoints import load_checkpoint
    from scanner.prompting.classifier import PromptedCLIP
    from scanner.repair import RepairConfig, repair_prompt
    from scanner.zoo.datasets import load_split
    from scanner.zoo.detect_eval import EVAL_SEED_OFFSET, load_manifest
    from scanner.zoo.ood import default_ood_pool
    from scanner.zoo.repair_eval import suspects

    try:
        manifest = load_manifest(zoo_dir)
        entries = [m for m in manifest["models"] if (m["id"] == model_id if model_id else m["attack"] != "none")]
        if not entries:
            raise ConfigError(f"no model {model_id!r} in {zoo_dir}" if model_id
                              else f"{zoo_dir} has no backdoored model")
        m = entries[0]
        bb = load_bundled()
        model = PromptedCLIP(bb, load_checkpoint(zoo_dir / m["path"], bb).learner)
        x, y = load_split(m["dataset"], "train", shots=m["shots"], seed=int(manifest["zoo"].get("seed", 0)),
                          size=bb.image_size)
        pool = default_ood_pool(1000, bb.image_size, seed=seed + EVAL_SEED_OFFSET)
        t0 = time.perf_counter()
        res = detect(model, pool, DetectorConfig(), seed=seed)
        t_detect = time.perf_counter() - t0
        target, triggers = suspects(res)
        t0 = time.perf_counter()
        rep = repair_prompt(model, x, y, triggers, RepairConfig(mode=mode), seed=seed, target=target, ood=pool)
        t_repair = time.perf_counter() - t0
    except ScannerError as exc:
        fail(str(exc), int(ExitCode.USAGE))
    click.echo(json.dumps({"model": m["id"], "learner": m["learner"], "classes": m["n_classes"], "images": len(y),
                           "mode": mode, "threads": torch.get_num_threads(), "repair_seconds": round(t_repair, 1),
                           "repair_steps": rep.steps, "detect_seconds": round(t_detect, 1),
                           "total_seconds": round(t_repair + t_detect, 1)}, indent=2))
