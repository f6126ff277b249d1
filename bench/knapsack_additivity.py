"""Why the knapsack and a brute force over whole plans disagree on the default model's real units.

    python bench/knapsack_additivity.py [--units embedding.format b3.attn. b21.mlp.]
    # prints the tables, writes bench/results/knapsack_additivity.json

The knapsack (``search/seeding.py``) allocates per-unit options whose KL is the unit's table entries
and whose savings are what the unit saves *alone* (the cost model on the base plan with only that
unit changed); it leaves out options that save nothing or cost more than the base. A brute force over
whole plans (the space builds every combination of the units' levels, the cost model prices the whole
plan, the table sums its entries) can differ from it for three reasons, each measured here:

1. the DP itself (a bug): an independent brute force over the knapsack's own options, summing their
   KL and savings with plain Python, must give the same least KL at every target;
2. savings are not additive: the cost model's saving of a whole plan vs the sum of its units' savings;
3. the option set: levels the knapsack leaves out (negative saving) that the whole-plan brute force uses;
4. the table's reading of a whole plan: ``SensitivityTable.predict`` looks up each unit's level in the plan.
   Read off the unit's first linear (what ``plan_keys`` did before ``SearchSpace.unit_choice``), a K-quant
   MLP on this 576-wide model reads as the fallback gate/up hold (Q4_K as Q5_0, Q2_K and Q3_K as Q4_0):
   printed beside, as "first-linear reading".

Needs the default model's sensitivity table for the Jetson profile (cached by the first search or by
``tests/search/test_seeding.py``; ~10 min cold on 2 cores). With ``--table`` (that cached JSON file) the
model is not loaded: the anatomy comes from its config, and only the cost model and the table are read.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
from dataclasses import replace
from pathlib import Path

from autocompress._io import atomic_write_text
from autocompress.calib import DataConfig
from autocompress.evaluate.sensitivity import EMBEDDING_UNIT, SensitivityTable, choice_parts, table_key
from autocompress.hardware import CostModel, load_profile
from autocompress.model.loading import anatomy_from_config
from autocompress.plan import Provenance
from autocompress.search import seeding
from autocompress.search.table import sensitivity_table
from autocompress.space import EMBEDDING_PARAM, SearchSpace, SpaceContext
from autocompress.workbench import Workbench

OUT = Path(__file__).parent / "results" / "knapsack_additivity.json"


def first_linear_kl(table, plan, space, ctx):
    """Give a plan's table KL with each unit's level read off its first linear (the reading before
    ``SearchSpace.unit_choice``), for plans without structure."""
    total = 0.0
    for u in space.units(ctx.anatomy):
        total += sum(table.entries.get(table_key(u, p), math.inf) for p in choice_parts(plan.choice_for(u.linears[0])))
    emb = ctx.anatomy.embeddings[0].name
    return total + sum(
        table.entries.get(table_key(EMBEDDING_UNIT, p), math.inf) for p in choice_parts(plan.embedding_choice(emb))
    )


def unit_levels(space, ctx, key):
    """Give every parameter setting of one unit the space offers (the brute force's axis)."""
    if key == EMBEDDING_PARAM:
        return [{EMBEDDING_PARAM: lvl} for lvl in space.embedding_levels(ctx.anatomy)]
    unit = next(u for u in space.units(ctx.anatomy) if u.key == key)
    lv = {k: v for k, v in space.unit_levels(unit.group, unit.linears, ctx.anatomy).items() if len(v) > 1}
    return [{unit.param(k): v for k, v in zip(lv, combo, strict=True)} for combo in itertools.product(*lv.values())]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--units", nargs="+", default=[EMBEDDING_PARAM, "b3.attn.", "b21.mlp."])
    ap.add_argument("--targets", type=int, default=40)
    ap.add_argument("--table", type=Path, help="the cached table (JSON): read it, and the anatomy from the config")
    args = ap.parse_args()

    prof = load_profile("jetson")
    space = SearchSpace.load("default").for_profile(prof)
    if args.table is not None:
        anatomy = anatomy_from_config(None)
        ctx = SpaceContext(anatomy, list(range(anatomy.num_blocks)), Provenance())
        d = json.loads(args.table.read_text())
        table = SensitivityTable(entries={k: float(v) for k, v in d["entries"].items()}, tokens=int(d["tokens"]))
    else:
        wb = Workbench.open(None, DataConfig())
        wb.numerics = prof.numerics
        anatomy = wb.lm.anatomy
        ctx = SpaceContext(anatomy, wb.stats.drop_order(), wb.provenance(profile=prof.id, space=space.name))
        table = sensitivity_table(wb, space, ctx, None, lambda _m: None)
    cm = CostModel(prof, anatomy)

    all_units = seeding.unit_options(space, ctx, table, cm)
    units = [next(o for o in all_units if any(k.startswith(p) for x in o for k in x.params)) for p in args.units]
    base_params = space.uniform_params(ctx.anatomy, {})
    whole_base = cm.predict(space.plan_from_params(base_params, ctx))
    unit_base = cm.predict(replace(space.plan_from_params(base_params, ctx), layers={}, blocks={}, drop_blocks=()))

    # ---- 1. the DP against its own objective: least summed KL over the options, saving >= t ----------
    combos = list(itertools.product(*units))
    summed = [(sum(o.latency_saved_ms for o in c), sum(o.kl for o in c), tuple(o.label for o in c)) for c in combos]
    front = seeding.allocations(units)
    top = max(s for s, _, _ in summed)
    rng = random.Random(0)
    targets = rng.sample(sorted({s for s, _, _ in summed}), min(args.targets, len(summed)))
    targets += [rng.uniform(0, top) for _ in range(args.targets)]
    eps = 1e-9 * top
    dp_worst = 0.0
    for t in targets:
        a = seeding.pick(front, t)
        best = min((kl for s, kl, _ in summed if s >= t - eps), default=math.inf)
        dp_worst = max(dp_worst, abs((a.kl if a else math.inf) - best) if math.isfinite(best) else 0.0)

    # ---- 2. and 3. whole plans -----------------------------------------------------------------------
    option_of = [{json.dumps(o.params, sort_keys=True): o for o in opts} for opts in units]
    rows = []
    for parts in itertools.product(*(unit_levels(space, ctx, k) for k in args.units)):
        params = dict(base_params)
        for p in parts:
            params.update(p)
        plan = space.plan_from_params(params, ctx)
        kl = table.predict(plan, space, ctx)
        if not math.isfinite(kl):
            continue
        cost = cm.predict(plan)
        opts = [option_of[i].get(json.dumps(p, sort_keys=True)) for i, p in enumerate(parts)]
        rows.append(
            {
                "params": {k: v for p in parts for k, v in p.items()},
                "kl": kl,
                "first_linear_kl": first_linear_kl(table, plan, space, ctx),
                "whole_saving_ms": whole_base.latency_ms - cost.latency_ms,
                "summed_saving_ms": sum(o.latency_saved_ms for o in opts) if all(opts) else None,
                "summed_kl": sum(o.kl for o in opts) if all(opts) else None,
                "left_out": [args.units[i] for i, o in enumerate(opts) if o is None],
            }
        )
    inside = [r for r in rows if not r["left_out"]]
    gap = max(abs(r["whole_saving_ms"] - r["summed_saving_ms"]) for r in inside)
    kl_gap = max(abs(r["kl"] - r["summed_kl"]) for r in inside)
    first_gap = max(abs(r["first_linear_kl"] - r["summed_kl"]) for r in inside)

    def beaten(kl_key):
        out = []
        for t in targets:
            a = seeding.pick(front, t)
            ok = [r for r in rows if r["whole_saving_ms"] >= t - eps]
            if a is None or not ok:
                continue
            b = min(ok, key=lambda r: r[kl_key])
            if b[kl_key] < a.kl - 1e-12:
                out.append((t, a, b))
        return out

    first_linear = beaten("first_linear_kl")
    disagreements = []
    for t, a, b in beaten("kl"):
        disagreements.append(
            {
                "target_ms": t,
                "knapsack_kl": a.kl,
                "brute_kl": b["kl"],
                "brute_whole_saving_ms": b["whole_saving_ms"],
                "brute_summed_saving_ms": b["summed_saving_ms"],
                "brute_left_out": b["left_out"],
                "brute_params": b["params"],
            }
        )
    left_out_levels = {
        k: [json.dumps(p) for p in unit_levels(space, ctx, k) if json.dumps(p, sort_keys=True) not in option_of[i]]
        for i, k in enumerate(args.units)
    }
    result = {
        "units": args.units,
        "options_per_unit": [len(o) for o in units],
        "whole_plans": len(rows),
        "base_latency_ms": {"whole_plan_base": whole_base.latency_ms, "knapsack_base": unit_base.latency_ms},
        "dp_vs_own_brute_force_max_kl_diff": dp_worst,
        "max_abs_saving_gap_ms": gap,
        "max_abs_kl_gap": kl_gap,
        "first_linear_reading": {
            "max_abs_kl_gap": first_gap,
            "targets_beaten": len(first_linear),
            "worst": max(
                (
                    {"target_ms": t, "knapsack_kl": a.kl, "brute_kl": b["first_linear_kl"], "brute_params": b["params"]}
                    for t, a, b in first_linear
                ),
                key=lambda d: d["knapsack_kl"] - d["brute_kl"],
                default=None,
            ),
        },
        "max_saving_ms": top,
        "left_out_levels": left_out_levels,
        "targets": len(targets),
        "disagreements": disagreements,
    }
    print(f"units {args.units}: options {result['options_per_unit']}, {len(rows)} whole plans")
    print(f"base latency: whole-plan base {whole_base.latency_ms:.6f} ms, knapsack base {unit_base.latency_ms:.6f} ms")
    print(f"1. DP vs a brute force over its own options (summed KL and savings): max KL diff {dp_worst:.3g}")
    print(f"2. whole-plan saving vs summed unit savings: max |gap| {gap:.6f} ms (of {top:.4f} ms); KL gap {kl_gap:.3g}")
    print(
        f"   first-linear reading of whole plans: max |KL gap| {first_gap:.4f}; a whole plan beats the knapsack "
        f"at {len(first_linear)} of {len(targets)} targets"
    )
    for t, a, b in first_linear[:3]:
        print(
            f"     target {t:.4f} ms: knapsack KL {a.kl:.4f}, brute force {b['first_linear_kl']:.4f} with {b['params']}"
        )
    print("3. levels the knapsack leaves out (they save nothing or cost more than the base):")
    for k, v in left_out_levels.items():
        print(f"   {k}: {', '.join(v) if v else '-'}")
    print(f"targets where a whole plan beats the knapsack: {len(disagreements)} of {len(targets)}")
    print("| target ms | knapsack KL | brute KL | brute whole saving | brute summed saving | left out |")
    print("|---|---|---|---|---|---|")
    for d in disagreements[:12]:
        s = d["brute_summed_saving_ms"]
        print(
            f"| {d['target_ms']:.4f} | {d['knapsack_kl']:.4f} | {d['brute_kl']:.4f} | {d['brute_whole_saving_ms']:.4f} "
            f"| {'-' if s is None else f'{s:.4f}'} | {', '.join(d['brute_left_out']) or '-'} |"
        )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(OUT, json.dumps(result, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
