"""HTML reports: one page per model (verdict, per-class score plot, reconstructed triggers) and an index.

Pages are self-contained apart from the trigger PNGs saved next to them; the score plot is inline SVG
(horizontal bars, one per class, the threshold as a dashed line), so no plotting library is needed.
"""

from __future__ import annotations

import hashlib
import html
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image

from scanner.report import ModelReport, ScanReport, Verdict

MODELS_DIR = "models"
MAX_PLOTTED_CLASSES = 60  # beyond this the plot shows the highest-scoring classes only
_BAR_H, _GAP, _LABEL_W, _PLOT_W, _PAD = 14, 4, 180, 420, 8
_COLOURS = {
    Verdict.CLEAN: "#1a7f37",
    Verdict.BACKDOORED: "#cf222e",
    Verdict.UNSAFE: "#cf222e",
    Verdict.ERROR: "#9a6700",
    Verdict.SKIPPED: "#57606a",
}
_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:60em;color:#1f2328}
table{border-collapse:collapse}td,th{padding:.25em .8em;border-bottom:1px solid #d0d7de;text-align:left}
.verdict{font-weight:bold;padding:.1em .5em;border-radius:.3em;color:#fff}
.triggers{display:flex;flex-wrap:wrap;gap:1em}.triggers figure{margin:0;text-align:center}
.triggers img{width:128px;height:128px;image-rendering:pixelated;border:1px solid #d0d7de}
code{font-size:.9em}
"""


def model_slug(model: ModelReport) -> str:
    """A file-name-safe, stable id of a model: its base name plus a short hash of path and content."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(model.path).name).strip("-.") or "model"
    digest = hashlib.sha256(f"{model.path}\0{model.sha256 or ''}".encode()).hexdigest()[:10]
    return f"{base[:60]}-{digest}"


def save_trigger_pngs(
    report_dir: Path, model: ModelReport, images: Mapping[int, np.ndarray]
) -> dict[str, str]:
    """Write each trigger image (H, W, 3) uint8 as a PNG; return artefact keys -> paths relative to
    ``report_dir`` (``"trigger:<class index>"``), ready for ``ModelReport.artefacts``."""
    out: dict[str, str] = {}
    rel_dir = Path(MODELS_DIR) / model_slug(model)
    (report_dir / rel_dir).mkdir(parents=True, exist_ok=True)
    for index, arr in sorted(images.items()):
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"trigger image {index} must be (H, W, 3) uint8; got {arr.dtype} {arr.shape}")
        rel = rel_dir / f"trigger-{index}.png"
        Image.fromarray(arr, "RGB").save(report_dir / rel)
        out[f"trigger:{index}"] = rel.as_posix()
    return out


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.3g}"


def score_plot_svg(model: ModelReport) -> str:
    """Inline SVG bar plot of per-class anomaly scores with the threshold line ('' when no scores)."""
    scores = list(model.class_scores)
    if not scores:
        return ""
    note = ""
    if len(scores) > MAX_PLOTTED_CLASSES:
        note = f"highest {MAX_PLOTTED_CLASSES} of {len(scores)} classes"
        scores = sorted(scores, key=lambda c: c.anomaly_score, reverse=True)[:MAX_PLOTTED_CLASSES]
    values = [c.anomaly_score for c in scores]
    lo = min(0.0, *values)
    hi = max(*values, model.threshold if model.threshold is not None else 0.0, lo + 1e-6)
    span = (hi - lo) * 1.08 or 1.0

    def x(v: float) -> float:
        return _LABEL_W + (v - lo) / span * _PLOT_W

    height = _PAD * 2 + len(scores) * (_BAR_H + _GAP) + 16
    width = _LABEL_W + _PLOT_W + 60
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="per-class anomaly scores" '
        'font-family="system-ui,sans-serif" font-size="11">'
    ]
    zero = x(0.0)
    for row, c in enumerate(scores):
        y = _PAD + row * (_BAR_H + _GAP)
        left, right = sorted((zero, x(c.anomaly_score)))
        target = model.target_index is not None and c.index == model.target_index
        colour = "#cf222e" if target else "#8c959f"
        name = html.escape(c.name if len(c.name) <= 28 else c.name[:27] + "…")
        parts.append(f'<text x="{_LABEL_W - 6}" y="{y + _BAR_H - 3}" text-anchor="end">{name}</text>')
        parts.append(
            f'<rect class="bar" x="{left:.1f}" y="{y}" width="{max(right - left, 0.5):.1f}" '
            f'height="{_BAR_H}" '
            f'fill="{colour}"><title>{html.escape(c.name)}: {c.anomaly_score:.3f}</title></rect>'
        )
        parts.append(f'<text x="{right + 4:.1f}" y="{y + _BAR_H - 3}">{c.anomaly_score:.2f}</text>')
    axis_y = _PAD + len(scores) * (_BAR_H + _GAP)
    parts.append(f'<line x1="{zero:.1f}" y1="{_PAD}" x2="{zero:.1f}" y2="{axis_y}" stroke="#57606a"/>')
    if model.threshold is not None:
        tx = x(model.threshold)
        parts.append(
            f'<line class="threshold" x1="{tx:.1f}" y1="{_PAD - 4}" x2="{tx:.1f}" y2="{axis_y}" '
            'stroke="#cf222e" stroke-dasharray="4 3"/>'
        )
        parts.append(f'<text x="{tx:.1f}" y="{axis_y + 12}" text-anchor="middle" fill="#cf222e">'
                     f"threshold {model.threshold:.3g}</text>")
    if note:
        parts.append(f'<text x="{_LABEL_W}" y="{height - 2}" fill="#57606a">{html.escape(note)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def _badge(v: Verdict) -> str:
    return f'<span class="verdict" style="background:{_COLOURS[v]}">{v.value}</span>'


def _page(title: str, body: str) -> str:
    head = f'<meta charset="utf-8"><title>{html.escape(title)}</title><style>{_CSS}</style>'
    return f'<!DOCTYPE html>\n<html lang="en"><head>{head}</head><body>\n{body}\n</body></html>\n'


def model_page(model: ModelReport) -> str:
    """The HTML page of one model; trigger links are relative to the page in ``models/``."""
    rows = [
        ("path", f"<code>{html.escape(model.path)}</code>"),
        ("verdict", _badge(model.verdict)),
        ("adapter", html.escape(model.adapter or "–")),
        ("model sha256", f"<code>{html.escape(model.sha256 or '–')}</code>"),
        ("target class", html.escape(model.target_class or "–")),
        ("anomaly score", f"{_fmt(model.anomaly_score)} (threshold {_fmt(model.threshold)})"),
        ("detector", html.escape(model.detector or "–")),
        ("backbone", html.escape(f"{model.backbone or '–'} ({(model.backbone_sha256 or '')[:16]})")),
        ("OOD pool sha256", f"<code>{html.escape((model.ood_sha256 or '–')[:16])}</code>"),
        ("seed", html.escape(str(model.seed))),
        ("duration", f"{model.duration_s:.1f} s"),
    ]
    if model.unsafe_globals:
        rows.append(("unsafe globals", "<code>" + html.escape(", ".join(model.unsafe_globals)) + "</code>"))
    if model.message:
        rows.append(("message", html.escape(model.message)))
    body = [f"<h1>{_badge(model.verdict)} {html.escape(Path(model.path).name)}</h1>",
            '<p><a href="../index.html">all models</a></p>',
            "<table>" + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows) + "</table>"]
    plot = score_plot_svg(model)
    if plot:
        body += ["<h2>Per-class anomaly scores</h2>", plot]
    triggers = sorted(
        ((int(k.split(":", 1)[1]), v) for k, v in model.artefacts.items() if k.startswith("trigger:")),
    )
    if triggers:
        names = {c.index: c.name for c in model.class_scores}
        figs = []
        for index, rel in triggers:
            src = html.escape(Path(rel).relative_to(MODELS_DIR).as_posix())
            label = html.escape(names.get(index, str(index)))
            mark = " (target)" if index == model.target_index else ""
            figs.append(f'<figure><img src="{src}" alt="trigger for {label}"><figcaption>{label}{mark}'
                        "</figcaption></figure>")
        body += ["<h2>Reconstructed triggers</h2>", f'<div class="triggers">{"".join(figs)}</div>']
    if model.class_scores and any(c.evidence for c in model.class_scores):
        keys = sorted({k for c in model.class_scores for k in c.evidence})
        head = "".join(f"<th>{html.escape(k)}</th>" for k in ["class", "score", *keys])
        trs = "".join(
            f"<tr><td>{html.escape(c.name)}</td><td>{c.anomaly_score:.3f}</td>"
            + "".join(f"<td>{_fmt(c.evidence.get(k))}</td>" for k in keys) + "</tr>"
            for c in model.class_scores
        )
        body += ["<h2>Evidence</h2>", f"<table><tr>{head}</tr>{trs}</table>"]
    return _page(f"scanner: {Path(model.path).name}", "\n".join(body))


