"""Each compression family's better method against its baseline, at equal compression, on the default model.

    python bench/techniques.py            # prints the table, writes bench/results/techniques.json

Perplexity on the default evaluation split and KL to the base model on the proxy split, both from
the same ``Evaluator``; every plan applied through ``apply_plan_to`` with the base model's
activation statistics and calibration Hessians (one-shot). Also measures the variant cache: one
search-like trial (apply + KL proxy) with a cold per-linear cache, then the same trial again.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from autocompress._io import atomic_write_text
from autocompress.compress import apply_plan_to
from autocompress.evaluate import Evaluator
from autocompress.model.loading import state_dict_hash
from autocompress.plan import BlockChoice, LayerChoice, ModelRef, Plan
from autocompress.workbench import Workbench

OUT = Path(__file__).parent / "results" / "techniques.json"
MLP_ROLES = ("gate", "up", "down")


@dataclass
class Row:
    family: str
    setting: str
    method: str
    baseline: str
    plan_kw: dict = field(default_factory=dict)  # kwargs of Plan for the method
    base_kw: dict = field(default_factory=dict)  # ... and for the baseline
    base_stats: bool = True  # False: the baseline is applied without activation statistics


def _rows(wb: Workbench) -> list[Row]:
    a = wb.lm.anatomy
    mlp = [s.name for s in a.linears if s.role in MLP_ROLES]
    width = a.blocks[0].mlp_dim * 3 // 4 // 8 * 8
    last3 = tuple(range(a.num_blocks - 4, a.num_blocks - 1))  # the last three before the final block
    measured = tuple(sorted(wb.stats.drop_order()[:3]))
    lrk = {"rank_ratio": 0.5}

    def every(**kw):
        return {"default": LayerChoice(**kw)}

    return [
        Row("quantization", "4-bit g128 sym", "gptq", "rtn", every(bits=4, group_size=128, quant_method="gptq"),
            every(bits=4, group_size=128)),
        Row("quantization", "3-bit g128 asym", "gptq", "rtn",
            every(bits=3, group_size=128, symmetric=False, quant_method="gptq"),
            every(bits=3, group_size=128, symmetric=False)),
        Row("unstructured", "50 %", "wanda", "magnitude", every(sparsity=0.5),
            every(sparsity=0.5, prune_method="magnitude")),
        Row("2:4", "50 % (2 of 4)", "wanda", "magnitude", every(sparsity=0.5, sparsity_pattern="2:4"),
            every(sparsity=0.5, sparsity_pattern="2:4", prune_method="magnitude")),
        Row("low-rank", "all MLP linears at 0.5·r*", "svd-llm", "svd",
            {"layers": dict.fromkeys(mlp, LayerChoice(**lrk, lowrank_method="svd-llm"))},
            {"layers": dict.fromkeys(mlp, LayerChoice(**lrk))}),
        Row("low-rank", "all MLP linears at 0.5·r*", "asvd", "svd",
            {"layers": dict.fromkeys(mlp, LayerChoice(**lrk, lowrank_method="asvd"))},
            {"layers": dict.fromkeys(mlp, LayerChoice(**lrk))}),
        Row("MLP width", f"keep {width} of {a.blocks[0].mlp_dim} channels, every block", "activation importance",
            "weight norm", {"blocks": {b.index: BlockChoice(keep_mlp_channels=width) for b in a.blocks}},
            {"blocks": {b.index: BlockChoice(keep_mlp_channels=width) for b in a.blocks}}, base_stats=False),
        Row("depth", "drop 3 blocks", f"measured angular distance {list(measured)}", f"last three {list(last3)}",
            {"drop_blocks": measured}, {"drop_blocks": last3}),
        Row("composition", "2:4 Wanda then 4-bit g128 sym", "gptq (mask kept)", "rtn",
            every(sparsity=0.5, sparsity_pattern="2:4", bits=4, group_size=128, quant_method="gptq"),
            every(sparsity=0.5, sparsity_pattern="2:4", bits=4, group_size=128)),
    ]  # fmt: skip


def main() -> None:
    t0 = time.perf_counter()
    wb = Workbench.open()
    a = wb.lm.anatomy
    ref = ModelRef.of(a)
    prov = wb.provenance()
    ev = Evaluator(wb.lm.model, wb.data, "causal-lm")
    base_ppl = ev.base_full().ppl
    t_h = time.perf_counter()
    wb.hessians()
    hess_s = time.perf_counter() - t_h
    print(f"setup {time.perf_counter() - t0:.0f} s (Hessians {hess_s:.1f} s); base ppl {base_ppl:.2f}")

    def score(kw: dict, with_stats: bool = True) -> tuple[float, float, float]:
        t = time.perf_counter()
        plan = Plan(model=ref, provenance=prov, **kw)
        model = apply_plan_to(wb.lm.model, a, plan, wb.stats if with_stats else None, cache=wb.variants)
        apply_s = time.perf_counter() - t
        return ev.full(model).ppl, ev.proxy(model).kl, apply_s

    results, timing = [], {}
    for row in _rows(wb):
        ppl_m, kl_m, s_m = score(row.plan_kw)
        ppl_b, kl_b, _ = score(row.base_kw, row.base_stats)
        timing[f"{row.family} / {row.method}"] = round(s_m, 2)
        results.append(
            {"family": row.family, "setting": row.setting, "method": row.method, "baseline": row.baseline,
             "ppl_method": ppl_m, "ppl_baseline": ppl_b, "kl_method": kl_m, "kl_baseline": kl_b}
        )  # fmt: skip
        print(f"  {row.family}: {row.method} {ppl_m:.4g} vs {row.baseline} {ppl_b:.4g} (apply {s_m:.1f} s)")

    # the variant cache: the same search-like trial twice, the first with a cold per-linear cache
    trial = Plan(
        model=ref,
        provenance=prov,
        default=LayerChoice(bits=4, group_size=128, quant_method="gptq"),
        layers={
            s.name: LayerChoice(bits=4, group_size=128, quant_method="gptq", sparsity=0.5, sparsity_pattern="2:4")
            for s in a.linears
            if s.role in MLP_ROLES and s.block % 3 == 0
        },
        blocks={b: BlockChoice(keep_mlp_channels=1152) for b in (5, 20)},
        drop_blocks=tuple(sorted(wb.stats.drop_order()[:1])),
    )
    times, hashes = [], []
    wb.variants.clear()
    for _ in range(2):
        t = time.perf_counter()
        model = apply_plan_to(wb.lm.model, a, trial, wb.stats, cache=wb.variants)
        applied = time.perf_counter() - t
        ev.proxy(model)
        times.append((applied, time.perf_counter() - t))
        hashes.append(state_dict_hash(model))
    assert hashes[0] == hashes[1], "a cached trial must give bit-identical weights"
    speedup = times[0][1] / times[1][1]
    n_gptq = sum(1 for s in a.linears if s.block not in trial.drop_blocks)
    print(
        f"cache: first trial {times[0][1]:.1f} s (apply {times[0][0]:.1f} s, {n_gptq} GPTQ linears, "
        f"{1000 * times[0][0] / n_gptq:.0f} ms each), repeated {times[1][1]:.2f} s (apply {times[1][0]:.2f} s): "
        f"{speedup:.1f}x"
    )

    head = ["family", "setting", "method", "baseline", "ppl method", "ppl baseline", "KL method", "KL baseline"]
    print(f"\nbase ppl {base_ppl:.2f}; {a.name}; eval {wb.data.eval.numel()} tokens, proxy {wb.data.proxy.numel()}\n")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in results:
        print(
            f"| {r['family']} | {r['setting']} | {r['method']} | {r['baseline']} | {r['ppl_method']:.4g} | "
            f"{r['ppl_baseline']:.4g} | {r['kl_method']:.3g} | {r['kl_baseline']:.3g} |"
        )
    print(f"\nvariant cache speed-up (repeated trial vs first): {speedup:.1f}x")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "rows": results,
        "cache_speedup": speedup,
        "base_ppl": base_ppl,
        "model": a.name,
        "hessian_collect_s": hess_s,
        "first_trial_s": times[0][1],
        "repeated_trial_s": times[1][1],
        "first_apply_s": times[0][0],
        "repeated_apply_s": times[1][0],
        "apply_s": timing,
        "threads": torch.get_num_threads(),
    }
    atomic_write_text(OUT, json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
