"""Distillation recovery on the default model: perplexity before and after, and the share of the gap closed.

    AUTOCOMPRESS_THREADS=2 python bench/recovery.py     # prints the table, writes bench/results/recovery.json

Four front-like plans (25 % MLP width cut in every block, 2 dropped blocks, rank 0.5·r* on every
MLP linear with SVD-LLM, 3-bit g128 asymmetric GPTQ), each one-shot compressed and then recovered
with ``autocompress.recover`` (logit KL at T = 1, AdamW, lr 1e-4 constant after 10 warm-up steps,
batches of 4 × 256 calibration tokens, seed 0) for the largest budget in ``--minutes`` of training
time. The learning-rate schedule does not depend on the budget, so the smaller budgets are
snapshots of the same run at the first step past that much training time (evaluation time is not
counted): the same weights a separate run with that step count gives. Perplexity is on the default
held-out evaluation split; gap closed = (ppl_before − ppl_after) / (ppl_before − ppl_base).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("AUTOCOMPRESS_THREADS", "2")

from autocompress._io import atomic_write_text
from autocompress.evaluate import Evaluator
from autocompress.plan import BlockChoice, LayerChoice, ModelRef, Plan
from autocompress.recover import RecoverySettings, StepInfo, recover
from autocompress.workbench import Workbench

OUT = Path(__file__).parent / "results" / "recovery.json"


def plans(wb: Workbench) -> dict[str, Plan]:
    """Give the four front-like plans by name."""
    a = wb.lm.anatomy
    ref, prov = ModelRef.of(a), wb.provenance()
    width = a.blocks[0].mlp_dim * 3 // 4 // 8 * 8
    mlp = [s.name for s in a.linears if s.role in ("gate", "up", "down", "fc1", "fc2")]
    return {
        "mlp-width-75%": Plan(
            model=ref, blocks={b.index: BlockChoice(keep_mlp_channels=width) for b in a.blocks}, provenance=prov
        ),
        "drop-2-blocks": Plan(model=ref, drop_blocks=tuple(sorted(wb.stats.drop_order()[:2])), provenance=prov),
        "rank-0.5-mlp": Plan(
            model=ref,
            layers=dict.fromkeys(mlp, LayerChoice(rank_ratio=0.5, lowrank_method="svd-llm")),
            provenance=prov,
        ),
        "gptq-3bit-g128": Plan(
            model=ref,
            default=LayerChoice(bits=3, group_size=128, symmetric=False, quant_method="gptq"),
            provenance=prov,
        ),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, nargs="+", default=[2.0, 10.0], help="training-time budgets")
    ap.add_argument("--plans", nargs="*", help="subset of plan names")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument(
        "--keep-others", action="store_true", help="keep the rows of plans not run now from the existing --out file"
    )
    args = ap.parse_args()
    budgets = sorted(args.minutes)
    wb = Workbench.open(log=print)
    ev = Evaluator(wb.lm.model, wb.data, wb.lm.anatomy.task)
    ppl_base = ev.base_full().ppl
    settings = RecoverySettings(minutes=budgets[-1])
    rows = []
    for name, plan in plans(wb).items():
        if args.plans and name not in args.plans:
            continue
        model = wb.apply(plan)
        ppl_before = ev.full(model).ppl
        print(f"{name}: ppl {ppl_before:.4g} before recovery (base {ppl_base:.4g})", flush=True)
        pending = list(budgets[:-1])
        t0 = time.time()

        def on_step(info: StepInfo, student, name=name, ppl_before=ppl_before, pending=pending, t0=t0) -> None:
            if info.step % 10 == 0:
                print(f"  step {info.step}: KL {info.loss:.4f}, {info.elapsed_s:.0f} s training", flush=True)
            if pending and info.elapsed_s >= pending[0] * 60:
                rows.append(_row(name, pending.pop(0), info.step, ppl_before, ev.full(student).ppl, ppl_base))

        recovered = recover(wb, plan, model, settings, on_step)
        rows.append(_row(name, budgets[-1], recovered.recovery.steps, ppl_before, ev.full(model).ppl, ppl_base))
        print(f"  done in {time.time() - t0:.0f} s wall", flush=True)
    if args.keep_others and args.out.is_file():
        ran = {r["plan"] for r in rows}
        kept = [r for r in json.loads(args.out.read_text())["rows"] if r["plan"] not in ran]
        order = list(plans(wb))
        rows = sorted(kept + rows, key=lambda r: (order.index(r["plan"]), r["minutes"]))
    header = f"{'plan':<16} {'minutes':>7} {'steps':>6} {'ppl before':>11} {'ppl after':>10} {'ppl base':>9} {'gap closed':>10}"
    print(header)
    for r in rows:
        print(
            f"{r['plan']:<16} {r['minutes']:>7g} {r['steps']:>6} {r['ppl_before']:>11.4g} {r['ppl_after']:>10.4g} "
            f"{r['ppl_base']:>9.4g} {r['gap_closed']:>10.1%}"
        )
    payload = {
        "rows": rows,
        "settings": {
            "batch_size": settings.batch_size,
            "seq_len": wb.data_config.seq_len,
            "lr": settings.lr,
            "warmup_steps": settings.warmup_steps,
            "temperature": settings.temperature,
            "hidden_weight": settings.hidden_weight,
            "pool_tokens": settings.pool_tokens,
            "seed": settings.seed,
            "threads": int(os.environ["AUTOCOMPRESS_THREADS"]),
        },
        "note": (
            f"budgets below {budgets[-1]:g} min are snapshots of the {budgets[-1]:g}-minute run at the first step past "
            "that much training time; the learning rate is constant after warm-up, so they are the weights a separate "
            "run with that many steps gives"
        ),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")


def _row(plan: str, minutes: float, steps: int, before: float, after: float, base: float) -> dict:
    gap = before - base
    return {
        "plan": plan,
        "minutes": minutes,
        "steps": steps,
        "ppl_before": before,
        "ppl_after": after,
        "ppl_base": base,
        "gap_closed": (before - after) / gap if gap > 0 else float("nan"),
    }


if __name__ == "__main__":
    main()
