"""How well each rung of the fidelity ladder ranks plans, and what it costs, on the default model.

    python bench/fidelity.py [--plans 40] [--full-seqs 48]   # prints the table, writes bench/results/fidelity.json

Plans: the default space's uniform baselines plus plans drawn by Optuna's RandomSampler from the
same space (mixed families: bits, group size, 2:4 / unstructured sparsity, low rank, widths,
dropped blocks), deduplicated by plan hash. Each plan is scored at every rung:

- rung 0: the sensitivity table's additive prediction (the search's own cached table);
- rung 1: KL to the base model on the first 4, 8 and 16 held-out sequences of 256 tokens
  (also the top-32 KL), measured incrementally (sequences 1-4, then 5-8, then 9-16, the cost of
  k sequences being the time of the stages up to k);
- rung 2 (the full metric): perplexity on ``--full-seqs`` further held-out sequences of 256
  tokens, disjoint from the proxy sequences and from calibration.

Ranks are compared with Spearman's rho against the full metric. Cost ratios compare the
forward-pass time of each rung-1 variant with the full metric's (applying the plan is common to
every rung and reported apart). The learned predictor is scored by 5-fold cross-validated
Spearman against the rung-1 KL (what it is trained on in a search) and against perplexity.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import optuna
import torch
from scipy.stats import spearmanr

from autocompress._io import atomic_write_text
from autocompress.calib import load_token_data
from autocompress.evaluate.ladder import merge
from autocompress.evaluate.metrics import kl_to_base, output_logprobs, perplexity
from autocompress.evaluate.predictor import QualityPredictor, plan_features
from autocompress.evaluate.sensitivity import build_sensitivity, plan_keys
from autocompress.model.loading import cache_dir
from autocompress.search.engine import SENSITIVITY_SHAPE
from autocompress.space import SearchSpace, SpaceContext
from autocompress.workbench import Workbench

OUT = Path(__file__).parent / "results" / "fidelity.json"
PROXY_SEQS = (4, 8, 16)
TARGET_RHO, TARGET_COST = 0.95, 0.05


def sample_plans(space: SearchSpace, ctx: SpaceContext, n: int, seed: int) -> list:
    """Give the space's baselines plus random plans from it, unique by hash, in a fixed order."""
    study = optuna.create_study(directions=["minimize"] * 3, sampler=optuna.samplers.RandomSampler(seed=seed))
    for params in space.baseline_params(ctx.anatomy).values():
        study.enqueue_trial(params)
    plans, seen = [], set()
    while len(plans) < n:
        trial = study.ask()
        plan = space.suggest(trial, ctx)
        study.tell(trial, [0.0, 0.0, 0.0])
        try:
            plan.validate(ctx.anatomy)
        except Exception:
            continue
        if plan.hash() not in seen:
            seen.add(plan.hash())
            plans.append(plan)
    return plans


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def summarise(rows: list[dict], full_metric: str, previous: dict | None = None) -> dict:
    """Rank agreement and cost of each rung from measured rows; print the table; give the result."""
    ok = [r for r in rows if math.isfinite(r["ppl"])]
    base_ppl = min(r["ppl"] for r in ok if r["rung0"] == 0)  # the uncompressed baseline is a plan too
    near = [r for r in ok if r["ppl"] <= 2 * base_ppl]

    def rho(key: str, among: list[dict] = ok) -> float:
        if len(among) < 3:
            return math.nan
        return float(spearmanr([r[key] for r in among], [r["ppl"] for r in among])[0])

    t_full = sum(r["t_full"] for r in ok)
    result = {
        "n_plans": len(ok),
        "full_metric": full_metric,
        "spearman_rung0_full": rho("rung0"),
        "spearman_rung1": {str(k): rho(f"kl{k}") for k in PROXY_SEQS},
        "spearman_rung1_topk": {str(k): rho(f"topk{k}") for k in PROXY_SEQS},
        "cost_ratio_rung1": {str(k): sum(r[f"t{k}"] for r in ok) / t_full for k in PROXY_SEQS},
        "cost_ratio_rung0": 0.0,
        "near_base": {
            "n_plans": len(near),
            "rule": f"perplexity at most 2x the uncompressed model's ({base_ppl:.4g})",
            "spearman_rung0_full": rho("rung0", near),
            "spearman_rung1": {str(k): rho(f"kl{k}", near) for k in PROXY_SEQS},
        },
        "apply_s_mean": sum(r["apply_s"] for r in ok) / len(ok),
        "full_s_mean": t_full / len(ok),
    }
    if all("features" in r for r in ok):
        feats = [r["features"] for r in ok]
        result["predictor_cv_spearman"] = (
            QualityPredictor(min_samples=8).fit(feats, [r["kl16"] for r in ok]).cv_spearman
        )
        result["predictor_cv_spearman_vs_full"] = (
            QualityPredictor(min_samples=8).fit(feats, [r["ppl"] for r in ok]).cv_spearman
        )
    else:  # rows saved without features: keep the predictor figures measured with them
        for key in ("predictor_cv_spearman", "predictor_cv_spearman_vs_full"):
            result[key] = (previous or {}).get(key, math.nan)
    result["rows"] = rows

    nb = result["near_base"]
    print(f"\nfull metric: {full_metric}; {len(ok)} plans, {len(near)} of them near the base model ({nb['rule']})")
    print("| rung | sequences | Spearman vs full metric (all plans) | (near the base) | cost vs full metric |")
    print("|---|---|---|---|---|")
    print(
        f"| 0 (sensitivity table) | - | {result['spearman_rung0_full']:.3f} | {nb['spearman_rung0_full']:.3f} "
        "| 0 (table built once) |"
    )
    for k in PROXY_SEQS:
        print(
            f"| 1 (KL) | {k} | {result['spearman_rung1'][str(k)]:.3f} (top-32 KL "
            f"{result['spearman_rung1_topk'][str(k)]:.3f}) | {nb['spearman_rung1'][str(k)]:.3f} "
            f"| {result['cost_ratio_rung1'][str(k)]:.1%} |"
        )
    print(
        f"learned predictor (5-fold CV, n = {len(ok)}): Spearman {result['predictor_cv_spearman']:.3f} vs rung-1 KL, "
        f"{result['predictor_cv_spearman_vs_full']:.3f} vs perplexity"
    )
    print(f"mean per plan: apply {result['apply_s_mean']:.1f} s, full metric {result['full_s_mean']:.1f} s")
    r8, c8 = result["spearman_rung1"]["8"], result["cost_ratio_rung1"]["8"]
    verdict = "met" if r8 >= TARGET_RHO and c8 <= TARGET_COST else "missed"
    print(f"target (rung 1 with 8 sequences: rho >= {TARGET_RHO} at <= {TARGET_COST:.0%} of the cost): {verdict}")
    if c8 > TARGET_COST:
        print(
            f"cost is set by token counts: rung 1 with 8 sequences reads 8 x 256 tokens; at {TARGET_COST:.0%} the full "
            f"metric would need >= {math.ceil(8 / TARGET_COST)} sequences ({math.ceil(8 / TARGET_COST) * 256} tokens)"
        )
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plans", type=int, default=40)
    ap.add_argument("--full-seqs", type=int, default=48, help="256-token sequences in the full metric")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--summarise", type=Path, help="re-print the table from the rows of an earlier result file")
    args = ap.parse_args()
    if args.summarise:
        prev = json.loads(args.summarise.read_text())
        result = summarise(prev["rows"], prev["full_metric"], prev)
        atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
        return
    torch.manual_seed(0)

    wb = Workbench.open(None, log=print)  # the default model and data, as the search uses them
    a = wb.lm.anatomy
    cfg = wb.data_config
    big = load_token_data(
        wb.lm.tokenizer,
        replace(cfg, proxy_tokens=max(PROXY_SEQS) * cfg.seq_len, eval_tokens=args.full_seqs * cfg.seq_len),
    )
    assert torch.equal(big.proxy[: wb.data.proxy.shape[0]], wb.data.proxy), "proxy rows differ from the search's"
    space = SearchSpace.load("default")
    ctx = SpaceContext(anatomy=a, drop_order=wb.stats.drop_order(), provenance=wb.provenance())
    n, length = SENSITIVITY_SHAPE
    table = build_sensitivity(
        wb.lm.model, lambda m, p: wb.apply(p, into=m), space, ctx, wb.data.proxy[:n, :length], cache_dir(), None
    )
    base_lp = output_logprobs(wb.lm.model, big.proxy)
    plans = sample_plans(space, ctx, args.plans, args.seed)
    print(f"{len(plans)} plans; full metric on {int(big.eval.numel())} tokens; proxy up to {max(PROXY_SEQS)} sequences")

    rows = []
    for i, plan in enumerate(plans):
        keys = plan_keys(plan, space, ctx)
        entries = [(k, table.entries[k]) for k in keys]
        model, t_apply = timed(lambda plan=plan: wb.apply(plan))
        r = {"plan": plan.hash()[:12], "rung0": sum(v for _, v in entries), "apply_s": t_apply}
        r["features"] = plan_features(plan, a, entries)
        parts, spent, lo = [], 0.0, 0
        for k in PROXY_SEQS:  # each stage measures only the sequences the previous one did not
            fid, t = timed(lambda lo=lo, k=k, model=model: kl_to_base(model, big.proxy[lo:k], base_lp[lo:k]))
            parts.append((fid, k - lo))
            spent += t
            lo = k
            acc = merge(parts)
            r[f"kl{k}"], r[f"topk{k}"], r[f"t{k}"] = acc.kl, acc.topk_kl, spent
        try:
            ppl, t_full = timed(lambda model=model: perplexity(model, big.eval, big.eval_chars))
            r["ppl"], r["t_full"] = ppl.ppl, t_full
        except Exception as exc:  # a broken plan has no perplexity; it is left out of the ranks
            r["ppl"], r["t_full"], r["error"] = math.nan, math.nan, str(exc)[:120]
        rows.append(r)
        print(
            f"[{i + 1:>2}/{len(plans)}] rung0 {r['rung0']:.4g}  KL4 {r['kl4']:.4g}  KL8 {r['kl8']:.4g}  "
            f"KL16 {r['kl16']:.4g}  ppl {r['ppl']:.4g}  (apply {t_apply:.1f} s, full {r['t_full']:.1f} s)",
            flush=True,
        )
        del model

    result = summarise(
        rows, f"perplexity on {int(big.eval.numel())} held-out tokens ({args.full_seqs} x {cfg.seq_len})"
    )
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
