"""Validate the cost model against real latency on this machine, and measure its speed.

    flock ~/.cache/ac-cpu.lock python bench/cost_model.py --kv-cache --blocks 0 --jobs 2 --rounds 9   # true decode, full depth
    nice -n 19 python bench/cost_model.py --kv-cache --blocks 0 --export-only   # the exports alone, on a busy machine
    python bench/cost_model.py --reuse-measurements   # re-price the measured plans after re-calibrating
    flock ~/.cache/ac-cpu.lock python bench/cost_model.py --blocks 6 --out X.json   # the older 6-block, no-cache check

1. 30 random plans from ``search_spaces/default.yaml`` settled for the calibrated profile (its
   runtime's formats; no sparsity or low-rank level it has no kernel for), Optuna RandomSampler,
   seed 0, on the default model or a copy cut to its first ``--blocks`` blocks (0 = all of them),
   each applied, exported to ONNX with the matching onnxruntime quantization
   (``autocompress.export.onnx``; ``--jobs`` exports in forked processes) and measured with
   onnxruntime CPU on a fixed thread count. With ``--kv-cache``: the decoder with a KV cache
   (``model.onnx`` as ``autocompress export`` writes it), one decode step with ``--context`` tokens
   in the cache and the prefill of those tokens (``hardware.measure.measure_decode``), priced at that
   context. Without it: a one-token forward without a cache ("decode") and a 64-token forward
   (prefill), priced at context 1.
   Measurements are interleaved over rounds and the lowest median per plan is kept (shared machine).
   Every round also times the calibration's largest fp32 GEMV chain (151 MB, cold): this VM's memory
   bandwidth moves with its neighbours' load, and that probe against the same chain's time in the
   profile's calibration says by how much since the profile was written. The rounds are also
   compared with each other (``decode_round_agreement``): how well the measurement ranks the plans
   against itself, the ceiling a prediction's Spearman ρ can reach on this machine.
   Exports and each finished measurement are kept under ``~/.cache/autocompress-bench/cost_model/``
   (keyed by model, depth, graph and seed): a rerun resumes where a killed run stopped.
2. The same plans priced by the calibrated local profile, by that profile with its bandwidth scaled
   by the probe (``reprobed``: calibration time / this run's time), and by the uncalibrated x86
   prior: % within ±10 %, MAPE and Spearman ρ of predicted vs measured decode latency (prefill too).
3. Cost-model throughput: per-layer and uniform plans per second on the full default model.

Writes bench/results/cost_model.json (fractions in [0, 1]); bench/results/cost_model_6blocks_nocache.json
is the earlier 6-block check without a cache (plans drawn before formats were settled per runtime).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace
from pathlib import Path

import numpy as np
import optuna
import torch
from scipy.stats import spearmanr

from autocompress.calib import DataConfig, activation_stats, load_token_data
from autocompress.calibration.onnx import chain_model, time_cold
from autocompress.compress.apply import apply_plan_to
from autocompress.export.onnx import export_onnx
from autocompress.hardware import CostModel, HardwareProfile, load_profile, profiles_dir
from autocompress.hardware.machine import Flusher
from autocompress.hardware.measure import measure, measure_decode, ort_session
from autocompress.model import load_model
from autocompress.model.inspect import anatomy_of
from autocompress.model.loading import state_dict_hash
from autocompress.plan import BlockChoice, LayerChoice, ModelRef, Plan, Provenance
from autocompress.space import SearchSpace, SpaceContext

PROMPT = 64
RESULTS = Path(__file__).parent / "results" / "cost_model.json"
WORK = Path.home() / ".cache" / "autocompress-bench" / "cost_model"


def reduced_default(blocks: int, name: str = "default"):
    """Give (model, anatomy, tokenizer): the model ``name`` cut to its first ``blocks`` blocks (0: all)."""
    from transformers import AutoModelForCausalLM

    lm = load_model(name)
    if blocks <= 0 or blocks >= lm.anatomy.num_blocks:
        return lm.model.float().eval(), lm.anatomy, lm.tokenizer
    cfg = lm.model.config.__class__.from_dict({**lm.model.config.to_dict(), "num_hidden_layers": blocks})
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, _ = model.load_state_dict(lm.model.state_dict(), strict=False)
    assert not missing, missing
    model.eval()
    short = "smollm2-135m" if name == "default" else name
    anatomy = anatomy_of(model, name=f"{short}-{blocks}blocks", model_hash=state_dict_hash(model))
    return model, anatomy, lm.tokenizer


def random_plans(anatomy, n: int, seed: int, profile: HardwareProfile) -> list[Plan]:
    """Give ``n`` random plans of the default space as ``profile``'s runtime runs it (its formats, and
    no sparsity or low-rank level it has no kernel for): the space's ``runtime`` format level means
    nothing until settled, and an unsettled space draws only dense linears."""
    space = SearchSpace.load("default").for_profile(profile)
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


def round_agreement(rounds: list[list[float]]) -> dict[str, float] | None:
    """How far the measurement agrees with itself: the ceiling a prediction's rank correlation can
    reach. ``rounds``: each plan's time per interleaved round. Gives the median Spearman between two
    rounds, the Spearman between the best of the even rounds and the best of the odd ones (what a
    best-of-N figure is, on half the rounds each) and the median spread of a plan's rounds."""
    n = min((len(r) for r in rounds), default=0)
    if n < 2:
        return None
    r = np.array([x[:n] for x in rounds])
    pairs = [spearmanr(r[:, i], r[:, j]).statistic for i in range(n) for j in range(i + 1, n)]
    return {
        "rounds": n,
        "spearman_between_rounds": float(np.median(pairs)),
        "spearman_best_even_vs_odd": float(spearmanr(r[:, 0::2].min(1), r[:, 1::2].min(1)).statistic),
        "spread_median": float(np.median(r.max(1) / r.min(1) - 1.0)),
    }


