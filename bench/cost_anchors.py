"""The anchor check: predict published decode throughput (hardware.md §1.3) from model configs alone.

    python bench/cost_anchors.py

Every anchor lives in its profile (``anchors:`` in ``hw_profiles/*.yaml``) with its role: ``fit``
anchors set that profile's efficiency/overhead fields, ``holdout`` anchors were not used for any
fit. Prints predicted vs published tokens/s and the ratio; writes bench/results/cost_anchors.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from autocompress.hardware import list_profiles
from autocompress.hardware.anchors import check_anchors

RESULTS = Path(__file__).parent / "results" / "cost_anchors.json"


def main() -> dict:
    results = check_anchors([p for p in list_profiles() if not p.calibrated])
    rows = [
        {
            "profile": r.profile,
            "model": r.anchor.model,
            "weights": r.anchor.weights,
            "runtime": r.anchor.runtime,
            "role": r.anchor.role,
            "published_tok_s": r.anchor.decode_tok_s,
            "predicted_tok_s": round(r.predicted_tok_s, 2),
            "ratio": round(r.ratio, 3),
            "source": r.anchor.source,
        }
        for r in results
    ]
    print("| profile | model | weights | role | published tok/s | predicted tok/s | predicted/published |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['profile']} | {r['model']} | {r['weights']} | {r['role']} | {r['published_tok_s']:g} "
            f"| {r['predicted_tok_s']:.1f} | {r['ratio']:.2f} |"
        )
    summary = {}
    for role in ("fit", "holdout"):
        err = np.array([abs(r["ratio"] - 1) for r in rows if r["role"] == role])
        summary[role] = {"n": int(err.size), "mape": float(err.mean()), "within_20pct": float(np.mean(err <= 0.2))}
        print(f"{role}: {err.size} anchors, MAPE {err.mean():.1%}, within ±20 %: {np.mean(err <= 0.2):.0%}")
    out = {"anchors": rows, "summary": summary}
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