def index_page(report: ScanReport) -> str:
    """The index of a scan: counts per verdict and one linked row per model."""
    counts = ", ".join(f"{n} {v}" for v, n in report.counts().items() if n) or "no models"
    rows = []
    for m in report.models:
        link = m.artefacts.get("html")
        name = html.escape(m.path)
        cell = f'<a href="{html.escape(link)}">{name}</a>' if link else name
        rows.append(f"<tr><td>{_badge(m.verdict)}</td><td>{cell}</td><td>{html.escape(m.target_class or '')}"
                    f"</td><td>{_fmt(m.anomaly_score)}</td><td>{html.escape(m.message)}</td></tr>")
    body = (f"<h1>scanner report</h1><p>root <code>{html.escape(report.root)}</code>: {html.escape(counts)}; "
            f"exit code {int(report.exit_code())}</p>"
            "<table><tr><th>verdict</th><th>model</th><th>target</th><th>score</th><th>message</th></tr>"
            + "".join(rows) + "</table>")
    return _page("scanner report", body)


def write_model_page(report_dir: Path, model: ModelReport) -> str:
    """Write the model's page under ``report_dir/models/``; return its path relative to ``report_dir``."""
    rel = Path(MODELS_DIR) / f"{model_slug(model)}.html"
    (report_dir / rel).parent.mkdir(parents=True, exist_ok=True)
    (report_dir / rel).write_text(model_page(model), encoding="utf-8")
    return rel.as_posix()


def write_index(report_dir: Path, report: ScanReport) -> Path:
    """Write ``report_dir/index.html`` (and ``report.json`` beside it); return the index path."""
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "report.json").write_text(report.to_json(), encoding="utf-8")
    path = report_dir / "index.html"
    path.write_text(index_page(report), encoding="utf-8")
    return path
