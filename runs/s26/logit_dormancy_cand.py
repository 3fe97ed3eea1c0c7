"""Logit dormancy at the drift candidate (top drift anomaly for CoOp, top reach anomaly for CoCoOp): the suspect's
median clean margin for it less the twin's. Not shipped."""
import json
import sys

from sklearn.metrics import roc_auc_score

rows = [r for r in json.load(open(sys.argv[1]))["rows"] if r["detector"] == "ci"]
out = []
for r in rows:
    ev = r["evidence"]
    key = "drift_anomaly" if "drift_anomaly" in ev[0] else "reach_anomaly"
    k = max(range(len(ev)), key=lambda i: ev[i].get(key, 0.0))
    v = ev[k]["natural_margin"] - ev[k]["twin_margin"]
    out.append((r["attack"], r["learner"], r["id"], v, k, r["truth_target"], r["flagged"], r["target"],
                ev[k].get(key, 0.0), ev[k]["natural_share"], ev[k]["zero_shot_share"]))
for t in sorted(out, key=lambda t: (t[0], -t[3])):
    print(f"{t[0]:8s} {t[1]:10s} {t[2]:22s} dorm {t[3]:6.2f} at {t[4]:2d} (truth {t[5]}) anomaly {t[8]:5.2f} "
          f"nat {t[9]:.2f} zs {t[10]:.2f} flagged {t[6]} as {t[7]}")
clean = [t[3] for t in out if t[0] == "none"]
print("clean max", max(clean))
for attack in sorted({t[0] for t in out} - {"none"}):
    pos = [t[3] for t in out if t[0] == attack]
    print(attack, "AUROC", round(roc_auc_score([0] * len(clean) + [1] * len(pos), clean + pos), 3),
          "above clean max", sum(v > max(clean) for v in pos), "of", len(pos),
          "new (unflagged, above, right target)",
          sum(1 for t in out if t[0] == attack and not t[6] and t[3] > max(clean) and t[4] == t[5]))
