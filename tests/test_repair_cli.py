"""``scanner repair`` through click: output in the input's format with repair metadata, the input never
written, saved detections reused, and bad input refused with a clear message and exit code."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from scanner.adapters import model_sha256
from scanner.cli import main
from scanner.clip import ClipBackbone
from scanner.errors import DatasetError
from scanner.prompting import CoOpLearner, load_checkpoint, save_dassl, save_safetensors
from scanner.repair.data import load_image_folder
from scanner.repair.saved_detection import SavedDetection, load_detection, save_detection
from scanner.zoo.datasets import load_split

NAMES = ["red", "green", "blue"]  # the first three classes of the "colours" dataset
_SMALL_POOL: list[Path] = []  # a settings file with a 16-image OOD pool, written by the ``world`` fixture


@dataclass(frozen=True)
class World:
    safetensors: Path
    dassl: Path
    data: Path
    detection: Path  # a saved detection of ``safetensors`` flagging "green"
    root: Path


def _write_images(folder: Path, x: torch.Tensor) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(x):
        arr = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(arr).save(folder / f"{i:03d}.png")


def _patch(size: int = 64) -> torch.Tensor:
    raw = torch.zeros(4, size, size)
    raw[:3, -9:-1, -9:-1] = 1.0
    raw[3, -9:-1, -9:-1] = 1.0
    return raw


@pytest.fixture(scope="module")
def world(bundled_backbone: ClipBackbone, tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("repair")
    learner = CoOpLearner(bundled_backbone, NAMES, n_ctx=4, csc=True, seed=0)
    st = save_safetensors(learner, root / "models" / "colours.safetensors")
    dassl = root / "models" / "colours-dassl"
    save_dassl(learner, dassl, epoch=7)
    x, y = load_split("colours", "train", shots=3, size=64)
    for k, name in enumerate(NAMES):
        _write_images(root / "data" / name, x[y == k])
    det = SavedDetection(model_sha256=model_sha256(st), detector="ci", backdoored=True, target_index=1,
                         anomaly_scores=[0.0, 5.0, 0.5], classnames=NAMES, raw_triggers={1: _patch()})
    save_detection(det, root / "det.safetensors")
    (root / "scanner.toml").write_text("ood_size = 16\n")
    _SMALL_POOL[:] = [root / "scanner.toml"]
    return World(st, dassl, root / "data", root / "det.safetensors", root)


def run(*args: str) -> tuple[int, str, str]:
    """``scanner repair ARGS`` with a small OOD pool (the repair adds up to that many pseudo-labelled photos)."""
    if "--config" not in args:
        args = (*args, "--config", str(_SMALL_POOL[0]))
    result = CliRunner().invoke(main, ["repair", *args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_safetensors_model_is_repaired_next_to_it_with_metadata(world: World, bundled_backbone: ClipBackbone,
                                                                tmp_path: Path) -> None:
    before = world.safetensors.read_bytes()
    out = tmp_path / "fixed.safetensors"
    code, stdout, err = run(str(world.safetensors), "--data", str(world.data), "--report", str(world.detection),
                            "--out", str(out), "--quiet")
    assert code == 0, err
    assert world.safetensors.read_bytes() == before  # the input is never written
    assert "repaired model:" in stdout and "suspected target 'green'" in stdout and "clean accuracy" in stdout
    ck = load_checkpoint(out, bundled_backbone)
    assert ck.format == "safetensors" and ck.classnames == NAMES
    rep = ck.metadata["repair"]
    assert rep["source"]["sha256"] == model_sha256(world.safetensors) and rep["source"]["adapter"] == "safetensors"
    assert len(rep["data"]["sha256"]) == 64 and rep["data"]["images"] == 9
    assert rep["trigger"]["classes"] == [1] and rep["trigger"]["forms"] == ["patch"]
    assert rep["trigger"]["detection"] == str(world.detection) and rep["settings"]["mode"] == "reinit"
    assert rep["trigger"]["guard_choice"] is None and not rep["settings"]["reference_suspect"]  # off by default
    assert not torch.equal(ck.learner.ctx, load_checkpoint(world.safetensors, bundled_backbone).learner.ctx)


def test_dassl_model_is_written_as_a_dassl_directory(world: World, bundled_backbone: ClipBackbone,
                                                     tmp_path: Path) -> None:
    # a saved detection for the Dassl directory (its own content hash)
    det = load_detection(world.detection)
    det.model_sha256 = model_sha256(world.dassl)
    save_detection(det, tmp_path / "det.safetensors")
    sha = model_sha256(world.dassl)
    out = tmp_path / "fixed-model"
    code, _, err = run(str(world.dassl), "--data", str(world.data), "--report", str(tmp_path / "det.safetensors"),
                       "--out", str(out), "--shots", "2", "--json", "--quiet", "--reference-suspect")
    assert code == 0, err
    assert model_sha256(world.dassl) == sha
    ck = load_checkpoint(out, bundled_backbone)
    assert ck.format == "dassl" and ck.epoch == 7 and (out / "prompt_learner" / "model.pth.tar-7").is_file()
    meta = json.loads((out / "scanner.json").read_text())
    assert meta["repair"]["source"]["adapter"] == "coop" and meta["repair"]["data"]["images"] == 6
    # --reference-suspect: the guarded class was checked against the labelled images, and the record says how
    choice = meta["repair"]["trigger"]["guard_choice"]
    assert meta["repair"]["settings"]["reference_suspect"] and choice["guarded"] in (1, choice["named"])
    assert 0 <= choice["named"] < len(NAMES) and choice["suspect_anomaly"] is not None


def test_the_input_is_never_overwritten(world: World, tmp_path: Path) -> None:
    before = world.safetensors.read_bytes()
    code, _, err = run(str(world.safetensors), "--data", str(world.data), "--report", str(world.detection),
                       "--out", str(world.safetensors))
    assert code == 2 and "would write over" in err and "nothing was written" in err
    taken = tmp_path / "taken.safetensors"
    taken.write_text("mine")
    code, _, err = run(str(world.safetensors), "--data", str(world.data), "--report", str(world.detection),
                       "--out", str(taken))
    assert code == 2 and "already exists" in err and taken.read_text() == "mine"
    code, _, err = run(str(world.dassl), "--data", str(world.data), "--out", str(world.dassl / "inside"))
    assert code == 2 and "would write over" in err
    assert world.safetensors.read_bytes() == before


def test_bad_data_folders_are_refused(world: World, tmp_path: Path) -> None:
    x, y = load_split("colours", "train", shots=2, size=64)
    for k, name in enumerate(["red", "green", "purple"]):
        _write_images(tmp_path / "wrong" / name, x[y == k])
    code, _, err = run(str(world.safetensors), "--data", str(tmp_path / "wrong"), "--report", str(world.detection))
    assert code == 2
    assert "'purple'" in err and "classes without a folder: 'blue'" in err and "nothing was written" in err
    for k, name in enumerate(NAMES):
        _write_images(tmp_path / "few" / name, x[y == k][:1])
    code, _, err = run(str(world.safetensors), "--data", str(tmp_path / "few"), "--report", str(world.detection))
    assert code == 2 and "too few readable images" in err and "at least 2" in err
    code, _, err = run(str(world.safetensors), "--data", str(tmp_path / "few"), "--twin-anchor", "-1")
    assert code == 2 and "twin_anchor must be >= 0" in err
    code, _, err = run(str(world.safetensors), "--data", str(tmp_path / "few"), "--target-guard", "-1")
    assert code == 2 and "target_guard must be >= 0" in err
    assert not list(world.safetensors.parent.glob("*.repaired.*"))


def test_image_folder_names_are_normalised_and_shots_applied(tmp_path: Path) -> None:
    x, _ = load_split("colours", "train", shots=2, size=64)
    _write_images(tmp_path / "Golden_Retriever", x[:3])
    _write_images(tmp_path / "cat", x[3:5])
    (tmp_path / "cat" / "broken.png").write_bytes(b"not an image")
    data = load_image_folder(tmp_path, ["golden retriever", "cat"], 64, shots=2)
    assert data.counts(2) == [2, 2] and data.images.shape == (4, 3, 64, 64)
    assert [p.name for p in data.skipped] == ["broken.png"]
    with pytest.raises(DatasetError, match="does not exist"):
        load_image_folder(tmp_path / "nope", ["cat"], 64)


def test_clean_scan_is_repaired_with_a_warning(world: World, tmp_path: Path) -> None:
    det = load_detection(world.detection)
    det.backdoored, det.target_index = False, None
    save_detection(det, tmp_path / "clean.safetensors")
    out = tmp_path / "out.safetensors"
    code, stdout, err = run(str(world.safetensors), "--data", str(world.data), "--report",
                            str(tmp_path / "clean.safetensors"), "--out", str(out))
    assert code == 0 and out.is_file()
    assert "warning: the model scans clean" in err and "detection: clean" in stdout


def test_other_models_detection_and_non_models(world: World, tmp_path: Path) -> None:
    det = load_detection(world.detection)
    det.model_sha256 = "0" * 64
    save_detection(det, tmp_path / "other.safetensors")
    other = str(tmp_path / "other.safetensors")
    code, _, err = run(str(world.safetensors), "--data", str(world.data), "--report", other)
    assert code == 2 and "another model" in err
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    code, _, err = run(str(text), "--data", str(world.data))
    assert code == 4 and "no adapter recognises" in err
    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    code, _, err = run(str(bad), "--data", str(world.data))
    assert code == 3 and "nothing was written" in err


def test_scan_report_dir_detection_is_reused(world: World, tmp_path: Path) -> None:
    """scan-once --report-dir saves the re-applicable triggers; repair --report DIR finds this model's."""
    cfg = tmp_path / "scanner.toml"
    cfg.write_text("ood_size = 64\n[detector_options]\nbatch_size = 16\ncandidates = 1\nbf16 = false\n")
    report_dir = tmp_path / "report"
    result = CliRunner().invoke(main, ["scan-once", str(world.safetensors), "--config", str(cfg), "--report-dir",
                                       str(report_dir), "--format", "json", "--quiet"], catch_exceptions=False)
    assert result.exit_code in (0, 1), result.stderr
    model = json.loads(result.stdout)["models"][0]
    saved = load_detection(report_dir / model["artefacts"]["detection"])
    assert saved.model_sha256 == model_sha256(world.safetensors) and saved.raw_triggers
    out, again = tmp_path / "out.safetensors", tmp_path / "again.safetensors"
    code, stdout, err = run(str(world.safetensors), "--data", str(world.data), "--report", str(report_dir),
                            "--out", str(out), "--save-detection", str(again), "--config", str(cfg))
    assert code == 0, err
    assert "detection.safetensors" in stdout and load_detection(again).model_sha256 == saved.model_sha256


def test_the_cli_defaults_to_the_repair_configs_mode() -> None:
    from scanner.cli.repair import OOD_LABEL_CHOICES, REPAIR_MODES
    from scanner.repair.config import MODES, OOD_LABELS, RepairConfig

    assert REPAIR_MODES[0] == RepairConfig().mode and set(REPAIR_MODES) == set(MODES)
    assert set(OOD_LABEL_CHOICES) == set(OOD_LABELS)
