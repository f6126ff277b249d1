"""Validate the cost model against real latency on this machine, and measure its speed.

    flock /tmp/autocompress-cpu.lock python bench/cost_model.py [--plans 30] [--profile cpu]
    python bench/cost_model.py --reuse-measurements   # re-price the measured plans after re-calibrating

1. 30 random plans from ``search_spaces/default.yaml`` (Optuna RandomSampler, seed 0) on a reduced
   copy of the default model (its first 6 blocks, weights copied), each applied, exported to ONNX
   with the matching onnxruntime quantization (``autocompress.export.onnx``) and measured with
   onnxruntime CPU on a fixed thread count: one-token decode (no KV cache) and a 64-token prefill.
   Measurements are interleaved over rounds and the lowest median per plan is kept (shared machine).
2. The same plans priced by the calibrated local profile and by the uncalibrated x86 prior:
   % within ±10 %, MAPE and Spearman ρ of predicted vs measured decode latency (prefill too).
3. Cost-model throughput: per-layer and uniform plans per second on the full default model.

Writes bench/results/cost_model.json (fractions in [0, 1]).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import optuna
import torch
from scipy.stats import spearmanr

from autocompress.calib import DataConfig, activation_stats, load_token_data
from autocompress.compress.apply import apply_plan_to
from autocompress.export.onnx import export_onnx
from autocompress.hardware import CostModel, load_profile
from autocompress.hardware.measure import measure, ort_session
from autocompress.model import load_model
from autocompress.model.inspect import anatomy_of
from autocompress.model.loading import state_dict_hash
from autocompress.plan import BlockChoice, LayerChoice, ModelRef, Plan, Provenance
from autocompress.space import SearchSpace, SpaceContext

PROMPT = 64
RESULTS = Path(__file__).parent / "results" / "cost_model.json"


def reduced_default(blocks: int):
    """Give (model, anatomy, tokenizer): the default model cut to its first ``blocks`` blocks."""
    from transformers import AutoModelForCausalLM

    lm = load_model()
    cfg = lm.model.config.__class__.from_dict({**lm.model.config.to_dict(), "num_hidden_layers": blocks})
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, _ = model.load_state_dict(lm.model.state_dict(), strict=False)
    assert not missing, missing
    model.eval()
    anatomy = anatomy_of(model, name=f"smollm2-135m-{blocks}blocks", model_hash=state_dict_hash(model))
    return model, anatomy, lm.tokenizer


def random_plans(anatomy, n: int, seed: int) -> list[Plan]:
    space = SearchSpace.load("default")
    mid = anatomy.num_blocks // 2
    order = sorted(range(1, anatomy.num_blocks), key=lambda i: abs(i - mid))  # middle blocks first, never block 0
    ctx = SpaceContext(anatomy=anatomy, drop_order=order, provenance=Provenance(seed=seed, space=space.name))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    plans = []
    for _ in range(n):
        trial = study.ask()
        plans.append(_plain_methods(space.suggest(trial, ctx)))
        study.tell(trial, 0.0)
    return plans


def _plain_methods(plan: Plan) -> Plan:
    """Give the plan with RTN rounding and plain SVD factors: the same shapes and formats, so the same
    ONNX graph and latency, without needing calibration Hessians (GPTQ / SVD-LLM) to build it."""
    fast = {"quant_method": "rtn", "lowrank_method": "svd"}
    fields = {f for f in fast if hasattr(plan.default, f)}
    if not fields:
        return plan
    swap = {f: fast[f] for f in fields}
    layers = {k: replace(c, **swap) for k, c in plan.layers.items()}
    return replace(plan, default=replace(plan.default, **swap), layers=layers)


def scores(pred: list[float], meas: list[float]) -> dict[str, float]:
    p, m = np.array(pred), np.array(meas)
    err = np.abs(p / m - 1.0)
    return {
        "within_10pct": float(np.mean(err <= 0.10)),
        "mape": float(np.mean(err)),
        "spearman": float(spearmanr(p, m).statistic),
        "median_ratio": float(np.median(p / m)),
    }


def throughput() -> dict[str, float]:
    a = load_model().anatomy
    ref = ModelRef.of(a)
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
        for _ in range(2000)
    ]
    uniform = [Plan(model=ref, default=c) for c in levels] * 200
    cm = CostModel(load_profile("jetson"), a)
    rates = {}
    for label, plans in (("per_layer", per_layer), ("uniform", uniform)):
        for p in plans[:50]:
            cm.predict(p)  # warm the per-layer caches, as a running search has them
        best = 0.0
        for _ in range(3):
            start = time.perf_counter()
            for p in plans:
                cm.predict(p)
            best = max(best, len(plans) / (time.perf_counter() - start))
        rates[label] = best
    return rates


def measure_plans(model, anatomy, plans: list[Plan], stats, threads: int, rounds: int):
    """Export every plan to ONNX (matching quantization) and measure it; give (export s, measure s, rows)."""
    t0 = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="autocompress-bench-") as tmp:
        for i, plan in enumerate(plans):
            compressed = apply_plan_to(model, anatomy, plan, stats)
            exp = export_onnx(compressed, anatomy, plan, Path(tmp) / f"plan{i}.onnx")
            row = {"plan": i, "plan_hash": plan.hash(), "path": exp.path, "size_mb": exp.size_mb}
            rows.append({**row, "not_represented": exp.not_represented})
            print(f"exported plan {i:2d}: {exp.size_mb:6.1f} MB  {'; '.join(exp.not_represented)[:90]}", flush=True)
        export_s = time.perf_counter() - t0
        for r in range(rounds):  # interleaved rounds: contention hits every plan alike
            for row in rows:
                sess = ort_session(row["path"], threads)
                dec = measure(sess, seq_len=1, threads=threads, warmup=5, repeats=15, min_time_s=0.3)
                pre = measure(sess, seq_len=PROMPT, threads=threads, warmup=2, repeats=7)
                row["decode_ms"] = min(row.get("decode_ms", 1e9), dec.median_ms)
                row["prefill_ms"] = min(row.get("prefill_ms", 1e9), pre.median_ms)
            print(f"measurement round {r + 1}/{rounds} done", flush=True)
    measure_s = time.perf_counter() - t0 - export_s
    return export_s, measure_s, rows


def main() -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--plans", type=int, default=30)
    ap.add_argument("--blocks", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", default="cpu", help="calibrated profile (default: `cpu` -> hw_profiles/local.yaml)")
    ap.add_argument("--baseline", default="x86-avx2-laptop")
    ap.add_argument(
        "--reuse-measurements",
        action="store_true",
        help="re-price the plans against the measurements already in bench/results/cost_model.json (after a re-calibration)",
    )
    args = ap.parse_args()
    local, prior = load_profile(args.profile), load_profile(args.baseline)
    if not local.calibrated:
        sys.exit(
            f"profile {local.id!r} is not calibrated: run `autocompress hw calibrate --out hw_profiles/local.yaml`"
        )
    threads = local.calibration.threads
    torch.manual_seed(0)
    model, anatomy, tok = reduced_default(args.blocks)
    stats = activation_stats(model, anatomy, load_token_data(tok, DataConfig(calib_tokens=1024)))
    plans = random_plans(anatomy, args.plans, args.seed)
    if args.reuse_measurements:
        before = json.loads(RESULTS.read_text())
        keep = ("plan", "size_mb", "not_represented", "decode_ms", "prefill_ms", "plan_hash")
        rows = [{k: r[k] for k in keep if k in r} for r in before["plans"]]
        hashes = [r.get("plan_hash") for r in rows]
        if len(rows) != len(plans) or (all(hashes) and hashes != [p.hash() for p in plans]):
            sys.exit("the stored measurements are for other plans: measure again (drop --reuse-measurements)")
        for r, p in zip(rows, plans, strict=True):
            r["plan_hash"] = p.hash()
        export_s, measure_s = before["export_s"], before["measure_s"]
    else:
        export_s, measure_s, rows = measure_plans(model, anatomy, plans, stats, threads, args.rounds)
    out: dict = {"n_plans": len(plans)}
    detail = {}
    for label, prof in (("calibrated", local), ("uncalibrated", prior)):
        cm = CostModel(prof, anatomy, prompt_tokens=PROMPT, context_tokens=1)
        costs = [cm.predict(p) for p in plans]
        for row, c in zip(rows, costs, strict=True):
            row[f"pred_decode_ms_{label}"] = c.latency_ms
            row[f"pred_prefill_ms_{label}"] = c.prefill_ms
        dec = scores([c.latency_ms for c in costs], [r["decode_ms"] for r in rows])
        pre = scores([c.prefill_ms for c in costs], [r["prefill_ms"] for r in rows])
        out[f"within_10pct_{label}"] = dec["within_10pct"]
        out[f"mape_{label}"] = dec["mape"]
        out[f"spearman_{label}"] = dec["spearman"]
        detail[label] = {"profile": prof.id, "decode": dec, "prefill": pre}
    rates = throughput()
    out["plans_per_second"] = rates["per_layer"]
    out.update(
        {
            "uniform_plans_per_second": rates["uniform"],
            "metric": f"decode latency, 1 token, batch 1, onnxruntime CPU, {threads} thread(s)",
            "model": anatomy.name,
            "detail": detail,
            "export_s": export_s,
            "measure_s": measure_s,
            "plans": [
                {k: (str(v) if isinstance(v, Path) else v) for k, v in row.items() if k != "path"} for row in rows
            ],
        }
    )
    print()
    print(f"{len(plans)} random plans of the default space on {anatomy.name}, onnxruntime CPU, {threads} thread(s)")
    print(f"{'profile':<34}{'metric':<9}{'within ±10%':>12}{'MAPE':>8}{'Spearman':>10}{'pred/meas':>11}")
    for label, d in detail.items():
        for metric in ("decode", "prefill"):
            s = d[metric]
            name = f"{d['profile']} ({label})"
            print(
                f"{name:<34}{metric:<9}{s['within_10pct']:>12.0%}{s['mape']:>8.1%}"
                f"{s['spearman']:>10.3f}{s['median_ratio']:>11.2f}"
            )
    print(f"cost model: {rates['per_layer']:,.0f} per-layer plans/s, {rates['uniform']:,.0f} uniform plans/s")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
