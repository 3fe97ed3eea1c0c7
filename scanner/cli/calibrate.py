"""``scanner calibrate ZOO``: fit the detector's threshold on a zoo's clean models and save it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from scanner.cli import main
from scanner.errors import ScannerError


def write_threshold(config_file: Path, threshold: float) -> None:
    """Set ``threshold`` in a settings TOML file, keeping every other key; written atomically."""
    import os
    import tomllib

    import tomli_w

    data: dict[str, object] = {}
    if config_file.exists():
        data = tomllib.loads(config_file.read_text())
    data["threshold"] = round(threshold, 6)
    tmp = config_file.with_name(f".{config_file.name}.tmp")
    tmp.write_text(tomli_w.dumps(data))
    os.replace(tmp, config_file)


@main.command()
@click.argument("zoo_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--fpr", type=float, default=0.05, show_default=True, help="target false-positive rate on clean models")
@click.option("--detector", default="ci", show_default=True)
@click.option("--config", "config_file", type=click.Path(path_type=Path), default=Path("scanner.toml"),
              show_default=True, help="settings file the threshold is written to")
@click.option("--eval-json", type=click.Path(path_type=Path), help="reuse/extend `scanner zoo eval --json` rows")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--n-images", type=int, default=1000, show_default=True)
def calibrate(zoo_dir: Path, fpr: float, detector: str, config_file: Path, eval_json: Path | None, seed: int,
              n_images: int) -> None:
    """Fit the anomaly threshold on the zoo's clean models for a target FPR and write it to settings."""
    from scanner.clip import load_bundled
    from scanner.engine import DetectorConfig
    from scanner.engine.calibration import threshold_for_fpr
    from scanner.zoo.detect_eval import evaluate_zoo, metrics

    try:
        rows = evaluate_zoo(zoo_dir, load_bundled(), [detector], out=eval_json,
                            config=DetectorConfig(detector=detector, n_images=n_images), seed=seed)
        clean = [r["anomaly_score"] for r in rows if not r["truth_backdoored"]]
        if not clean:
            raise click.UsageError(f"{zoo_dir} has no clean models to calibrate on; build it with --clean-per-dataset")
        t = threshold_for_fpr(clean, fpr)
        write_threshold(config_file, t)
    except ScannerError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    m = metrics(rows, threshold=t)
    click.echo(json.dumps({"threshold": t, "fpr_target": fpr, "clean_models": len(clean),
                           "written_to": str(config_file), "at_threshold": m}, indent=2))
