"""The substrate probe's arms side by side (``benchmarks/substrate_probe.sh`` writes them).

    python benchmarks/substrate_probe_summary.py [OUT]     (default runs/substrate_probe)

Per arm: mean zero-shot accuracy over the generated datasets; clean, BadNets and Blended models' clean
accuracy and ASR (in-distribution / on OOD photos); how many clean models have a natural trigger in
``natural_triggers.py``'s overlay bank (a patch of <= 6 px, or anything); CI at the default lines.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from scanner.zoo.detect_eval import metrics


def _read(path: Path) -> Any:
    return json.loads(path.read_text())


def arm_line(out: Path, arm: str) -> str:
    parts = [f"{arm:5s}"]
    info = out / f"{arm}.info.json"
    if info.exists():
        parts.append(f"zero-shot {np.mean([r['zero_shot'] for r in _read(info) if not r.get('real')]):.3f}")
    models = _read(out / f"zoo_{arm}" / "manifest.json")["models"]
    for attack in ("none", "badnets", "blended"):
        ms = [m for m in models if m["attack"] == attack]
        if not ms:
            continue
        ca = np.mean([m["ca"] for m in ms])
        if attack == "none":
            parts.append(f"clean CA {ca:.3f}")
        else:
            parts.append(f"{attack} CA {ca:.3f} ASR-ID {np.mean([m['asr_id'] for m in ms]):.2f} "
                         f"ASR-OOD {np.mean([m['asr_ood'] for m in ms]):.2f}")
    nat = out / f"{arm}.nat.json"
    if nat.exists():
        clean = [r for r in _read(nat) if r["attack"] == "none"]
        small = sum(r["patch_px"][0] <= 6 for r in clean)
        anything = sum(r["patch_px"][0] < math.inf or r["blend_alpha"][0] < math.inf for r in clean)
        parts.append(f"natural triggers: patch <= 6 px {small}/{len(clean)}, any {anything}/{len(clean)}")
    ev = out / f"{arm}.eval.json"
    if ev.exists():
        rows = [r for r in _read(ev)["rows"] if r["detector"] == "ci"]
        m = metrics(rows)
        parts.append(f"CI accuracy {m['accuracy']:.3f} AUROC {m['auroc']:.3f} (both {m['auroc_combined']:.3f}) "
                     f"TPR {m['tpr']:.2f} FPR {m['fpr']:.2f} ({len(rows)} models)")
    return " | ".join(parts)


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs/substrate_probe")
    # every arm the probe built, the shipped backbone first
    arms = sorted((p.parent.name[4:] for p in out.glob("zoo_*/manifest.json")), key=lambda a: (a != "base", a))
    if not arms:
        sys.exit(f"no probe arms under {out}: run benchmarks/substrate_probe.sh {out} first")
    for arm in arms:
        print(arm_line(out, arm))


if __name__ == "__main__":
    main()
