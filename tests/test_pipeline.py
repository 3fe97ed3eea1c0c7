"""scan_path / discover_models on a small real registry (random-init tiny CLIP, real checkpoint files)."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_pipeline_support import (
    BACKBONE_NAME,
    CLASSNAMES,
    Registry,
    build_registry,
    wrong_backbone_model,
)

from scanner import plugins
from scanner.engine import DetectorConfig
from scanner.engine.config import DORMANT_LIFT_LINE
from scanner.pipeline import discover_models, scan_path
from scanner.report import ExitCode, ModelReport, ScanReport, Verdict
from scanner.zoo.detect_eval import margin_dormancy


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    return build_registry(tmp_path_factory.getbasetemp() / "scan-models")


@pytest.fixture(scope="session")
def html_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("html")


@pytest.fixture(scope="session")
def registry_report(registry: Registry, html_dir: Path) -> ScanReport:
    return scan_path(registry.root, registry.settings(report_dir=html_dir))


def _by_name(report: ScanReport) -> dict[str, ModelReport]:
    return {Path(m.path).name: m for m in report.models}


def test_discover_finds_units_not_their_parts(registry: Registry) -> None:
    found = [p.relative_to(registry.root).as_posix() for p in discover_models(registry.root)]
    assert found == [
        "team-a/coop-model",  # a model directory is one unit: prompt_learner/ is not listed separately
        "team-a/coop-nometa",
        "team-b/cocoop.safetensors",
        "team-c/corrupt.pth.tar",
        "team-c/evil-eval.pth",
        "team-c/evil-model",
    ]  # README.txt (unclaimed) and .hidden/ (hidden) are not units


def test_discover_single_file_and_model_dir(registry: Registry) -> None:
    unit = registry.root / "team-a" / "coop-model"
    assert discover_models(unit) == [unit]
    ckpt = unit / "prompt_learner" / "model.pth.tar-5"
    assert discover_models(ckpt) == [ckpt]
    assert discover_models(registry.root / "team-b" / "README.txt") == []


def test_discover_excludes_declared_paths(registry: Registry) -> None:
    corrupt = registry.root / "team-c" / "corrupt.pth.tar"
    assert corrupt not in discover_models(registry.root, exclude=[corrupt])


def test_empty_directory_is_nothing_scannable(tmp_path: Path) -> None:
    (tmp_path / "notes.md").write_text("# no models here")
    report = scan_path(tmp_path)
    assert report.models == []
    assert report.exit_code() is ExitCode.NOTHING_SCANNABLE


def test_missing_path_is_an_error_not_a_crash(tmp_path: Path) -> None:
    report = scan_path(tmp_path / "gone")
    assert [m.verdict for m in report.models] == [Verdict.ERROR]
    assert "does not exist" in report.models[0].message


def test_file_named_directly_is_skipped_never_clean(registry: Registry) -> None:
    report = scan_path(registry.root / "team-b" / "README.txt", registry.settings())
    (model,) = report.models
    assert model.verdict is Verdict.SKIPPED
    assert "no adapter recognises README.txt" in model.message
    assert report.counts()["clean"] == 0
    assert report.exit_code() is ExitCode.NOTHING_SCANNABLE


def test_unsafe_pickles_are_flagged_and_never_executed(registry: Registry,
                                                       registry_report: ScanReport) -> None:
    models = _by_name(registry_report)
    for name in ("evil-model", "evil-eval.pth"):
        m = models[name]
        assert m.verdict is Verdict.UNSAFE, (name, m.message)
        assert m.unsafe_globals, name
    assert any("system" in g for g in models["evil-model"].unsafe_globals)
    assert any("eval" in g for g in models["evil-eval.pth"].unsafe_globals)
    assert not registry.marker.exists(), "a payload ran"
    assert registry_report.exit_code() is ExitCode.FLAGGED


def test_corrupt_file_is_an_error_and_the_good_ones_still_load(registry: Registry,
                                                                 registry_report: ScanReport) -> None:
    models = _by_name(registry_report)
    corrupt = models["corrupt.pth.tar"]
    assert corrupt.verdict is Verdict.ERROR
    assert corrupt.category == "checkpoint"
    assert corrupt.sha256 and len(corrupt.sha256) == 64
    good = (("coop-model", "coop"), ("coop-nometa", "coop"), ("cocoop.safetensors", "safetensors"))
    for name, adapter in good:
        m = models[name]
        # loaded onto the declared backbone (its hash is recorded only after a successful load)
        assert m.adapter == adapter
        assert m.backbone_sha256 == registry.backbone_sha256, (name, m.message)
        assert m.verdict is not Verdict.UNSAFE
        assert m.category != "checkpoint"


def test_wrong_backbone_is_an_error_naming_it(registry: Registry, tmp_path: Path) -> None:
    report = scan_path(wrong_backbone_model(tmp_path), registry.settings())
    (m,) = report.models
    assert m.verdict is Verdict.ERROR
    assert m.category == "backbone"
    assert "ViT-B-16" in m.message
    assert report.exit_code() is ExitCode.ERROR


def test_undeclared_backbone_without_metadata_lists_what_was_tried(registry: Registry) -> None:
    # The no-metadata Dassl dir decodes on the declared backbone; without the declaration nothing fits.
    unit = registry.root / "team-a" / "coop-nometa"
    settings = registry.settings()
    bare = type(settings)(ood_size=settings.ood_size, cache_dir=settings.cache_dir)
    (m,) = scan_path(unit, bare).models
    assert m.verdict is Verdict.ERROR and m.category == "backbone"
    assert "names no backbone" in m.message and "scanner-tiny" in m.message


def test_scan_completed_hook_sees_every_model(registry: Registry) -> None:
    seen: list[str] = []

    class Recorder:
        @plugins.hookspecs.hookimpl
        def scan_completed(self, report: object) -> None:
            seen.append(report.verdict.value)  # type: ignore[attr-defined]

    class Broken:
        @plugins.hookspecs.hookimpl
        def scan_completed(self, report: object) -> None:
            raise RuntimeError("plugin bug")

    plugins.load_plugins()
    recorder, broken = Recorder(), Broken()
    plugins.pm.register(recorder, name="test-recorder")
    plugins.pm.register(broken, name="test-broken")
    try:
        report = scan_path(registry.root / "team-c", registry.settings())
    finally:
        plugins.pm.unregister(recorder)
        plugins.pm.unregister(broken)
    assert sorted(seen) == sorted(m.verdict.value for m in report.models)
    assert len(seen) == 3


def test_report_dir_gets_pages_for_every_model(registry: Registry, tmp_path: Path) -> None:
    report = scan_path(registry.root / "team-c", registry.settings(report_dir=tmp_path / "html"))
    assert (tmp_path / "html" / "index.html").is_file()
    assert (tmp_path / "html" / "report.json").is_file()
    for m in report.models:
        assert (tmp_path / "html" / m.artefacts["html"]).is_file()


def test_loaded_class_names(registry: Registry) -> None:
    from scanner.adapters import LoadContext
    from scanner.pipeline import backbone_store

    ctx = LoadContext(backbones=backbone_store(registry.settings()))
    adapters = {a.name: a for a in plugins.adapters()}
    nometa = adapters["coop"].load(registry.root / "team-a" / "coop-nometa", ctx)
    assert nometa.classnames == CLASSNAMES  # decoded from token_suffix
    assert nometa.meta["classnames_source"] == "token_suffix"
    assert nometa.backbone_name == "scanner-tiny"
    st = adapters["safetensors"].load(registry.root / "team-b" / "cocoop.safetensors", ctx)
    assert st.classnames == CLASSNAMES and st.meta["learner_type"] == "cocoop"
    assert BACKBONE_NAME  # declared under this name


# ------------------------------------------------------------------ with the detector
def test_good_models_get_a_verdict(registry_report: ScanReport) -> None:
    models = _by_name(registry_report)
    for name in ("coop-model", "coop-nometa", "cocoop.safetensors"):
        m = models[name]
        assert m.verdict in (Verdict.CLEAN, Verdict.BACKDOORED), m.message
        assert m.anomaly_score is not None and m.threshold is not None
        assert [c.name for c in m.class_scores] == CLASSNAMES
        assert m.ood_sha256 and m.seed == 0 and m.detector == "ci"
        # the verdict follows from the reported evidence: a trigger channel (a confirmed trigger's gain over
        # the threshold), a prompt awake on clean inputs, or, where the logit dormancy line is set (rule D, off by
        # default), the most drifted prompt's clean margin over the twin's past it (drift-ranked learners)
        ev = [c.evidence for c in m.class_scores]
        best = max(c.anomaly_score for c in m.class_scores)
        assert best == m.anomaly_score == max(e["score"] for e in ev)
        by_trigger = m.anomaly_score > m.threshold
        by_excess = max(e["natural_share"] - e["zero_shot_share"] for e in ev) > DetectorConfig().dormant_margin
        check = margin_dormancy({"evidence": ev}, DetectorConfig().dormant_lift)
        by_lift = check is not None and check.suspect() is not None
        # every drift-ranked report records what rule D reads; CoCoOp is ranked by reach, not drift
        assert (margin_dormancy({"evidence": ev}, DORMANT_LIFT_LINE) is None) == (name == "cocoop.safetensors")
        assert (m.verdict is Verdict.BACKDOORED) == (by_trigger or by_excess or by_lift), m.message
        assert m.message


def test_html_report_has_triggers_and_plot(registry_report: ScanReport, html_dir: Path) -> None:
    m = _by_name(registry_report)["coop-model"]
    triggers = [k for k in m.artefacts if k.startswith("trigger:")]
    assert triggers, m.artefacts
    assert all((html_dir / m.artefacts[k]).is_file() for k in triggers)
    page = (html_dir / m.artefacts["html"]).read_text()
    assert page.count('class="bar"') == len(CLASSNAMES) and "<img" in page
    assert (html_dir / "index.html").is_file()


def test_same_seed_same_result(registry: Registry, registry_report: ScanReport) -> None:
    again = scan_path(registry.root / "team-a" / "coop-model", registry.settings())
    first = _by_name(registry_report)["coop-model"]
    (second,) = again.models
    assert second.anomaly_score == first.anomaly_score and second.verdict is first.verdict
    assert second.ood_sha256 == first.ood_sha256
