"""Join a run that searched other trigger families into a saved evaluation: the evidence of a new family
for every model, without re-running the families already searched.

``scanner zoo eval ZOO --detectors ci --families blend --json probe.json`` confirms the same drift-ranked
classes as any CI run (the ranking needs no search) with the new family alone. ``add_family_run`` copies
each confirmed class's ``<key>_<family>`` evidence from the probe into the saved run's rows and re-scores
them with the engine's ``class_score``, so that the pair reads as one run of all the families. The saved
families' evidence is exactly what a run of all of them would record (the engine searches the families in
order with one generator, and the new ones come last); the new family's is an independent draw of the same
search (its initial trigger and batches come from the generator at another point).
"""

from __future__ import annotations

from typing import Any

from scanner.errors import ConfigError
from scanner.zoo.detect_eval import DECISION_FIELDS, decided_as_run, first_candidates, rescore_ci, rows_of

# settings that may differ between a saved run and its probe: what was searched, and how it was decided
_JOINABLE = ("families", "candidates", *DECISION_FIELDS)


def _search_settings(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in _JOINABLE}


def add_family_run(saved: dict[str, Any], probe: dict[str, Any]) -> dict[str, Any]:
    """``saved`` (a ``zoo eval --json`` document) with the CI evidence of ``probe``'s families added.

    Both must come from the same zoo, OOD pool and search settings (bar families and candidates); the
    probe may confirm fewer classes than the saved run, which is then cut to as many
    (``first_candidates``). Models the probe has not reached yet are left out. Each joined row is
    re-scored over all its families and re-decided at its own lines.
    """
    scfg, pcfg = saved.get("config") or {}, probe.get("config") or {}
    if saved.get("zoo") != probe.get("zoo") or saved.get("ood_sha256") != probe.get("ood_sha256"):
        raise ConfigError("the probe evaluated another zoo or OOD pool than the saved run; run the probe on the "
                          "same zoo with the same --seed and --n-images")
    if _search_settings(scfg) != _search_settings(pcfg):
        raise ConfigError("the probe searched with other settings than the saved run (beyond families and "
                          "candidates); run it with the saved run's settings")
    new = [f for f in pcfg.get("families", []) if f not in scfg.get("families", [])]
    if not new:
        raise ConfigError(f"the probe searched no family the saved run lacks (saved: {scfg.get('families')}, "
                          f"probe: {pcfg.get('families')})")
    c = int(pcfg["candidates"])
    if c > int(scfg["candidates"]):
        raise ConfigError(f"the probe confirmed {c} classes per model, the saved run only {scfg['candidates']}; "
                          "probe with --candidates at most the saved run's")
    bonus = float(scfg.get("family_bonus", 0.0))
    probed = {r["id"]: r for r in probe["rows"] if r["detector"] == "ci"}
    rows = []
    for row in rows_of(saved):
        if row["detector"] != "ci" or row["id"] not in probed:
            continue
        cut, extra = first_candidates(row, c), probed[row["id"]]["evidence"]
        evidence = []
        for k, (e, p) in enumerate(zip(cut["evidence"], extra, strict=True)):
            if bool(e.get("candidate")) != bool(p.get("candidate")):
                raise ConfigError(f"{row['id']}: the probe confirmed other classes than the saved run (class {k})")
            if e.get("candidate"):
                e = {**e, **{key: v for key, v in p.items() if key.endswith(tuple(f"_{f}" for f in new))}}
            evidence.append(e)
        joined = rescore_ci({**cut, "evidence": evidence}, bonus, str(scfg.get("trigger_score", "share")))
        rows.append(decided_as_run(joined))
    config = {**scfg, "families": [*scfg["families"], *new], "candidates": c}
    return {**saved, "config": config, "rows": rows}
