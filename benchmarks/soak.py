"""Soak benchmark of ``scanner daemon``: many uploads while the daemon is SIGKILLed at random and restarted.

    python benchmarks/soak.py --uploads 500 --scan-fn simple [--seed 0] [--workers 2]

Uploads mix: final-name writes in pieces (partial writes), temp-name-then-rename (``.part``, ``.tmp``,
``.~x``), model directories renamed into place, duplicates of earlier uploads, corrupt files, in-place
rewrites of clean models, and abandoned ``.part`` files that must never be scanned. About 15% carry a
backdoor marker and 5% an unsafe marker (``--scan-fn simple`` decides from the bytes, like the tests).
``--scan-fn real`` runs ``scanner.pipeline.scan_path`` on copies of the models under ``--models DIR``.

At the end the daemon runs without kills until it converges, then a second batch (``--flat-uploads``)
measures memory growth. Printed figures: models lost, left unscanned, scanned twice (recorded scans),
flagged not quarantined, quarantine records incomplete, temp files scanned, kills, peak RSS, RSS growth.
Exit status 0 only if every correctness figure is 0.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MARK_BACKDOOR = b"BACKDOOR"
MARK_UNSAFE = b"UNSAFE"
MARK_CORRUPT = b"CORRUPT"


# ------------------------------------------------------------------------------- the daemon side
def simple_scan(path: Path, settings: Any = None) -> Any:
    """A real, content-based scan function (``scan_path``'s signature): verdict from marker bytes."""
    from scanner.errors import CheckpointError
    from scanner.report import ModelReport, ScanReport, Verdict

    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    data = b"".join(p.read_bytes() for p in files)
    time.sleep(float(os.environ.get("SOAK_SCAN_DELAY", "0.01")))  # the detector's work, compressed
    if not data or MARK_CORRUPT in data:
        raise CheckpointError(f"{path}: not a readable checkpoint")
    verdict = (
        Verdict.BACKDOORED
        if MARK_BACKDOOR in data
        else Verdict.UNSAFE
        if MARK_UNSAFE in data
        else Verdict.CLEAN
    )
    log = os.environ.get("SOAK_SCAN_LOG")
    if log:  # one line per completed scan-function call, to count re-runs across kills
        with open(log, "a") as f:
            f.write(f"{hashlib.sha256(data).hexdigest()}\n")
    return ScanReport(root=str(path), models=[ModelReport(path=str(path), verdict=verdict)])


def serve(work: Path, scan_fn_name: str, settle: float, workers: int) -> int:
    """Child process: the daemon on ``work``; SIGTERM stops it."""
    import logging

    from scanner.daemon import DaemonConfig, Service

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings: Any = None
    if scan_fn_name == "real":
        from scanner.pipeline import scan_path
        from scanner.settings import load_settings

        settings, scan_fn = load_settings(), (lambda p, s: scan_path(p, s))
    else:
        scan_fn = simple_scan
    config = DaemonConfig(
        watch_dirs=(work / "registry",),
        quarantine_dir=work / "quarantine",
        state_file=work / "state.sqlite",
        metrics_addr="127.0.0.1:0",
        webhook_addr=None,
        settle_seconds=settle,
        reconcile_interval_s=5.0,
        workers=workers,
        max_attempts=50,  # random kills interrupt innocent scans; do not give up on them
    )
    return Service(config, settings, scan_fn=scan_fn).run()


# ------------------------------------------------------------------------------- the producer side
@dataclass
class Upload:
    path: Path
    sha256: str  # content hash of the unit (file bytes, or directory manifest)
    kind: str
    expected: str | None  # simple mode: backdoored/unsafe/error/clean
    superseded: bool = False  # rewritten in place later: the new upload is the one checked


@dataclass
class Daemon:
    work: Path
    args: argparse.Namespace
    proc: subprocess.Popen[bytes] | None = None
    kills: int = 0
    peak_rss_kb: int = 0
    samples: list[tuple[float, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        env = dict(
            os.environ,
            SOAK_SCAN_LOG=str(self.work / "scan-calls.log"),
            SOAK_SCAN_DELAY=str(self.args.scan_delay),
        )
        cmd = [sys.executable, __file__, "--serve", str(self.work), "--scan-fn", self.args.scan_fn,
               "--settle", str(self.args.settle), "--workers", str(self.args.workers)]  # fmt: skip
        with self.lock:
            self.proc = subprocess.Popen(cmd, env=env, stderr=open(self.work / "daemon.log", "ab"))  # noqa: SIM115

    def kill(self) -> None:
        with self.lock:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGKILL)
                self.proc.wait()
                self.kills += 1

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)

    def rss_kb(self) -> int:
        with self.lock:
            pid = self.proc.pid if self.proc is not None and self.proc.poll() is None else None
        if pid is None:
            return 0
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        except OSError:
            pass
        return 0

    def sample(self) -> None:
        rss = self.rss_kb()
        if rss:
            self.peak_rss_kb = max(self.peak_rss_kb, rss)
            self.samples.append((time.time(), rss))


def unit_hash(path: Path) -> str:
    from scanner.daemon.units import content_hash

    return content_hash(path)


class Producer:
    def __init__(self, registry: Path, rng: random.Random, models: list[Path] | None) -> None:
        self.registry = registry
        self.rng = rng
        self.models = models
        self.uploads: list[Upload] = []
        self.abandoned: list[Path] = []
        self.n = 0

    def _payload(self) -> tuple[bytes, str]:
        r = self.rng.random()
        body = self.rng.randbytes(self.rng.randint(64, 4096))
        if r < 0.15:
            return MARK_BACKDOOR + body, "backdoored"
        if r < 0.20:
            return MARK_UNSAFE + body, "unsafe"
        if r < 0.27:
            return MARK_CORRUPT + body, "error"
        return body.replace(MARK_BACKDOOR, b"").replace(MARK_UNSAFE, b"").replace(MARK_CORRUPT, b""), "clean"

    def _folder(self) -> Path:
        sub = self.registry / f"team{self.rng.randint(0, 4)}"
        sub.mkdir(exist_ok=True)
        return sub

    def one(self) -> None:
        self.n += 1
        kind = self.rng.choices(
            ["pieces", "rename", "dir", "duplicate", "rewrite", "abandoned"], weights=[30, 35, 12, 10, 8, 5]
        )[0]
        if self.models:
            kind = self.rng.choice(["rename", "duplicate"]) if kind not in ("rename", "duplicate") else kind
        folder = self._folder()
        name = f"m{self.n:05d}"
        if kind == "duplicate" and self.uploads:
            src = self.rng.choice(self.uploads)
            if src.path.is_file():
                data = src.path.read_bytes()
                dest = folder / f"{name}-dup.safetensors"
                tmp = folder / f".{dest.name}.tmp"
                tmp.write_bytes(data)
                os.rename(tmp, dest)
                self.uploads.append(Upload(dest, unit_hash(dest), kind, src.expected))
                return
            kind = "rename"
        if kind == "rewrite":
            clean = [
                u for u in self.uploads if u.expected == "clean" and not u.superseded and u.path.is_file()
            ]
            if clean:
                old = self.rng.choice(clean)
                data, expected = self._payload()
                if expected != "clean":
                    data, expected = b"clean rewrite " + self.rng.randbytes(256), "clean"
                old.superseded = True
                old.path.write_bytes(data)
                self.uploads.append(Upload(old.path, hashlib.sha256(data).hexdigest(), kind, expected))
                return
            kind = "pieces"
        if self.models:
            model = self.rng.choice(self.models)
            dest = folder / f"{name}-{model.name}"
            tmp = folder / f".{dest.name}.part"
            (shutil.copytree if model.is_dir() else shutil.copy2)(model, tmp)
            os.rename(tmp, dest)
            self.uploads.append(Upload(dest, unit_hash(dest), kind, None))
            return
        data, expected = self._payload()
        if kind == "abandoned":
            p = folder / f"{name}.safetensors.part"
            p.write_bytes(data[: len(data) // 2])
            self.abandoned.append(p)
            return
        if kind == "dir":
            tmp = folder / f".tmp-{name}"
            (tmp / "prompt_learner").mkdir(parents=True)
            (tmp / "prompt_learner" / "model.pth.tar-5").write_bytes(data)
            (tmp / "prompt_learner" / "checkpoint").write_text("model.pth.tar-5\n")
            dest = folder / name
            os.rename(tmp, dest)
            self.uploads.append(Upload(dest, unit_hash(dest), kind, expected))
            return
        dest = folder / f"{name}.safetensors"
        if kind == "pieces":  # the final name written in pieces, pauses shorter than the settle time
            with open(dest, "wb") as f:
                step = max(1, len(data) // 3)
                for i in range(0, len(data), step):
                    f.write(data[i : i + step])
                    f.flush()
                    time.sleep(0.02)
        else:
            tmp = folder / self.rng.choice([f".{dest.name}.part", f"{dest.name}.tmp", f".~{dest.name}"])
            tmp.write_bytes(data)
            os.rename(tmp, dest)
        self.uploads.append(Upload(dest, hashlib.sha256(data).hexdigest(), kind, expected))


# ------------------------------------------------------------------------------- checks
def _db(work: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(work / "state.sqlite", timeout=30) as conn:
        return list(conn.execute(sql))


def _quarantined(work: Path) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for rec in (work / "quarantine").glob("*/quarantine-record.json"):
        r = json.loads(rec.read_text())
        out.setdefault(r["sha256"], []).append(r | {"folder": str(rec.parent)})
    return out


def converged(work: Path, uploads: list[Upload]) -> bool:
    try:
        models = {
            sha: (status, verdict)
            for sha, status, verdict in _db(work, "SELECT sha256, status, verdict FROM models")
        }
    except sqlite3.OperationalError:
        return False
    for u in uploads:
        if u.superseded:
            continue
        status, verdict = models.get(u.sha256, (None, None))
        if status != "done":
            return False
        if verdict in ("backdoored", "unsafe") and u.path.exists():
            return False
    return True


def check(work: Path, producer: Producer, daemon: Daemon) -> dict[str, Any]:
    models = {r[0]: (r[1], r[2]) for r in _db(work, "SELECT sha256, status, verdict FROM models")}
    scans = dict(_db(work, "SELECT sha256, COUNT(*) FROM scans GROUP BY sha256"))
    quarantined = _quarantined(work)
    live = [u for u in producer.uploads if not u.superseded]
    lost, unscanned, flagged_left, wrong_verdict = [], [], [], []
    for u in live:
        at_path = u.path.exists() and unit_hash(u.path) == u.sha256
        in_q = any(
            r["status"] == "quarantined" and Path(r["folder"], r["payload"]).exists()
            for r in quarantined.get(u.sha256, [])
        )
        if not (at_path or in_q):
            lost.append(str(u.path))
        status, verdict = models.get(u.sha256, (None, None))
        if status != "done":
            unscanned.append(str(u.path))
        if verdict in ("backdoored", "unsafe") and u.path.exists():
            flagged_left.append(str(u.path))
        if u.expected is not None and verdict is not None and verdict != u.expected:
            wrong_verdict.append(f"{u.path}: {verdict} != {u.expected}")
    incomplete_records, aborted = [], 0
    for sha, recs in quarantined.items():
        for r in recs:
            payload = Path(r["folder"], r["payload"])
            if r["status"] == "aborted":  # a recorded failed attempt; the model stayed in the tree
                aborted += 1
                continue
            if (
                r["status"] != "quarantined"
                or not payload.exists()
                or unit_hash(payload) != sha
                or not r.get("report")
            ):
                incomplete_records.append(r["folder"])
    abandoned_scanned = [
        str(p) for p in producer.abandoned if _db(work, f"SELECT 1 FROM paths WHERE path='{p}'")
    ]
    calls: dict[str, int] = {}
    log = work / "scan-calls.log"
    for line in log.read_text().splitlines() if log.exists() else []:
        calls[line] = calls.get(line, 0) + 1
    return {
        "uploads": len(producer.uploads),
        "distinct_models": len({u.sha256 for u in live}),
        "kinds": {
            k: sum(u.kind == k for u in producer.uploads) for k in sorted({u.kind for u in producer.uploads})
        },
        "abandoned_partials": len(producer.abandoned),
        "kills": daemon.kills,
        "models_lost": len(lost),
        "left_unscanned": len(unscanned),
        "scanned_twice_recorded": sum(n > 1 for n in scans.values()),
        "scan_fn_reruns_after_kill": sum(n > 1 for n in calls.values()),
        "flagged_not_quarantined": len(flagged_left),
        "incomplete_quarantine_records": len(incomplete_records),
        "temp_files_scanned": len(abandoned_scanned),
        "wrong_verdicts": len(wrong_verdict),
        "quarantined_entries": sum(len(v) for v in quarantined.values()) - aborted,
        "aborted_quarantine_attempts": aborted,
        "examples": {
            "lost": lost[:3],
            "unscanned": unscanned[:3],
            "flagged_left": flagged_left[:3],
            "wrong": wrong_verdict[:3],
            "records": incomplete_records[:3],
        },
    }


# ------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--uploads", type=int, default=500)
    ap.add_argument("--flat-uploads", type=int, default=300, help="second batch, no kills: memory growth")
    ap.add_argument("--scan-fn", choices=["simple", "real"], default="simple")
    ap.add_argument("--models", type=Path, help="real mode: folder of model units to upload copies of")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--settle", type=float, default=0.3)
    ap.add_argument("--scan-delay", type=float, default=0.01, help="simple mode: seconds per scan")
    ap.add_argument("--kill-every", type=float, nargs=2, default=(0.5, 2.0), metavar=("MIN", "MAX"))
    ap.add_argument("--upload-pause", type=float, default=0.01)
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve is not None:
        return serve(args.serve, args.scan_fn, args.settle, args.workers)
    if args.scan_fn == "real" and (args.models is None or not args.models.is_dir()):
        ap.error("--scan-fn real needs --models DIR (e.g. the --quick zoo's models)")

    work = args.workdir or Path(tempfile.mkdtemp(prefix="scanner-soak-"))
    (work / "registry").mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    models = sorted(args.models.iterdir()) if args.models else None
    producer = Producer(work / "registry", rng, models)
    daemon = Daemon(work, args)
    daemon.start()
    stop_sampling = threading.Event()

    def sampler() -> None:
        while not stop_sampling.wait(0.2):
            daemon.sample()

    def killer() -> None:
        while not done_producing.is_set():
            if done_producing.wait(rng.uniform(*args.kill_every)):
                break
            daemon.kill()
            time.sleep(rng.uniform(0.0, 0.5))  # downtime: uploads keep coming; reconcile must catch them
            daemon.start()

    done_producing = threading.Event()
    threads = [threading.Thread(target=sampler, daemon=True), threading.Thread(target=killer, daemon=True)]
    for t in threads:
        t.start()
    t0 = time.time()
    for _ in range(args.uploads):
        producer.one()
        time.sleep(args.upload_pause)
    done_producing.set()
    threads[1].join()
    produce_s = time.time() - t0

    deadline = time.time() + 300
    while time.time() < deadline and not converged(work, producer.uploads):
        time.sleep(0.5)
    converge_s = time.time() - t0 - produce_s
    time.sleep(1.0)
    rss_before = daemon.rss_kb()
    for _ in range(args.flat_uploads):
        producer.one()
        time.sleep(args.upload_pause)
    deadline = time.time() + 300
    while time.time() < deadline and not converged(work, producer.uploads):
        time.sleep(0.5)
    time.sleep(1.0)
    rss_after = daemon.rss_kb()
    stop_sampling.set()
    exit_code = daemon.stop()
    result = check(work, producer, daemon)
    result |= {
        "scan_fn": args.scan_fn,
        "produce_s": round(produce_s, 1),
        "converge_s": round(converge_s, 1),
        "peak_rss_mib": round(daemon.peak_rss_kb / 1024, 1),
        "rss_before_flat_batch_mib": round(rss_before / 1024, 1),
        "rss_after_flat_batch_mib": round(rss_after / 1024, 1),
        "flat_batch_uploads": args.flat_uploads,
        "graceful_exit_code": exit_code,
        "workdir": str(work),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            print(f"{key:32s} {value}")
    bad = ("models_lost", "left_unscanned", "scanned_twice_recorded", "flagged_not_quarantined",
           "incomplete_quarantine_records", "temp_files_scanned", "wrong_verdicts")  # fmt: skip
    ok = all(result[k] == 0 for k in bad) and exit_code == 0
    if ok and not args.keep and args.workdir is None:
        shutil.rmtree(work)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
