"""How many plans the cost model prices per second, against one evaluated trial measured in the same run.

    python bench/cost_model.py            # default model (SmolLM2-135M), jetson profile

Prints a table and writes bench/results/cost_model.json. The ratio "plans screened per evaluated
trial" is what makes pre-screening worth it; absolute numbers move with machine load.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

from autocompress.calib import DataConfig
from autocompress.evaluate import Evaluator
from autocompress.hardware import CostModel, load_profile
from autocompress.plan import BlockChoice, LayerChoice, ModelRef, Plan
from autocompress.workbench import Workbench


def main(model: str | None = None) -> dict:
    wb = Workbench.open(model, DataConfig())
    a = wb.lm.anatomy
    ref = ModelRef(a.name, a.model_hash, a.architecture, a.num_blocks)
    rng = random.Random(0)
    levels = [LayerChoice(bits=b, group_size=g) for b in (16, 8, 4, 3) for g in (None, 32, 128)]
    heads = [b.heads_per_kv * k for b in a.blocks[:1] for k in range(1, b.num_kv_heads + 1)]
    per_layer = [
        Plan(
            model=ref,
            layers={s.name: rng.choice(levels) for s in a.linears},
            blocks={i: BlockChoice(keep_heads=rng.choice(heads)) for i in range(0, a.num_blocks, 3)},
            drop_blocks=(rng.randrange(a.num_blocks),),
        )
        for _ in range(1000)
    ]
    uniform = [Plan(model=ref, default=c) for c in levels] * 100
    cm = CostModel(load_profile("jetson"), a)
    rows = {}
    for label, plans in (("per-layer plans", per_layer), ("uniform plans", uniform)):
        start = time.perf_counter()
        for p in plans:
            cm.predict(p)
        rows[label] = len(plans) / (time.perf_counter() - start)
    ev = Evaluator(wb.lm.model, wb.data, a.task)
    trial_plan = per_layer[0]
    start = time.perf_counter()
    ev.proxy(wb.apply(trial_plan))
    trial_s = time.perf_counter() - start
    result = {
        "model": a.name,
        "linears": len(a.linears),
        "plans_per_s": rows,
        "evaluated_trial_s": trial_s,
        "plans_priced_per_evaluated_trial": rows["per-layer plans"] * trial_s,
    }
    print(f"{'what':<36}{'value':>14}")
    for label, rate in rows.items():
        print(f"{'cost model, ' + label + ' /s':<36}{rate:>14,.0f}")
    print(f"{'one evaluated trial (apply + KL), s':<36}{trial_s:>14.2f}")
    print(f"{'plans priced per evaluated trial':<36}{result['plans_priced_per_evaluated_trial']:>14,.0f}")
    out = Path(__file__).parent / "results" / "cost_model.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
