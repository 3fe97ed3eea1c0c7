"""The human-readable summary ``scanner scan-once`` prints by default."""

from __future__ import annotations

from scanner.report import ExitCode, ModelReport, ScanReport, Verdict

_EXIT_MEANING = {
    ExitCode.CLEAN: "every scanned model is clean",
    ExitCode.FLAGGED: "at least one model is backdoored or unsafe",
    ExitCode.ERROR: "at least one model could not be scanned and none is flagged",
    ExitCode.NOTHING_SCANNABLE: "nothing scannable was found",
}


def _line(m: ModelReport) -> str:
    head = f"{m.verdict.value.upper():<10} {m.path}"
    details: list[str] = []
    if m.adapter:
        details.append(f"adapter={m.adapter}")
    if m.verdict is Verdict.BACKDOORED and m.target_class is not None:
        details.append(f"target={m.target_class!r}")
    if m.anomaly_score is not None:
        thr = f" (threshold {m.threshold:.3g})" if m.threshold is not None else ""
        details.append(f"score={m.anomaly_score:.2f}{thr}")
    if m.unsafe_globals:
        details.append("globals=" + ",".join(m.unsafe_globals))
    if m.category and m.verdict in (Verdict.ERROR, Verdict.UNSAFE):
        details.append(f"category={m.category}")
    out = head + ("  " + " ".join(details) if details else "")
    if m.message:
        out += f"\n           {m.message}"
    return out


def to_text(report: ScanReport) -> str:
    """One block per model, then counts per verdict and what the exit code means."""
    lines = [_line(m) for m in report.models]
    counts = report.counts()
    summary = ", ".join(f"{n} {v}" for v, n in counts.items() if n)
    code = report.exit_code()
    if not report.models:
        lines.append(f"no model files found under {report.root}")
    lines.append(f"summary: {summary or 'no models'}; exit {int(code)}: {_EXIT_MEANING[code]}")
    return "\n".join(lines) + "\n"
