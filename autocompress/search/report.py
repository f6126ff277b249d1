"""Study outputs: a one-line description of each plan, pareto.json and summary.md."""

from __future__ import annotations

import json
import math
from collections import Counter
from typing import TYPE_CHECKING, Any

from autocompress._io import atomic_write_text
from autocompress.model.anatomy import ModelAnatomy
from autocompress.plan import Plan

if TYPE_CHECKING:
    from autocompress.search.budget import Budget
    from autocompress.search.result import Candidate, SearchResult


def describe_plan(plan: Plan, anatomy: ModelAnatomy) -> str:
    """Give a short human summary, e.g. ``Q4_0-gptq 60% · 2:4 10% · mlp-pruned 5 blk · drop 2 blk · embedding Q8_0``."""
    kept = [s for s in anatomy.linears if s.block not in plan.drop_blocks]
    total = sum(s.params for s in kept) or 1
    fmt: Counter[str] = Counter()
    for s in kept:
        c = plan.choice_for(s.name)
        parts = []
        if c.quantized:  # the storage format's own name (Q4_K, int4-g128-asym, ...) and a non-default quantizer
            method = getattr(c, "quant_method", "rtn")
            parts.append(c.format + (f"-{method}" if method != "rtn" else ""))
        if getattr(c, "act_bits", 16) < 16:
            parts.append(f"a{c.act_bits}")
        if c.sparsity_pattern == "2:4":
            parts.append("2:4")
        elif c.pruned:
            parts.append(f"s{round(c.sparsity * 100)}")
        if c.rank_ratio is not None:
            parts.append(
                f"r{c.rank_ratio:g}" + (f"-{c.lowrank_method}" if getattr(c, "lowrank_method", "svd") != "svd" else "")
            )
        fmt["+".join(parts) or "fp16"] += s.params
    items = [f"{k} {round(100 * v / total)}%" for k, v in fmt.most_common() if round(100 * v / total) > 0]
    tables = {
        plan.embedding_choice(e.name).format for e in anatomy.embeddings if plan.embedding_choice(e.name).quantized
    }
    if tables:
        items.append(f"embedding {'/'.join(sorted(tables))}")
    heads = sum(1 for i, b in plan.blocks.items() if b.keep_heads is not None and i not in plan.drop_blocks)
    mlp = sum(1 for i, b in plan.blocks.items() if b.keep_mlp_channels is not None and i not in plan.drop_blocks)
    if heads:
        items.append(f"heads-pruned {heads} blk")
    if mlp:
        items.append(f"mlp-pruned {mlp} blk")
    if plan.drop_blocks:
        items.append(f"drop {len(plan.drop_blocks)} blk")
    if plan.recovery is not None:
        items.append(f"+ recovery ({plan.recovery.steps} steps)")
    return " · ".join(items)


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


def front_rows(cands: list[Candidate]) -> list[list[str]]:
    """Give table rows (trial, kind, KL, top-1, ppl or accuracy, latency, memory, energy, plan) for candidates."""
    rows = []
    for c in cands:
        rows.append(
            [
                str(c.trial),
                c.kind,
                _fmt(c.metrics.get("kl"), 3),
                _fmt(c.metrics.get("top1_agreement"), 3),
                _fmt(c.metrics.get("ppl", c.metrics.get("accuracy")), 4),  # accuracy: classifiers
                _fmt(c.cost.get("latency_ms"), 3),
                _fmt(c.cost.get("memory_mb"), 4),
                _fmt(c.cost.get("energy_mj"), 3),
                c.description,
            ]
        )
    return rows


HEADERS = ["trial", "kind", "KL", "top-1", "ppl", "latency ms", "memory MB", "energy mJ", "plan"]


def headers_for(base_metrics: dict[str, Any]) -> list[str]:
    """Give the table headers: the full-metric column is "accuracy" for classifiers, "ppl" for LMs."""
    return ["accuracy" if h == "ppl" and "accuracy" in base_metrics else h for h in HEADERS]


def _md_table(rows: list[list[str]], headers: list[str] = HEADERS) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


AGREEMENT_WARN = 0.8
RUNG_NAMES = {
    "rung0_vs_rung1": "sensitivity-table prediction vs measured KL",
    "rung1_vs_rung2": "measured KL vs perplexity",
}


