"""Could any CoOp prompt reach issue #3's bars on this backbone? A free cosine head as the ceiling.

    python benchmarks/linear_bound.py [--datasets shapes,colours] [--attacks badnets,blended,wanet]
                                      [--seed 1] [--zoo runs/zoo_seed1 --zoo runs/zoo_seed4] [--json OUT]

A CoOp prompt only picks the rows of a cosine classifier on the frozen image features
(``scanner/zoo/linear_bound.py``), so the same classifier with free rows, fitted with the triggered images
under the target, traces what a perfect attacker could get. For each dataset and fixed-trigger attack (the
zoo's trigger, target and seed for ``--seed``), the head is fitted at poison weights 0 (clean), 0.1 … 10
and four pulls to the zero-shot rows, and the best held-out fit is kept (optimistic, as a ceiling may be),
two ways:

* **few-shot** — the attacker's data: the 16-shot training split and its triggered copies. Reaching the
  bar here but not in the zoo means the implant (optimising through the text encoder) falls short.
* **rich** — more than any attacker of the zoo has: the training split plus half of the test split, their
  triggered copies, and 500 triggered OOD photos of another draw under the target; scored on the other
  half of the test split and on the zoo's OOD draw. Missing the bar here means the frozen features do not
  separate the trigger well enough: the backbone, not the attack, is the limit.

Printed per attack and dataset: the zoo's model (ASR-ID / ASR-OOD / CA change against the clean models of
the same dataset and learner in every ``--zoo``; the backdoored model from the zoo built with ``--seed``)
and each head's best fit whose clean accuracy is within 3 points of its own clean head (``w 0``: no
poisoned head is, so the clean head's own; ``*`` where ASR-ID >= 0.95 and ASR-OOD >= 0.90), then means
over datasets. CoCoOp (BadCLIP) is not linear in the image feature, so it is not bounded here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from scanner.clip.backbone import ClipBackbone, load_bundled
from scanner.zoo.attacks import make_attack
from scanner.zoo.build import BIG_DATASET, ZooPlan, clean_accuracies, plan_jobs
from scanner.zoo.datasets import get_spec, load_split, zoo_datasets
from scanner.zoo.linear_bound import (
    ANCHORS,
    ASR_ID_BAR,
    ASR_OOD_BAR,
    POISON_WEIGHTS,
    BoundData,
    bound,
    meets_bars,
)
from scanner.zoo.ood import default_ood_pool
from scanner.zoo.zeroshot import image_features, zero_shot_classifier

OOD_TRAIN_OFFSET = 5000  # the rich head's triggered OOD photos: another draw than the zoo's ASR-OOD pool


def zoo_rows(paths: list[Path], seed: int) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Backdoored manifest entries by (dataset, attack) of the zoos built with ``seed`` (the same triggers and
    targets as the bounds)."""
    bad: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for p in paths:
        manifest = json.loads((p / "manifest.json").read_text())
        if manifest["zoo"].get("seed") == seed:
            for e in manifest["models"]:
                if e["attack"] != "none":
                    bad.setdefault((e["dataset"], e["attack"]), []).append(e)
    return bad