def throughput(name: str = "default") -> dict[str, float]:
    a = load_model(name).anatomy
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


_FORKED: dict = {}  # what the export workers read (set before the fork, shared copy-on-write)
PROBE = (1536, 4096, 6)  # the calibration's largest fp32 GEMV chain (151 MB): this run's bandwidth probe


def _apply_and_export(model, anatomy, plans: list[Plan], stats, work: Path, kv: bool, i: int):
    """Apply plan ``i`` and export it to ``work``; give (i, size MB, what could not be represented)."""
    compressed = apply_plan_to(model, anatomy, plans[i], stats)
    exp = export_onnx(compressed, anatomy, plans[i], work / f"plan{i}.onnx", kv_cache=kv)
    return i, exp.size_mb, list(exp.not_represented)


def _export_one(i: int) -> tuple[int, float, list[str]]:
    """``_apply_and_export`` in a forked worker: one torch thread, the parent's model and stats."""
    torch.set_num_threads(1)
    return _apply_and_export(*_FORKED["args"], i)


def _probe_ms(threads: int) -> Callable[[], float]:
    """Give a timer of the calibration's 151 MB fp32 GEMV chain, cold (what ``hw calibrate`` fitted
    its bandwidth on): timed beside the plans in every round, it shows how far this VM's memory
    bandwidth has moved since the profile was calibrated."""
    k, n, layers = PROBE
    sess = ort_session(chain_model(k, n, layers).SerializeToString(), threads)
    x, flush = np.ones((1, k), np.float32), Flusher()
    return lambda: time_cold(lambda: sess.run(None, {"x": x}), flush, 9)


def calibrated_probe_ms(profile: HardwareProfile) -> float | None:
    """Give the probe chain's time in ``profile``'s calibration (its raw measurements file), if recorded."""
    name = profile.calibration.measurements if profile.calibration else ""
    path = profiles_dir() / name if name else None
    if path is None or not path.is_file():
        return None
    k, n, layers = PROBE
    for s in json.loads(path.read_text())["samples"]:
        if s["fmt"] == "fp32" and s["tokens"] == 1 and s["linears"] == layers and s["flops"] == 2.0 * k * n * layers:
            return float(s["median_ms"])
    return None


