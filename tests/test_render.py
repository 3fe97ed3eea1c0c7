"""Text, SARIF and HTML renderings of one hand-built report covering every verdict."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scanner.render.html import (
    index_page,
    model_page,
    save_trigger_pngs,
    score_plot_svg,
    write_index,
    write_model_page,
)
from scanner.render.sarif import to_sarif
from scanner.render.text import to_text
from scanner.report import ClassScore, ModelReport, ScanReport, Verdict

SVG = "{http://www.w3.org/2000/svg}"


def _report(root: Path) -> ScanReport:
    scores = [ClassScore(i, n, s, {"asr": a}) for i, (n, s, a) in
              enumerate([("cat", 0.4, 0.1), ("dog <b>", 7.5, 0.97), ("ship", -0.3, 0.05)])]
    return ScanReport(root=str(root), scanner_version="0.1.0", models=[
        ModelReport(path=str(root / "a" / "bad"), verdict=Verdict.BACKDOORED, adapter="coop", sha256="1" * 64,
                    target_class="dog <b>", target_index=1, anomaly_score=7.5, threshold=3.0,
                    class_scores=scores, message="class 'dog' is a likely backdoor target"),
        ModelReport(path=str(root / "good.safetensors"), verdict=Verdict.CLEAN, adapter="safetensors",
                    anomaly_score=1.2, threshold=3.0, class_scores=scores[:1]),
        ModelReport(path=str(root / "evil.pth"), verdict=Verdict.UNSAFE, adapter="coop", category="unsafe",
                    unsafe_globals=["posix.system"], message="would import posix.system"),
        ModelReport(path=str(root / "broken.pth.tar"), verdict=Verdict.ERROR, category="checkpoint",
                    message="truncated"),
        ModelReport(path=str(root / "notes.txt"), verdict=Verdict.SKIPPED, message="no adapter"),
    ])


class _Balanced(HTMLParser):
    """Fails on unbalanced non-void tags: enough to catch broken string concatenation."""

    VOID = frozenset({"meta", "img", "br", "hr", "link", "input"})

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        pass

    def handle_endtag(self, tag: str) -> None:
        if tag in self.VOID:
            return
        assert self.stack and self.stack[-1] == tag, (tag, self.stack[-5:])
        self.stack.pop()


def _check_html(text: str) -> None:
    p = _Balanced()
    p.feed(text)
    p.close()
    assert p.stack == []


def test_text_lists_every_model_and_the_exit_code(tmp_path: Path) -> None:
    text = to_text(_report(tmp_path))
    for verdict in ("BACKDOORED", "CLEAN", "UNSAFE", "ERROR", "SKIPPED"):
        assert verdict in text
    assert "target='dog <b>'" in text and "globals=posix.system" in text
    assert text.rstrip().endswith("exit 1: at least one model is backdoored or unsafe")


def test_sarif_structure(tmp_path: Path) -> None:
    report = _report(tmp_path)
    log = json.loads(json.dumps(to_sarif(report)))  # JSON-serialisable
    assert log["version"] == "2.1.0" and "sarif-2.1.0" in log["$schema"]
    (run,) = log["runs"]
    rules = run["tool"]["driver"]["rules"]
    assert len({r["id"] for r in rules}) == len(rules) == 5
    assert {r["name"] for r in rules} == {v.value for v in Verdict}
    results = run["results"]
    assert len(results) == len(report.models)
    for res, model in zip(results, report.models, strict=True):
        assert rules[res["ruleIndex"]]["id"] == res["ruleId"]
        assert rules[res["ruleIndex"]]["name"] == model.verdict.value
        assert res["message"]["text"]
        (loc,) = res["locations"]
        art = loc["physicalLocation"]["artifactLocation"]
        assert art["uriBaseId"] == "SCANROOT"
        assert (tmp_path / art["uri"]).as_posix() == Path(model.path).as_posix()
    levels = {r["properties"]["verdict"]: r["level"] for r in results}
    assert levels == {"backdoored": "error", "unsafe": "error", "error": "warning", "clean": "none",
                      "skipped": "none"}
    for r in results:  # SARIF 3.27.9: a kind other than "fail" requires level "none"
        assert r["kind"] in ("pass", "fail", "notApplicable")
        assert r["kind"] == "fail" or r["level"] == "none"
    assert results[0]["properties"]["targetClass"] == "dog <b>"
    assert results[2]["properties"]["unsafeGlobals"] == ["posix.system"]
    assert run["originalUriBaseIds"]["SCANROOT"]["uri"].startswith("file://")
    assert run["invocations"][0]["exitCode"] == 1


def test_score_plot_svg_bars_and_threshold(tmp_path: Path) -> None:
    model = _report(tmp_path).models[0]
    svg = ET.fromstring(score_plot_svg(model))
    bars = [r for r in svg.iter(f"{SVG}rect") if r.get("class") == "bar"]
    assert len(bars) == 3
    (thr,) = [ln for ln in svg.iter(f"{SVG}line") if ln.get("class") == "threshold"]
    tx = float(thr.get("x1", "nan"))
    right_edges = [float(b.get("x", 0)) + float(b.get("width", 0)) for b in bars]
    assert right_edges[1] > tx > right_edges[0]  # dog (7.5) crosses the threshold (3.0), cat (0.4) does not
    assert bars[1].get("fill") != bars[0].get("fill")  # the target is highlighted
    assert score_plot_svg(ModelReport(path="x", verdict=Verdict.ERROR)) == ""


def test_score_plot_caps_many_classes() -> None:
    scores = [ClassScore(i, f"c{i}", float(i)) for i in range(500)]
    svg = ET.fromstring(score_plot_svg(ModelReport(path="x", verdict=Verdict.CLEAN, class_scores=scores,
                                                   threshold=3.0)))
    bars = [r for r in svg.iter(f"{SVG}rect") if r.get("class") == "bar"]
    assert len(bars) == 60
    assert "c499" in ET.tostring(svg, encoding="unicode")


def test_html_pages_with_triggers(tmp_path: Path) -> None:
    report = _report(tmp_path / "models-root")
    out = tmp_path / "html"
    bad = report.models[0]
    trigger = np.zeros((8, 8, 3), np.uint8)
    trigger[2:4, 2:4] = 255
    bad.artefacts.update(save_trigger_pngs(out, bad, {1: trigger, 0: trigger}))
    for m in report.models:
        m.artefacts["html"] = write_model_page(out, m)
    index = write_index(out, report)

    page = (out / bad.artefacts["html"]).read_text()
    _check_html(page)
    assert "dog &lt;b&gt;" in page and "dog <b>" not in page  # names are escaped
    assert "<svg" in page and "(target)" in page
    with Image.open(out / bad.artefacts["trigger:1"]) as im:
        assert im.size == (8, 8) and np.asarray(im)[2, 2].tolist() == [255, 255, 255]
    # trigger links resolve relative to the page
    src = page.split('<img src="')[1].split('"')[0]
    assert ((out / bad.artefacts["html"]).parent / src).is_file()

    text = index.read_text()
    _check_html(text)
    for m in report.models:
        assert f'href="{m.artefacts["html"]}"' in text
    assert json.loads((out / "report.json").read_text())["summary"]["exit_code"] == 1
    _check_html(index_page(ScanReport(root="/nothing")))
    _check_html(model_page(report.models[2]))


def test_trigger_png_rejects_wrong_shape(tmp_path: Path) -> None:
    m = ModelReport(path="x", verdict=Verdict.CLEAN)
    with pytest.raises(ValueError, match="uint8"):
        save_trigger_pngs(tmp_path, m, {0: np.zeros((3, 8, 8), np.float32)})