def agreement_lines(agreement: dict[str, dict[str, float]]) -> list[str]:
    """Give one line per rung pair (Spearman, Kendall, n) and a warning when the proxy misleads."""
    lines = []
    for key, label in RUNG_NAMES.items():
        a = agreement.get(key)
        if a is None:
            lines.append(f"- {label}: not enough trials reached both rungs")
            continue
        line = f"- {label}: Spearman {a['spearman']:.3f}, Kendall {a['kendall']:.3f} (n = {a['n']})"
        if a["spearman"] < AGREEMENT_WARN:
            line += " — **warning: the proxy is misleading this search; raise --proxy-tokens**"
        lines.append(line)
    pred = agreement.get("predictor")
    if pred:
        use = "it screens proposals" if pred.get("screens") else "the table screens proposals"
        lines.append(
            f"- learned predictor (gradient boosting on plan features, 5-fold CV, n = {pred['n']}): "
            f"Spearman {pred['cv_spearman']:.3f} vs the table's {pred['table_spearman']:.3f}; {use}"
        )
    return lines


def counts_line(c: dict[str, int]) -> str:
    """Give the one-line account of where the trials went."""
    stopped = c.get("stopped_rung0", 0) + c.get("stopped_rung1", 0)
    return (
        f"{c.get('evaluated', 0)} evaluated, {c.get('screened_out', 0)} screened out by the cost model, "
        f"{stopped} stopped by the fidelity ladder (rung 0: {c.get('stopped_rung0', 0)}, "
        f"rung 1: {c.get('stopped_rung1', 0)}), {c.get('failed', 0)} failed"
    )


_METRIC_NOTE = {
    "causal-lm": "KL = mean KL divergence to the base model's next-token distribution on held-out proxy sequences "
    "(nats/token); ppl = perplexity on the held-out evaluation split (computed for front points and baselines).",
    "encoder": "KL = mean KL divergence to the base model's class distribution on held-out proxy articles "
    "(nats/article); top-1 = agreement with the base model's class there; accuracy = on the labelled held-out "
    "evaluation articles (computed for front points and baselines; macro-F1, ECE and top-1 agreement on them are in "
    "pareto.json).",
}


def _full_text(base: dict[str, Any]) -> str:
    """Give the uncompressed model's full metric for the summary line."""
    if "accuracy" in base:
        return (
            f"accuracy {_fmt(base['accuracy'], 4)}, macro-F1 {_fmt(base.get('macro_f1'), 4)}, "
            f"ECE {_fmt(base.get('ece'), 3)}"
        )
    return f"ppl {_fmt(base.get('ppl'), 4)}"


def write_outputs(result: SearchResult, budget: Budget, anatomy: ModelAnatomy) -> None:
    """Write ``pareto.json`` and ``summary.md`` in the study folder (atomically)."""
    d = result.study_dir
    payload = {
        "study": result.study_name,
        "storage": result.storage,
        "profile": result.profile,
        "model": anatomy.name,
        "model_hash": anatomy.model_hash,
        "budgets": budget.to_dict(),
        "objectives": ["kl", "latency_ms", "memory_mb"],
        "base": result.base_metrics,
        "counts": result.counts,
        "hypervolume": result.hypervolume,
        "agreement": result.agreement,
        "pareto": [c.to_dict() for c in result.pareto],
        "baselines": {k: c.to_dict() for k, c in result.baselines.items()},
    }
    atomic_write_text(d / "pareto.json", json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")
    base = result.base_metrics
    lines = [
        f"# Study `{result.study_name}`",
        "",
        f"- model: `{anatomy.name}` ({anatomy.architecture}, {anatomy.num_blocks} blocks, hash `{anatomy.model_hash[:12]}`)",
        f"- hardware profile: `{result.profile}` (latency = predicted decode ms/token; memory = weights + KV cache)",
        f"- budgets: {budget}",
        f"- trials: {counts_line(result.counts)}",
        *(
            [f"- hypervolume: {result.hypervolume:.3f} (0–1; KL, latency, memory scaled as in `hypervolume.png`)"]
            if result.hypervolume is not None
            else []
        ),
        f"- uncompressed: {_full_text(base)}, latency {_fmt(base.get('latency_ms'))} ms, "
        f"memory {_fmt(base.get('memory_mb'), 4)} MB",
        "",
        _METRIC_NOTE["encoder" if "accuracy" in base else "causal-lm"],
        "",
        f"## Pareto front ({len(result.pareto)} points)",
        "",
        _md_table(front_rows(result.pareto), headers_for(base)),
        "",
        "## Proxy agreement",
        "",
        *agreement_lines(result.agreement),
        "",
        "## Uniform baselines",
        "",
        _md_table(front_rows(list(result.baselines.values())), headers_for(base)),
        "",
        "Plans: `plans/<trial>.yaml`; rebuild one with `autocompress apply plans/<trial>.yaml --out DIR`.",
        "",
    ]
    atomic_write_text(d / "summary.md", "\n".join(lines))
