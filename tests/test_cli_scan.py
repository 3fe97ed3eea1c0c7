"""``scanner scan-once`` / ``plugins`` / ``settings`` through click, on the real test registry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_pipeline_support import Registry, build_registry, wrong_backbone_model

from scanner.cli import main
from scanner.errors import ConfigError
from scanner.settings import Settings, load_settings


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    return build_registry(tmp_path_factory.getbasetemp() / "scan-models")


@pytest.fixture()
def config(registry: Registry, tmp_path: Path) -> Path:
    """A scanner.toml declaring the test backbone, with a small OOD pool."""
    path = tmp_path / "scanner.toml"
    path.write_text(
        "ood_size = 64\n"
        f'cache_dir = "{tmp_path / "cache"}"\n'
        '[backbones.tiny-random]\n'
        f'path = "{registry.backbone_file}"\n'
        'format = "open_clip"\narch = "scanner-tiny"\n'
    )
    return path


def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_empty_directory_exits_4_and_says_why(tmp_path: Path) -> None:
    code, out, err = run("scan-once", str(tmp_path))
    assert code == 4
    assert "nothing scannable" in err and "no model files found" in err
    assert "prompt_learner" in err  # says what was looked for
    assert "exit 4" in out


def test_flagged_registry_exits_1_with_json(registry: Registry, config: Path) -> None:
    code, out, _ = run("scan-once", str(registry.root / "team-c"), "--config", str(config),
                       "--format", "json", "--quiet")
    assert code == 1
    report = json.loads(out)
    assert report["summary"]["exit_code"] == 1
    assert report["summary"]["counts"]["unsafe"] == 2 and report["summary"]["counts"]["error"] == 1
    assert {m["verdict"] for m in report["models"]} == {"unsafe", "error"}
    assert not registry.marker.exists()


def test_sarif_to_output_file(registry: Registry, config: Path, tmp_path: Path) -> None:
    target = tmp_path / "scan.sarif"
    code, out, _ = run("scan-once", str(registry.root / "team-c"), "--config", str(config),
                       "--format", "sarif", "--output", str(target), "-q")
    assert code == 1 and out == ""
    log = json.loads(target.read_text())
    assert log["version"] == "2.1.0"
    assert sorted(r["level"] for r in log["runs"][0]["results"]) == ["error", "error", "warning"]


def test_wrong_backbone_exits_3(registry: Registry, config: Path, tmp_path: Path) -> None:
    code, out, _ = run("scan-once", str(wrong_backbone_model(tmp_path)), "--config", str(config), "-q")
    assert code == 3
    assert "ViT-B-16" in out and "category=backbone" in out


def test_skipped_file_exits_4_not_0(registry: Registry) -> None:
    code, out, err = run("scan-once", str(registry.root / "team-b" / "README.txt"), "-q")
    assert code == 4
    assert "SKIPPED" in out and "skipped" in err


def test_report_dir(registry: Registry, config: Path, tmp_path: Path) -> None:
    code, _, err = run("scan-once", str(registry.root / "team-c"), "--config", str(config),
                       "--report-dir", str(tmp_path / "html"))
    assert code == 1
    assert (tmp_path / "html" / "index.html").is_file()
    assert "HTML report" in err


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert run("scan-once", str(tmp_path / "missing"))[0] == 2
    assert run("scan-once", str(tmp_path), "--format", "xml")[0] == 2
    code, _, err = run("scan-once", str(tmp_path), env={"SCANNER_SEED": "minus one"})
    assert code == 2 and "SCANNER_SEED" in err and "integer" in err
    code, _, err = run("scan-once", str(tmp_path), "--backbone", "no-equals-sign")
    assert code == 2 and "NAME=PATH" in err
    bad = tmp_path / "bad.toml"
    bad.write_text("sead = 3\n")
    code, _, err = run("scan-once", str(tmp_path), "--config", str(bad))
    assert code == 2 and "unknown key(s) sead" in err


def test_declared_backbone_that_does_not_exist_is_a_usage_error(registry: Registry, tmp_path: Path) -> None:
    code, _, err = run("scan-once", str(registry.root / "team-a"), "--backbone", f"x={tmp_path / 'nope.pt'}")
    assert code == 2 and "nope.pt" in err and "does not exist" in err


def test_plugins_lists_first_party() -> None:
    code, out, _ = run("plugins", "--json")
    assert code == 0
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["coop"]["distribution"] == "scanner-coop" and rows["coop"]["adapters"] == ["coop"]
    assert rows["safetensors"]["hooks"] == ["register_adapters"]
    assert rows["coop"]["version"]
    code, out, _ = run("plugins")
    assert "scanner-coop" in out and "adapters: safetensors" in out


def test_settings_defaults_round_trip(tmp_path: Path) -> None:
    code, out, _ = run("settings", "--defaults")
    assert code == 0
    data = tomllib.loads(out)
    assert data["ood_size"] == 1000 and data["seed"] == 0 and data["detector"] == "ci"
    path = tmp_path / "defaults.toml"
    path.write_text(out)
    assert load_settings(config_file=path, env={}) == Settings()


def test_settings_precedence(tmp_path: Path) -> None:
    cfg = tmp_path / "s.toml"
    (tmp_path / "ood").mkdir()
    cfg.write_text('seed = 1\nood_size = 100\nood_dir = "ood"\nthreshold = 2.5\n'
                   '[detector_options]\nsteps = 10\n[backbones.vit]\npath = "vit.pt"\nformat = "openai"\n')
    s = load_settings(config_file=cfg, env={})
    assert (s.seed, s.ood_size, s.threshold) == (1, 100, 2.5)
    assert s.ood_dir == tmp_path / "ood"  # relative to the file, not the working directory
    assert s.backbones[0].path == tmp_path / "vit.pt" and s.backbones[0].format == "openai"
    assert dict(s.detector_options) == {"steps": 10}
    s = load_settings(config_file=cfg, env={"SCANNER_SEED": "2", "SCANNER_LOAD_PLUGINS": "coop, safetensors"})
    assert s.seed == 2 and s.ood_size == 100 and s.load_plugins == ("coop", "safetensors")
    s = load_settings(config_file=cfg, env={"SCANNER_SEED": "2"},
                      flags={"seed": 3, "backbones": {"vit": "x.pt"}})
    assert s.seed == 3 and s.backbones[0].path == Path("x.pt") and s.backbones[0].format == "auto"
    assert load_settings(env={"SCANNER_LOAD_PLUGINS": ""}).load_plugins == ()
    # the CLI shows the effective values
    code, out, _ = run("settings", "--config", str(cfg), env={"SCANNER_SEED": "7"})
    assert code == 0 and tomllib.loads(out)["seed"] == 7


def test_default_config_file_in_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SCANNER_CONFIG", raising=False)
    (tmp_path / "scanner.toml").write_text("seed = 11\n")
    assert load_settings(env={}).seed == 11
    (tmp_path / "other.toml").write_text("seed = 12\n")
    assert load_settings(env={"SCANNER_CONFIG": str(tmp_path / "other.toml")}).seed == 12  # env beats ./
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(env={"SCANNER_CONFIG": str(tmp_path / "missing.toml")})


@pytest.mark.parametrize(("toml", "message"), [
    ("seed = -1\n", "integer >= 0"),
    ("threshold = 'high'\n", "a number"),
    ("detector = 'Magic!'\n", "a detector name"),
    ("device = 'tpu'\n", "cpu, cuda"),
    ("[backbones.x]\nformat = 'openai'\n", "a `path` key"),
    ("[backbones.x]\npath = 'a'\nsha256 = 'abc'\n", "64 hexadecimal"),
    ("seed = [\n", "not valid TOML"),
])
def test_invalid_settings_say_what_and_where(tmp_path: Path, toml: str, message: str) -> None:
    cfg = tmp_path / "s.toml"
    cfg.write_text(toml)
    with pytest.raises(ConfigError, match=message) as info:
        load_settings(config_file=cfg, env={})
    assert str(cfg) in str(info.value)


def test_first_progress_line_comes_before_torch_is_imported(registry: Registry, config: Path) -> None:
    """No silent start-up: the first stderr line is printed before the (slow) torch import. Torch is made
    unimportable in the child, so the line can only appear if it is written before torch is needed."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    code = "import sys; sys.modules['torch'] = None; from scanner.cli import main; main()"
    proc = subprocess.run(
        [sys.executable, "-c", code, "scan-once", str(registry.root / "team-a"), "--config", str(config)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, timeout=120,
    )
    first = proc.stderr.splitlines()[0] if proc.stderr else ""
    assert first.startswith("scanner: discovering models under"), proc.stderr[-2000:]
