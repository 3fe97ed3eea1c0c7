"""SARIF 2.1.0: one rule per verdict kind, one result per model, located at the model's path.

Code-scanning UIs show ``level: error`` results as alerts, so backdoored and unsafe models are errors,
models that could not be scanned are warnings, and clean/skipped models are recorded as ``pass`` /
``notApplicable`` results so the log says what was looked at (SARIF §3.27.9: any ``kind`` other than
``fail`` must have level ``none``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from scanner import __version__
from scanner.report import ModelReport, ScanReport, Verdict

SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
ROOT_BASE_ID = "SCANROOT"

# verdict -> (rule id, short description, help text, result level, result kind)
_RULES: dict[Verdict, tuple[str, str, str, str, str]] = {
    Verdict.BACKDOORED: (
        "SCN001", "Backdoored prompt-tuned model",
        "The detector reconstructed a trigger that sends out-of-distribution images to one class far more "
        "than to any other. Do not deploy; review the reconstructed trigger in the HTML report.",
        "error", "fail",
    ),
    Verdict.UNSAFE: (
        "SCN002", "Checkpoint needs code execution to load",
        "Loading this file would import globals outside the allow-list (pickle code execution). It was "
        "never executed. Re-export it as safetensors or a weights-only checkpoint.",
        "error", "fail",
    ),
    Verdict.ERROR: (
        "SCN003", "Model could not be scanned",
        "The file is corrupt, truncated, too large, or needs a backbone that is not declared. The message "
        "says which; fix it and scan again.",
        "warning", "fail",
    ),
    Verdict.SKIPPED: (
        "SCN004", "Not a scannable model",
        "No adapter recognised this path; it was not scanned and is not known to be clean.",
        "none", "notApplicable",
    ),
    Verdict.CLEAN: (
        "SCN000", "Clean prompt-tuned model",
        "No class stood out as a backdoor target.",
        "none", "pass",
    ),
}


def _rule(verdict: Verdict) -> dict[str, Any]:
    rid, short, full, level, _ = _RULES[verdict]
    return {
        "id": rid,
        "name": verdict.value,
        "shortDescription": {"text": short},
        "fullDescription": {"text": full},
        "help": {"text": full},
        "defaultConfiguration": {"level": level},
    }


def _uri(path: str, root: Path) -> tuple[str, bool]:
    """(uri, relative-to-root?) — a POSIX relative path when the model lies under the root."""
    p = Path(path)
    try:
        rel = os.path.relpath(p.resolve(), root.resolve())
    except ValueError:
        rel = ""
    if rel and not rel.startswith(".."):
        return Path(rel).as_posix(), True
    return p.resolve().as_uri(), False


def _message(m: ModelReport) -> str:
    if m.verdict is Verdict.BACKDOORED:
        score = f", anomaly score {m.anomaly_score:.2f}" if m.anomaly_score is not None else ""
        thr = f" > threshold {m.threshold:.3g}" if m.threshold is not None else ""
        return f"backdoored: target class {m.target_class!r}{score}{thr}. {m.message}".strip()
    if m.verdict is Verdict.UNSAFE:
        names = ", ".join(m.unsafe_globals) or "disallowed globals"
        return f"unsafe: would import {names}. {m.message}".strip()
    return f"{m.verdict.value}: {m.message}".strip() if m.message else m.verdict.value


def to_sarif(report: ScanReport) -> dict[str, Any]:
    """The SARIF log (a JSON-ready dict) of ``report``."""
    root = Path(report.root)
    base = root if root.is_dir() else root.parent
    verdicts = list(_RULES)
    rule_index = {v: i for i, v in enumerate(verdicts)}
    results = []
    for m in report.models:
        rid, _, _, level, kind = _RULES[m.verdict]
        uri, relative = _uri(m.path, base)
        artifact: dict[str, Any] = {"uri": uri}
        if relative:
            artifact["uriBaseId"] = ROOT_BASE_ID
        props: dict[str, Any] = {
            "verdict": m.verdict.value,
            "adapter": m.adapter,
            "targetClass": m.target_class,
            "anomalyScore": m.anomaly_score,
            "threshold": m.threshold,
            "category": m.category,
            "backbone": m.backbone,
            "unsafeGlobals": m.unsafe_globals,
        }
        result: dict[str, Any] = {
            "ruleId": rid,
            "ruleIndex": rule_index[m.verdict],
            "level": level,
            "kind": kind,
            "message": {"text": _message(m)},
            "locations": [{"physicalLocation": {"artifactLocation": artifact}}],
            "properties": {k: v for k, v in props.items() if v not in (None, [])},
        }
        if m.sha256:
            result["partialFingerprints"] = {"modelSha256/v1": m.sha256}
        results.append(result)
    code = int(report.exit_code())
    return {
        "$schema": SARIF_SCHEMA,
        "version": "2.1.0",
        "runs": [
            {
                "tool": {
                    "driver": {
                        "name": "scanner",
                        "version": report.scanner_version or __version__,
                        "rules": [_rule(v) for v in verdicts],
                    }
                },
                "originalUriBaseIds": {ROOT_BASE_ID: {"uri": base.resolve().as_uri() + "/"}},
                "invocations": [{"executionSuccessful": code in (0, 1), "exitCode": code}],
                "results": results,
                "properties": {"counts": report.counts()},
            }
        ],
    }