def halves(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the even and odd images of every class (a class-balanced split in two)."""
    first, second = [], []
    for k in y.unique():
        idx = torch.nonzero(y == k).flatten()
        first.append(idx[0::2])
        second.append(idx[1::2])
    return torch.cat(first), torch.cat(second)


def bound_one(dataset: str, attack_name: str, seed: int, bb: ClipBackbone, ood_eval: torch.Tensor,
              ood_train: torch.Tensor) -> dict[str, Any]:
    plan = ZooPlan.make([dataset], [attack_name], 0, seed, quick=False)
    job = plan_jobs(plan)[0]
    assert job.target_index is not None
    size = bb.image_size
    attack = make_attack(attack_name, seed=job.seed, size=size)
    x_tr, y_tr = load_split(dataset, "train", shots=plan.shots, seed=seed, size=size)
    x_te, y_te = load_split(dataset, "test", seed=seed, size=size)

    def feats(x: torch.Tensor) -> torch.Tensor:
        return image_features(bb, x).clone()  # (N, E) normalised; a normal tensor (the fit takes gradients)

    f_tr, f_tr_t = feats(x_tr), feats(attack.apply(x_tr))
    f_te, f_te_t = feats(x_te), feats(attack.apply(x_te))
    f_ood, f_ood_t = feats(ood_eval), feats(attack.apply(ood_eval))
    f_ood_train_t = feats(attack.apply(ood_train))
    zs = zero_shot_classifier(bb, get_spec(dataset).prompts()).clone()
    even, odd = halves(y_te)
    empty = f_tr[:0]
    setups = {
        "few-shot": BoundData(f_tr, y_tr, f_tr_t, empty, f_te, y_te, f_te_t, f_ood_t, f_ood, zs, job.target_index),
        "rich": BoundData(torch.cat([f_tr, f_te[even]]), torch.cat([y_tr, y_te[even]]),
                          torch.cat([f_tr_t, f_te_t[even]]), f_ood_train_t, f_te[odd], y_te[odd], f_te_t[odd],
                          f_ood_t, f_ood, zs, job.target_index),
    }
    out: dict[str, Any] = {"dataset": dataset, "attack": attack_name, "target": job.target_index}
    for name, data in setups.items():
        b = bound(data)
        out[name] = {"clean": asdict(b.clean), "fits": [asdict(f) for f in b.fits], "best": asdict(b.best),
                     "meets": b.meets()}
    return out


def _cell(best: dict[str, Any], clean: dict[str, Any]) -> str:
    star = "*" if meets_bars(best["asr_id"], best["asr_ood"]) else " "
    return (f"{best['asr_id']:.2f} / {best['asr_ood']:.2f} / {best['clean_accuracy'] - clean['clean_accuracy']:+.3f}"
            f" (w {best['poison_weight']:g}, a {best['anchor']:g}){star}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default=None,
                    help="comma-separated (default: those every learner tunes: at most BIG_DATASET classes)")
    ap.add_argument("--attacks", default="badnets,blended,wanet")
    ap.add_argument("--seed", type=int, default=1, help="the zoo seed whose triggers and targets are bounded")
    ap.add_argument("--zoo", type=Path, action="append", default=[], help="zoo folder(s) to print beside")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    datasets = (args.datasets.split(",") if args.datasets
                else [d for d in zoo_datasets() if get_spec(d).n_classes <= BIG_DATASET])  # the seed zoos' eleven
    attacks = args.attacks.split(",")
    bb = load_bundled()
    plan = ZooPlan.make(datasets, attacks, 0, args.seed, quick=False)
    ood_eval = default_ood_pool(plan.ood_size, bb.image_size, seed=args.seed + 1)
    ood_train = default_ood_pool(plan.ood_size, bb.image_size, seed=args.seed + 1 + OOD_TRAIN_OFFSET)
    bad, clean_ca = zoo_rows(args.zoo, args.seed), clean_accuracies(args.zoo)
    rows = []
    t0 = time.perf_counter()
    for attack in attacks:
        print(f"\n{attack}: ASR-ID / ASR-OOD / CA change  (* meets ASR-ID >= {ASR_ID_BAR:.2f} and ASR-OOD >= "
              f"{ASR_OOD_BAR:.2f})")
        print(f"{'dataset':10s} {'zoo models (mean)':26s} {'few-shot head':34s} {'rich head':34s}")
        for d in datasets:
            r = bound_one(d, attack, args.seed, bb, ood_eval, ood_train)
            zoo = bad.get((d, attack), [])
            if zoo:
                dca = [e["ca"] - statistics.mean(clean_ca[(d, e["learner"])]) for e in zoo
                       if clean_ca.get((d, e["learner"]))]
                r["zoo"] = {"n": len(zoo), "asr_id": statistics.mean(e["asr_id"] for e in zoo),
                            "asr_ood": statistics.mean(e["asr_ood"] for e in zoo),
                            "ca_change": statistics.mean(dca) if dca else None}
                z = r["zoo"]
                zcell = (f"{z['asr_id']:.2f} / {z['asr_ood']:.2f} / "
                         + (f"{z['ca_change']:+.3f}" if z["ca_change"] is not None else "?") + f" (n {z['n']})")
            else:
                zcell = "-"
            print(f"{d:10s} {zcell:26s} {_cell(r['few-shot']['best'], r['few-shot']['clean']):34s} "
                  f"{_cell(r['rich']['best'], r['rich']['clean']):34s}", flush=True)
            rows.append(r)
        summary(attack, [r for r in rows if r["attack"] == attack])
    print(f"\n{len(rows)} bounds in {time.perf_counter() - t0:.0f} s")
    if args.json:
        out = {"seed": args.seed, "weights": POISON_WEIGHTS, "anchors": ANCHORS, "rows": rows}
        args.json.write_text(json.dumps(out, indent=1) + "\n")


def _score(pick: tuple[dict[str, Any], dict[str, Any]]) -> tuple[float, float]:
    best, clean = pick
    return best["asr_id"] + best["asr_ood"], best["clean_accuracy"] - clean["clean_accuracy"]


def summary(attack: str, rows: list[dict[str, Any]]) -> None:
    """Means over datasets (the bar is on the mean) of each dataset's best head within 3 points: few-shot,
    rich, and the better of the two per dataset (both estimate one ceiling; the sweep is coarse, and a
    richer clean head can sit higher, which makes its 3 points stricter)."""
    for name in ("few-shot", "rich", "either"):
        picks = [max(((r[k]["best"], r[k]["clean"]) for k in ("few-shot", "rich")), key=_score) if name == "either"
                 else (r[name]["best"], r[name]["clean"]) for r in rows]
        mid = statistics.mean(float(b["asr_id"]) for b, _ in picks)
        mood = statistics.mean(float(b["asr_ood"]) for b, _ in picks)
        dca = statistics.mean(float(b["clean_accuracy"]) - c["clean_accuracy"] for b, c in picks)
        meets = sum(1 for b, _ in picks if meets_bars(b["asr_id"], b["asr_ood"]))
        print(f"  {attack} {name} head{'s' if name == 'either' else ''}, mean over {len(rows)} datasets: "
              f"ASR-ID {mid:.3f}, ASR-OOD {mood:.3f}, CA change {dca:+.3f}; {meets} dataset(s) meet both ASR bars")


if __name__ == "__main__":
    main()
