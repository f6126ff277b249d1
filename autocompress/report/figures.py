"""Report figures: static PNGs (matplotlib, Agg) and the interactive Pareto plot (plotly)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from autocompress.export.study import StudyView
    from autocompress.search.result import Candidate

KL_FLOOR = 1e-5  # KL is drawn on a log axis; exact zeros (the uncompressed model) sit here
COLORS = {"front": "#d62728", "searched": "#9e9e9e", "baseline": "#1f77b4", "screened": "#ff7f0e"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def screened_out(view: StudyView) -> list[tuple[int, dict[str, Any], str]]:
    """Give (trial, predicted cost, reason) of every trial the cost model screened out."""
    out = []
    for t in view.trials:
        reason = t.user_attrs.get("screened_out")
        if reason and "cost" in t.user_attrs:
            out.append((t.number, t.user_attrs["cost"], reason))
    return out


def _kl(c: Candidate) -> float:
    return max(float(c.metrics["kl"]), KL_FLOOR)


def pareto_png(view: StudyView, path: Path) -> Path:
    """KL vs predicted latency and vs predicted memory: all trials, the front, baselines, screened-out trials."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), constrained_layout=True)
    front = {c.trial for c in view.front}
    base = {c.trial for c in view.baselines.values()}
    screened = screened_out(view)
    for ax, key, label in (
        (axes[0], "latency_ms", "predicted decode latency (ms/token)"),
        (axes[1], "memory_mb", "predicted memory (MB)"),
    ):
        rest = [c for c in view.candidates if c.trial not in front and c.trial not in base]
        ax.scatter([c.cost[key] for c in rest], [_kl(c) for c in rest], s=18, c=COLORS["searched"], label="searched")
        fr = sorted(view.front, key=lambda c: c.cost[key])
        ax.plot(
            [c.cost[key] for c in fr], [_kl(c) for c in fr], "-o", c=COLORS["front"], ms=6, lw=1.2, label="Pareto front"
        )
        for name, c in view.baselines.items():
            ax.scatter(
                [c.cost[key]], [_kl(c)], marker="s", s=60, facecolors="none", edgecolors=COLORS["baseline"], lw=1.5
            )
            ax.annotate(
                name,
                (c.cost[key], _kl(c)),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
                color=COLORS["baseline"],
            )
        ax.scatter([], [], marker="s", facecolors="none", edgecolors=COLORS["baseline"], label="uniform baselines")
        if screened:
            ax.scatter(
                [cost[key] for _, cost, _ in screened],
                [KL_FLOOR / 2] * len(screened),
                marker="x",
                c=COLORS["screened"],
                s=30,
                label="screened out (over budget; never evaluated)",
            )
        for b, v in (view.settings.get("budgets") or {}).items():
            if b == key:
                ax.axvline(v, ls="--", c="k", lw=0.8)
                ax.annotate(f"budget {v:g}", (v, KL_FLOOR), fontsize=7, rotation=90, va="bottom")
        ax.set_xlabel(label)
        ax.set_ylabel("KL to base (nats/token, log)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="upper right")
    fig.suptitle(f"study {view.name}: {view.anatomy.name} on {view.profile}", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def layer_grids(view: StudyView, c: Candidate) -> dict[str, Any]:
    """Give per-block x per-role grids of bits, sparsity and rank ratio (NaN = dense / not applicable)."""
    a = view.anatomy
    roles = list(dict.fromkeys(s.role for b in a.blocks for s in b.linears))
    shape = (a.num_blocks, len(roles))
    bits, sparsity, rank = np.full(shape, np.nan), np.full(shape, np.nan), np.full(shape, np.nan)
    for s in a.linears:
        j = roles.index(s.role)
        if s.block in c.plan.drop_blocks:
            continue
        ch = c.plan.choice_for(s.name)
        bits[s.block, j] = ch.bits
        sparsity[s.block, j] = ch.sparsity
        rank[s.block, j] = ch.rank_ratio if ch.rank_ratio is not None else 1.0
    widths = []
    for b in a.blocks:
        bc = c.plan.block_choice(b.index)
        heads = f"{bc.keep_heads}/{b.num_heads}h" if bc.keep_heads is not None else ""
        mlp = f"{bc.keep_mlp_channels}/{b.mlp_dim}" if bc.keep_mlp_channels is not None else ""
        widths.append("dropped" if b.index in c.plan.drop_blocks else " ".join(x for x in (heads, mlp) if x))
    return {"roles": roles, "bits": bits, "sparsity": sparsity, "rank": rank, "widths": widths}


def heatmap_png(view: StudyView, c: Candidate, path: Path) -> Path:
    """Bits / sparsity / kept rank per (block, linear) of one plan; dropped blocks grey, kept widths beside the block."""
    plt = _plt()
    g = layer_grids(view, c)
    n = view.anatomy.num_blocks
    fig, axes = plt.subplots(1, 3, figsize=(11, 1.2 + 0.22 * n), constrained_layout=True)
    panels = (
        ("weight bits", g["bits"], "viridis", 2, 16),
        ("sparsity", g["sparsity"], "magma_r", 0, 1),
        ("kept rank ratio (1 = dense)", g["rank"], "cividis", 0, 1),
    )
    for k, (ax, (title, data, cmap, lo, hi)) in enumerate(zip(axes, panels, strict=True)):
        cm = plt.get_cmap(cmap).with_extremes(bad="#dddddd")
        im = ax.imshow(np.ma.masked_invalid(data), cmap=cm, vmin=lo, vmax=hi, aspect="auto", interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(len(g["roles"])), g["roles"], fontsize=7, rotation=45)
        labels = [f"{w}  {i}" if k == 0 and w else str(i) for i, w in enumerate(g["widths"])]
        ax.set_yticks(range(n), labels, fontsize=6)
        ax.set_ylabel("block", fontsize=8)
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle(f"trial {c.trial}: {c.description or 'uncompressed'}", fontsize=9)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def agreement_png(view: StudyView, path: Path) -> Path | None:
    """Rung-0 (sensitivity table) vs rung-1 (KL) on all trials and KL vs perplexity where measured."""
    from scipy.stats import spearmanr

    r0 = [(t.user_attrs["rung0_kl"], t.values[0]) for t in view.trials if t.values and "rung0_kl" in t.user_attrs]
    r2 = [(c.metrics["kl"], c.metrics["ppl"]) for c in view.candidates if "ppl" in c.metrics]
    if len(r0) < 3 and len(r2) < 3:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax, xy, xl, yl in (
        (axes[0], r0, "sensitivity-table prediction (rung 0)", "measured KL (rung 1)"),
        (axes[1], r2, "measured KL (rung 1)", "perplexity (rung 2)"),
    ):
        if len(xy) < 3:
            ax.set_axis_off()
            ax.text(0.5, 0.5, "too few trials reached both rungs", ha="center")
            continue
        x, y = map(np.array, zip(*xy, strict=True))
        rho = spearmanr(x, y)[0]
        ax.scatter(np.maximum(x, KL_FLOOR), y if "perplexity" in yl else np.maximum(y, KL_FLOOR), s=14)
        ax.set_xscale("log")
        if "perplexity" not in yl:
            ax.set_yscale("log")
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.set_title(f"Spearman {rho:.3f} (n = {len(xy)})" if math.isfinite(rho) else f"n = {len(xy)}", fontsize=9)
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def measured_png(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Measured vs predicted decode latency of exported points (ONNX on this machine), with y = x."""
    pts = [
        (r["latency"]["predicted_decode_ms"], r["latency"]["measured_decode_ms"], r["trial"])
        for r in records
        if "latency" in r
    ]
    if not pts:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4.4), constrained_layout=True)
    p, m, _ = zip(*pts, strict=True)
    ax.scatter(p, m, s=20)
    for x, y, n in pts:
        ax.annotate(str(n), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    lo, hi = min(*p, *m) * 0.8, max(*p, *m) * 1.2
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="predicted = measured")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("predicted decode ms (local profile)")
    ax.set_ylabel("measured decode ms (onnxruntime)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def pareto_plotly(view: StudyView) -> str:
    """Give the interactive Pareto plot as an HTML fragment with plotly.js inlined (no network needed)."""
    import plotly.graph_objects as go

    def hover(c: Candidate) -> str:
        return (
            f"trial {c.trial} ({c.kind})<br>{c.description or 'uncompressed'}<br>KL {c.metrics['kl']:.4g}"
            f"<br>latency {c.cost['latency_ms']:.3g} ms · memory {c.cost['memory_mb']:.4g} MB"
            f" · energy {c.cost['energy_mj']:.3g} mJ"
        )

    fig = go.Figure()
    front = {c.trial for c in view.front}
    base = {c.trial for c in view.baselines.values()}
    groups = (
        (
            "searched",
            [c for c in view.candidates if c.trial not in front and c.trial not in base],
            "circle",
            COLORS["searched"],
        ),
        ("uniform baselines", list(view.baselines.values()), "square-open", COLORS["baseline"]),
        ("Pareto front", sorted(view.front, key=lambda c: c.cost["latency_ms"]), "circle", COLORS["front"]),
    )
    for name, cands, symbol, color in groups:
        fig.add_trace(
            go.Scatter(
                x=[c.cost["latency_ms"] for c in cands],
                y=[_kl(c) for c in cands],
                mode="lines+markers" if name == "Pareto front" else "markers",
                name=name,
                marker={"symbol": symbol, "color": color, "size": 9 if name != "searched" else 6},
                text=[hover(c) for c in cands],
                hoverinfo="text",
            )
        )
    screened = screened_out(view)
    if screened:
        fig.add_trace(
            go.Scatter(
                x=[cost["latency_ms"] for _, cost, _ in screened],
                y=[KL_FLOOR / 2] * len(screened),
                mode="markers",
                name="screened out (never evaluated)",
                marker={"symbol": "x", "color": COLORS["screened"]},
                text=[f"trial {n}: {why}" for n, _, why in screened],
                hoverinfo="text",
            )
        )
    fig.update_layout(
        xaxis_title="predicted decode latency (ms/token)",
        yaxis_title="KL to base (log)",
        yaxis_type="log",
        height=460,
        margin={"l": 60, "r": 20, "t": 30, "b": 50},
        legend={"orientation": "h"},
    )
    return fig.to_html(full_html=False, include_plotlyjs=True, div_id="pareto-interactive")
