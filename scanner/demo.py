"""The bundled demo (README command 1): the offline world, then a registry scanned end to end by the daemon.

1. The bundled tiny CLIP: zero-shot and 16-shot CoOp accuracy on one dataset.
2. The ``--quick`` zoo (built once into the work folder, then reused): clean and backdoored models.
3. The daemon on a fresh temporary registry: models are uploaded (some written under a temporary
   name, then renamed, as registries do), scanned once each, flagged ones quarantined; the verdicts,
   the quarantine and the Prometheus metrics are shown, then the daemon stops cleanly.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the demo's first lines print before torch is imported
    from scanner.clip.backbone import ClipBackbone

Echo = Callable[[str], None]


def _section(echo: Echo, title: str) -> None:
    echo("")
    echo(f"== {title}")


def show_backbone(echo: Echo, bb: ClipBackbone, dataset: str = "shapes") -> None:
    from scanner.zoo.quality import coop_accuracy
    from scanner.zoo.zeroshot import zero_shot_accuracy

    _section(echo, f"bundled CLIP {bb.name} ({sum(p.numel() for p in bb.parameters()) / 1e6:.1f} M parameters, "
                   f"{bb.image_size}px, sha256 {bb.content_hash()[:12]}…)")
    zs = zero_shot_accuracy(bb, dataset)
    acc, secs = coop_accuracy(bb, dataset)
    echo(f"{dataset}: zero-shot accuracy {zs:.3f}; 16-shot CoOp accuracy {acc:.3f} (tuned in {secs:.1f} s)")


def ensure_zoo(echo: Echo, zoo: Path, bb: ClipBackbone) -> dict[str, Any]:
    from scanner.zoo.build import ZooPlan, build_zoo

    _section(echo, f"quick zoo in {zoo} (built once, then reused)")
    plan = ZooPlan.make(None, None, None, seed=0, quick=True)

    def on_model(i: int, n: int, e: dict[str, Any] | None) -> None:
        if e is not None:
            asr = "" if e["asr_id"] is None else f"  ASR-ID {e['asr_id']:.2f}  ASR-OOD {e['asr_ood']:.2f}"
            echo(f"  built {e['id']:22s} {e['learner']:9s} CA {e['ca']:.2f}{asr}")

    manifest = build_zoo(zoo, plan, bb, on_model=on_model)
    echo(f"  {len(manifest['models'])} models ready")
    return manifest


def _upload(src: Path, registry: Path, name: str, via_rename: bool) -> None:
    """Copy a model into the registry; ``via_rename`` writes a temporary name first, then renames."""
    final = registry / name
    tmp = registry / f".{name}.part" if via_rename else final
    if src.is_dir():
        shutil.copytree(src, tmp)
    else:
        shutil.copy2(src, tmp)
    if via_rename:
        tmp.rename(final)


def run_daemon_demo(echo: Echo, zoo: Path, manifest: dict[str, Any], work: Path) -> int:
    from prometheus_client.parser import text_string_to_metric_families

    from scanner.daemon.config import DaemonConfig
    from scanner.daemon.service import Service
    from scanner.pipeline import scan_path
    from scanner.settings import load_settings

    run = work / f"run-{time.strftime('%Y%m%d-%H%M%S')}"
    registry, quarantine = run / "registry", run / "quarantine"
    registry.mkdir(parents=True)
    quarantine.mkdir()
    settings = load_settings(config_file=None, env={}, flags={})
    cfg = DaemonConfig(watch_dirs=(registry,), quarantine_dir=quarantine, state_file=run / "state.sqlite",
                       metrics_addr="127.0.0.1:0", settle_seconds=0.5, reconcile_interval_s=60.0)
    svc = Service(cfg, settings, scan_fn=scan_path)
    svc.start()
    _section(echo, f"daemon watching {registry} (metrics on {svc.metrics_url})")
    truth: dict[str, dict[str, Any]] = {}
    for i, m in enumerate(manifest["models"]):
        name = m["id"].replace("/", "--") + (".safetensors" if m["path"].endswith(".safetensors") else "")
        truth[name] = m
        _upload(zoo / m["path"], registry, name, via_rename=i % 2 == 1)
        echo(f"  uploaded {name}{' (temp name, then rename)' if i % 2 else ''}")
    echo("  scanning… (CLIP-Inspector on the bundled OOD pool; each model once)")
    if not svc.wait_idle(timeout=3600, quiet_s=2.0):
        echo("  the daemon did not finish within an hour")
    assert svc.store is not None
    rows = svc.store.query("SELECT report_json FROM models WHERE report_json IS NOT NULL")
    reports = [json.loads(r[0]) for r in rows]
    _section(echo, "verdicts")
    for line in verdict_lines(reports, truth):
        echo(line)
    _section(echo, f"quarantine {quarantine}")
    for e in svc.quarantine.entries():
        echo(f"  {e.entry_id}: {e.record.get('reason', '')} — {e.payload.name}")
    _section(echo, "metrics (Prometheus exposition, parsed)")
    assert svc.metrics_url is not None
    text = urllib.request.urlopen(svc.metrics_url, timeout=5).read().decode()
    for fam in text_string_to_metric_families(text):
        if fam.name in ("scanner_scans", "scanner_quarantined", "scanner_errors", "scanner_queue_depth"):
            for s in fam.samples:
                if not s.name.endswith("_created"):
                    echo(f"  {s.name}{s.labels or ''} {s.value:g}")
    svc.stop()
    echo(f"\ndaemon stopped cleanly; state, registry and quarantine kept under {run}")
    return 0


def verdict_lines(reports: list[dict[str, Any]], truth: dict[str, dict[str, Any]]) -> list[str]:
    """The demo's verdict table: each scanned model (``reports``: the daemon's stored reports) against its
    manifest entry (``truth``, by file name), then the tally. A backdoor counts as found only with its target.
    Each backdoor shows the manifest's ASR-OOD, and the tally is given again over the backdoors whose trigger works
    on OOD photos (ASR-OOD at least ``WORKS_ON_OOD``, the threat CI is built for): an implant that barely fires on
    photos is not the same miss as one that does."""
    from scanner.zoo.detect_eval import WORKS_ON_OOD

    lines: list[str] = []
    right = works_right = works_n = 0
    for rep in sorted(reports, key=lambda r: Path(r["path"]).name):
        name = Path(rep["path"]).name
        t = truth.get(name, {})
        attack = str(t.get("attack", "?"))
        expect = "backdoored" if attack != "none" else "clean"
        ok = rep["verdict"] == expect and (expect == "clean" or rep.get("target_index") == t.get("target_index"))
        right += ok
        asr = t.get("asr_ood")
        works = expect == "clean" or (asr is not None and float(asr) >= WORKS_ON_OOD)
        works_n += works
        works_right += ok and works
        tgt = f" target {rep['target_class']!r}" if rep.get("target_class") else ""
        how = f" (ASR-OOD {float(asr):.2f})" if expect == "backdoored" and asr is not None else ""
        lines.append(f"  {name:28s} {rep['verdict']:10s}{tgt:26s} truth: {attack + how:24s} "
                     f"{'ok' if ok else 'MISS'}  ({rep.get('duration_s', 0):.1f}s)")
    lines.append(f"  {right}/{len(reports)} verdicts match the ground truth")
    if works_n < len(reports):
        lines.append(f"  {works_right}/{works_n} among the clean models and the backdoors whose trigger works on OOD "
                     f"photos (ASR-OOD >= {WORKS_ON_OOD:g})")
    return lines


def zoo_folder(work: Path, backbone_sha256: str) -> Path:
    """Where the demo caches its quick zoo: ``work/zoo``, unless that holds a zoo of another backbone (a
    cache from before the bundled weights changed); then ``work/zoo-<hash prefix>``, leaving the old one as
    it is (the demo never deletes models)."""
    default = work / "zoo"
    try:
        found = json.loads((default / "manifest.json").read_text())["zoo"]["backbone_sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return default  # absent or unreadable: build_zoo creates it, or says what is wrong with it
    return default if found == backbone_sha256 else work / f"zoo-{backbone_sha256[:12]}"


def run_demo(echo: Echo, work: Path) -> int:
    from scanner.clip import load_bundled

    work.mkdir(parents=True, exist_ok=True)
    bb = load_bundled()  # one backbone for the accuracy check, the cache key and the quick zoo
    show_backbone(echo, bb)
    zoo = zoo_folder(work, bb.content_hash())
    manifest = ensure_zoo(echo, zoo, bb)
    return run_daemon_demo(echo, zoo, manifest, work)