def measure_plans(
    model,
    anatomy,
    plans: list[Plan],
    stats,
    threads: int,
    rounds: int,
    work: Path,
    kv: bool,
    context: int,
    jobs: int = 1,
    measure_rounds: bool = True,
):
    """Export every plan to ONNX (matching quantization) and measure it; give (export s, measure s, rows).

    ``jobs`` > 1 exports in that many forked processes (the dynamo export is mostly single-threaded
    Python). ``work`` keeps the files and ``state.json`` (per plan hash: size, notes, each round's
    medians; ``_probe``: the bandwidth probe's time per round), so a rerun skips what is done.
    ``measure_rounds`` False stops after the exports (rows without timings, no probe)."""
    work.mkdir(parents=True, exist_ok=True)
    state_path = work / "state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}

    def save() -> None:
        tmp = state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(state_path)

    keys = [p.hash() for p in plans]

    def done(i: int, size_mb: float, notes: list[str]) -> None:
        state[keys[i]] = {"size_mb": size_mb, "not_represented": notes, "decode": [], "prefill": []}
        save()
        print(f"exported plan {i:2d}: {size_mb:6.1f} MB  {'; '.join(notes)[:90]}", flush=True)

    t0 = time.perf_counter()
    todo = [i for i, key in enumerate(keys) if key not in state or not (work / f"plan{i}.onnx").exists()]
    args = (model, anatomy, plans, stats, work, kv)
    if jobs > 1 and len(todo) > 1:
        _FORKED["args"] = args
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            for fut in as_completed([pool.submit(_export_one, i) for i in todo]):
                done(*fut.result())
    else:
        for i in todo:
            done(*_apply_and_export(*args, i))
    rows = [
        {
            "plan": i,
            "plan_hash": key,
            "path": work / f"plan{i}.onnx",
            "size_mb": state[key]["size_mb"],
            "not_represented": state[key]["not_represented"],
        }
        for i, key in enumerate(keys)
    ]
    export_s = time.perf_counter() - t0
    if not measure_rounds:
        return export_s, 0.0, rows, None
    probe = _probe_ms(threads)
    state.setdefault("_probe", [])
    for r in range(rounds):  # interleaved rounds: contention hits every plan alike
        if len(state["_probe"]) <= r:
            state["_probe"].append(probe())
        for row in rows:
            st = state[row["plan_hash"]]
            if len(st["decode"]) > r:
                continue
            sess = ort_session(row["path"], threads)
            if kv:
                m = measure_decode(sess, context=context, threads=threads, warmup=5, repeats=15, min_time_s=0.3)
                dec, pre = m.decode.median_ms, m.prefill.median_ms
            else:
                dec = measure(sess, seq_len=1, threads=threads, warmup=5, repeats=15, min_time_s=0.3).median_ms
                pre = measure(sess, seq_len=PROMPT, threads=threads, warmup=2, repeats=7).median_ms
            st["decode"].append(dec)
            st["prefill"].append(pre)
            save()
        print(f"measurement round {r + 1}/{rounds} done (bandwidth probe {state['_probe'][r]:.2f} ms)", flush=True)
    for row in rows:
        st = state[row["plan_hash"]]
        row["decode_ms"], row["prefill_ms"] = min(st["decode"]), min(st["prefill"])
        row["decode_rounds_ms"] = list(st["decode"])
    measure_s = time.perf_counter() - t0 - export_s
    return export_s, measure_s, rows, min(state["_probe"])


