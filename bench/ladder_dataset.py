"""Write the stored set of evaluated plans that tests/evaluate/test_ladder.py replays the gate on.

    python bench/ladder_dataset.py [--trials 120] [--out tests/evaluate/data/ladder_plans.json]

Runs a search on tiny-llama with the gate switched off, so every proposal is measured in full:
for each trial its rung-0 estimate (the sensitivity table's sum), the KL of the first proxy
sequence, the full proxy KL and its predicted latency and memory. Replaying the gate on these
says, for each plan it would have stopped, whether that plan was on the front after all.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import optuna
from optuna.trial import TrialState

from autocompress.calib import DataConfig
from autocompress.search import engine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=120)
    ap.add_argument("--out", default="tests/evaluate/data/ladder_plans.json")
    args = ap.parse_args()
    post_init = engine.TrialRunner.__post_init__

    def ungated(self) -> None:
        post_init(self)
        self.gate.enabled = False  # measure every proposal: the replay decides what the gate would have stopped

    engine.TrialRunner.__post_init__ = ungated
    data = DataConfig(seq_len=64, calib_tokens=512, proxy_tokens=256, eval_tokens=256)
    with tempfile.TemporaryDirectory() as tmp:
        engine.search(model="tiny-llama", hw="jetson", trials=args.trials, study="l", out=tmp, data=data, full_eval=0)
        study = optuna.load_study(study_name="l", storage=f"sqlite:///{Path(tmp) / 'l' / 'study.db'}")
        rows = [
            {
                "trial": t.number,
                "seeded": bool({"baseline", "seed"} & set(t.user_attrs)),
                "rung0": t.user_attrs.get("rung0_kl"),
                "partial": t.user_attrs.get("rung1_partial_kl"),
                "kl": t.values[0],
                "latency_ms": t.values[1],
                "memory_mb": t.values[2],
            }
            for t in study.get_trials(states=(TrialState.COMPLETE,))
        ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": "tiny-llama", "hw": "jetson", "space": "default", "data": vars(data), "trials": args.trials}
    Path(args.out).write_text(
        json.dumps({"made_by": "bench/ladder_dataset.py", **meta, "plans": rows}, indent=1) + "\n"
    )
    print(f"{len(rows)} plans -> {args.out}")


if __name__ == "__main__":
    main()
