"""``scanner calibrate ZOO [ZOO ...]``: fit the detector's threshold on zoos' clean models and save it."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from scanner.cli import main
from scanner.cli._shared import trigger_score_option
from scanner.errors import ScannerError


def _round_up(value: float, places: int = 6) -> float:
    """``value`` rounded *up* at ``places`` decimals. A fitted line sits exactly on a clean model's score (models
    are flagged above it), so rounding it down would flag that model and break the FPR it was fitted for."""
    import math

    return math.ceil(value * 10**places - 1e-9) / 10**places


def write_threshold(config_file: Path, threshold: float, dormant_margin: float | None = None,
                    trigger_score: str | None = None) -> None:
    """Set ``threshold`` (and CI's ``detector_options.dormant_margin`` and ``trigger_score``: a threshold means
    nothing under another score) in a settings TOML file, keeping every other key; written atomically."""
    import os
    import tomllib

    import tomli_w

    data: dict[str, object] = {}
    if config_file.exists():
        data = tomllib.loads(config_file.read_text())
    data["threshold"] = _round_up(threshold)
    options = data.get("detector_options")
    options = dict(options) if isinstance(options, dict) else {}
    if dormant_margin is not None:
        options["dormant_margin"] = _round_up(dormant_margin)
    if trigger_score is not None:
        options["trigger_score"] = trigger_score
    if options:
        data["detector_options"] = options
    tmp = config_file.with_name(f".{config_file.name}.tmp")
    tmp.write_text(tomli_w.dumps(data))
    os.replace(tmp, config_file)


def kept_lift(config_file: Path) -> float | None:
    """The logit dormancy line (rule D) calibration keeps: the settings file's ``[detector_options]
    dormant_lift`` when it sets one, else the detector's default (None: off). Fitting the other lines as if D
    were off while the file turns it on would spend the false-positive budget twice. The file is read by the
    settings loader and the value checked by ``DetectorConfig``, as a scan would."""
    from scanner.engine import DetectorConfig
    from scanner.settings import load_settings

    if not config_file.is_file():
        return DetectorConfig().dormant_lift
    options = load_settings(config_file=config_file, env={}).detector_options
    if "dormant_lift" not in options:
        return DetectorConfig().dormant_lift
    return DetectorConfig(dormant_lift=options["dormant_lift"]).dormant_lift


@main.command()
@click.argument("zoo_dirs", nargs=-1, required=True, type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--fpr", type=float, default=0.05, show_default=True, help="target false-positive rate on clean models")
@click.option("--detector", default="ci", show_default=True)
@click.option("--config", "config_file", type=click.Path(path_type=Path), default=Path("scanner.toml"),
              show_default=True, help="settings file the threshold is written to")
@click.option("--eval-json", "eval_jsons", type=click.Path(path_type=Path), multiple=True,
              help="reuse/extend `scanner zoo eval --json` rows; give one per zoo, in the same order")
@click.option("--dormant-margin", type=click.FloatRange(0.0, 1.0, min_open=True), default=None,
              help="CI: keep the dormant margin at this value and fit only the threshold (default: fit both)")
@trigger_score_option
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--n-images", type=int, default=1000, show_default=True)
def calibrate(zoo_dirs: tuple[Path, ...], fpr: float, detector: str, config_file: Path,
              eval_jsons: tuple[Path, ...], dormant_margin: float | None, trigger_score: str | None, seed: int,
              n_images: int) -> None:
    """Fit the decision threshold on the clean models of one or more zoos for a target FPR and write it to
    settings. Several zoos (e.g. built with different seeds) pool their clean models: a threshold fitted on
    more of them holds better on models it has not seen.

    For CI both channels are fitted: the dormant margin on half the budget, the score threshold on the
    rest (``--dormant-margin`` keeps the margin, and the clean models above it spend the budget first; the
    logit dormancy line, ``dormant_lift``, is kept as the settings file sets it, or the default, and the clean
    models it flags spend it first too).
    Saved rows (``--eval-json``) are reused; they are only re-decided, never re-run.
    """
    from scanner.clip import load_bundled
    from scanner.engine import DetectorConfig
    from scanner.engine.calibration import threshold_for_fpr
    from scanner.zoo.detect_eval import evaluate_zoo, fit_ci_lines, metrics

    margin: float | None = None
    lift: float | None = None
    try:
        # the logit dormancy line is kept as the settings set it (rule D); the clean models it flags spend the
        # budget first
        lift = kept_lift(config_file) if detector == "ci" else None
        if (dormant_margin is not None or trigger_score is not None) and detector != "ci":
            raise click.UsageError("--dormant-margin and --trigger-score are settings of the ci detector only")
        if eval_jsons and len(eval_jsons) != len(zoo_dirs):
            raise click.UsageError(f"give one --eval-json per zoo ({len(zoo_dirs)} zoos, {len(eval_jsons)} files), "
                                   "or none")
        backbone = load_bundled()
        # the line is fitted in this score's units, so it is written beside it even when it is the default
        score = trigger_score or DetectorConfig().trigger_score
        rows: list[dict[str, Any]] = []
        for i, zoo_dir in enumerate(zoo_dirs):
            rows += evaluate_zoo(zoo_dir, backbone, [detector], out=eval_jsons[i] if eval_jsons else None,
                                 config=DetectorConfig(detector=detector, n_images=n_images,
                                                       trigger_score=score), seed=seed)
        clean_rows = [r for r in rows if not r["truth_backdoored"]]
        if not clean_rows:
            raise click.UsageError(f"{', '.join(map(str, zoo_dirs))}: no clean models to calibrate on; build a zoo "
                                   "with --clean-per-dataset")
        if detector == "ci":
            t, margin = fit_ci_lines(clean_rows, fpr, dormant_margin, lift)
        else:
            t = threshold_for_fpr([r["anomaly_score"] for r in clean_rows], fpr)
        write_threshold(config_file, t, margin, score if detector == "ci" else None)
    except ScannerError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    m = metrics(rows, threshold=t, dormant_margin=margin, dormant_lift=lift)
    click.echo(json.dumps({"threshold": t, "dormant_margin": margin, "dormant_lift": lift, "fpr_target": fpr,
                           "clean_models": len(clean_rows), "written_to": str(config_file), "at_threshold": m},
                          indent=2))