def main() -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--plans", type=int, default=30)
    ap.add_argument("--blocks", type=int, default=6, help="blocks of the model kept (0: all, the full depth)")
    ap.add_argument(
        "--model", default="default", help="model to cut (default: the bundled SmolLM2; tiny-llama for a smoke run)"
    )
    ap.add_argument(
        "--kv-cache", action="store_true", help="measure true decode: the KV-cache decoder, one step at --context"
    )
    ap.add_argument("--context", type=int, default=PROMPT, help="tokens in the cache for a --kv-cache decode step")
    ap.add_argument("--threads", type=int, help="onnxruntime threads (default: the calibrated profile's)")
    ap.add_argument(
        "--allow-uncalibrated", action="store_true", help="price with an uncalibrated --profile (smoke runs)"
    )
    ap.add_argument("--out", type=Path, default=RESULTS, help="results JSON")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--jobs", type=int, default=1, help="export in this many forked processes (the measuring is serial)"
    )
    ap.add_argument(
        "--export-only",
        action="store_true",
        help="export the plans and stop (e.g. niced on a busy machine); a later run measures them",
    )
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
    if not local.calibrated and not args.allow_uncalibrated:
        sys.exit(
            f"profile {local.id!r} is not calibrated: run `autocompress hw calibrate --out hw_profiles/local.yaml`"
        )
    threads = args.threads or (local.calibration.threads if local.calibrated else 1)
    context = args.context if args.kv_cache else 1
    torch.manual_seed(0)
    model, anatomy, tok = reduced_default(args.blocks, args.model)
    stats = activation_stats(model, anatomy, load_token_data(tok, DataConfig(calib_tokens=1024)))
    plans = random_plans(anatomy, args.plans, args.seed, local)
    if args.reuse_measurements:
        before = json.loads(args.out.read_text())
        keep = ("plan", "size_mb", "not_represented", "decode_ms", "prefill_ms", "plan_hash", "decode_rounds_ms")
        rows = [{k: r[k] for k in keep if k in r} for r in before["plans"]]
        hashes = [r.get("plan_hash") for r in rows]
        if len(rows) != len(plans) or (all(hashes) and hashes != [p.hash() for p in plans]):
            sys.exit("the stored measurements are for other plans: measure again (drop --reuse-measurements)")
        for r, p in zip(rows, plans, strict=True):
            r["plan_hash"] = p.hash()
        export_s, measure_s = before["export_s"], before["measure_s"]
        probe_ms = before.get("bandwidth_probe_ms")
    else:
        graph = f"kv{args.context}" if args.kv_cache else "nocache"
        work = WORK / f"{anatomy.name}-{graph}-seed{args.seed}-n{args.plans}-t{threads}"
        export_s, measure_s, rows, probe_ms = measure_plans(
            model,
            anatomy,
            plans,
            stats,
            threads,
            args.rounds,
            work,
            args.kv_cache,
            args.context,
            args.jobs,
            measure_rounds=not args.export_only,
        )
        if args.export_only:
            print(
                f"{len(plans)} plans exported to {work} in {export_s:.0f} s; run again without --export-only to measure"
            )
            return {}
    out: dict = {"n_plans": len(plans)}
    detail = {}
    profiles = [("calibrated", local), ("uncalibrated", prior)]
    calib_probe = calibrated_probe_ms(local)
    if probe_ms and calib_probe:
        # the same chain timed at calibration and in this run: the VM's bandwidth moved by this factor
        drift = calib_probe / probe_ms
        out.update(bandwidth_probe_ms=probe_ms, bandwidth_probe_calibrated_ms=calib_probe, bandwidth_drift=drift)
        profiles.insert(1, ("reprobed", local.model_copy(update={"peak_bw_GBps": local.peak_bw_GBps * drift})))
    for label, prof in profiles:
        cm = CostModel(prof, anatomy, prompt_tokens=args.context if args.kv_cache else PROMPT, context_tokens=context)
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
    noise = (
        round_agreement([r["decode_rounds_ms"] for r in rows]) if all("decode_rounds_ms" in r for r in rows) else None
    )
    if noise is not None:
        out["decode_round_agreement"] = noise
        # the calibrated profile against the best of the first k rounds: the figures move with how
        # many rounds a plan's time is the best of (the calibration takes the best of 3)
        pred = [r["pred_decode_ms_calibrated"] for r in rows]
        out["decode_calibrated_by_rounds"] = {
            k: scores(pred, [min(r["decode_rounds_ms"][:k]) for r in rows]) for k in sorted({1, 3, noise["rounds"]})
        }
    rates = throughput(args.model)
    out["plans_per_second"] = rates["per_layer"]
    out.update(
        {
            "uniform_plans_per_second": rates["uniform"],
            "metric": (
                f"decode latency, 1 token with {args.context} tokens in the KV cache (prefill: those {args.context}"
                f" tokens), batch 1, onnxruntime CPU, {threads} thread(s)"
                if args.kv_cache
                else f"decode latency, 1 token without KV cache, batch 1, onnxruntime CPU, {threads} thread(s)"
            ),
            "kv_cache": args.kv_cache,
            "context_tokens": context,
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
    if "decode_round_agreement" in out:
        n = out["decode_round_agreement"]
        print(
            f"the measurement against itself (decode, {n['rounds']} rounds): Spearman between two rounds"
            f" {n['spearman_between_rounds']:.3f} (median), best of the even rounds against best of the odd ones"
            f" {n['spearman_best_even_vs_odd']:.3f}; a plan's rounds spread by {n['spread_median']:.0%} (median)"
        )
        for k, sc in out["decode_calibrated_by_rounds"].items():
            print(
                f"  local (calibrated) against the best of {k} round(s): within ±10 % {sc['within_10pct']:.0%},"
                f" MAPE {sc['mape']:.1%}, Spearman {sc['spearman']:.3f}, pred/meas {sc['median_ratio']:.2f}"
            )
    print(f"cost model: {rates['per_layer']:,.0f} per-layer plans/s, {rates['uniform']:,.0f} uniform plans/s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
