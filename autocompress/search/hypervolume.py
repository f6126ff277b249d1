"""Hypervolume of a study's front, tracked per trial and plotted.

Objectives (KL to the base model, latency, memory) are scaled into a box per objective, from an
ideal point (KL 0; the lowest latency and memory any plan of the space can reach, from its extreme
plans) to a reference point (the worst uniform baseline's KL; the base model's latency and memory).
Scaled, the ideal is (0, 0, 0) and the reference (1, 1, 1), so a hypervolume is the fraction of
the box the feasible front dominates (0 to 1); the base model itself adds nothing. Optuna's exact
hypervolume (WFG; closed form in 3-D) does the computing.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna._hypervolume import compute_hypervolume
from optuna.trial import FrozenTrial, TrialState

from autocompress.plan import ModelRef, Plan

ATTR = "hypervolume"  # trial user attr: the study's hypervolume with this trial's result in
BOX_ATTR = "hv_box"  # study user attr: {"base": [latency_ms, memory_mb], "ideal": [0, latency_ms, memory_mb]}


def hypervolume(
    points: Iterable[Sequence[float]], reference: Sequence[float], ideal: Sequence[float] | None = None
) -> float:
    """Give the normalised hypervolume of ``points`` (minimised objectives): each objective scaled
    from ``ideal`` (default 0) to ``reference``; points not strictly inside the box are ignored."""
    ref = np.asarray(reference, dtype=float)
    low = np.zeros_like(ref) if ideal is None else np.asarray(ideal, dtype=float)
    if ref.ndim != 1 or low.shape != ref.shape:
        raise ValueError(f"a hypervolume box needs a reference and an ideal point alike, got {reference!r}, {ideal!r}")
    pts = np.asarray([list(p) for p in points], dtype=float).reshape(-1, len(ref))
    keep = ref > low  # an objective no plan can improve (e.g. latency in a space without fast kernels) is left out
    if not keep.any():
        return 0.0
    pts, ref, low = pts[:, keep], ref[keep], low[keep]
    pts = (pts - low) / (ref - low)
    pts = pts[np.all(np.isfinite(pts), axis=1) & np.all(pts < 1.0, axis=1)]
    if not len(pts):
        return 0.0
    return float(compute_hypervolume(pts, np.ones(len(ref))))


def feasible(t: FrozenTrial) -> bool:
    """An evaluated trial whose constraints (if any) all hold."""
    if t.state != TrialState.COMPLETE or t.values is None:
        return False
    return all(c <= 0 for c in t.constraints.values())


def reference_of(trials: Sequence[FrozenTrial], base_cost: Sequence[float]) -> tuple[float, float, float] | None:
    """Give the reference point: worst evaluated baseline's KL (or, with no baseline evaluated, the
    worst KL so far), and the base model's latency and memory ``base_cost``; None before any positive KL."""
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.values is not None]
    kls = [t.values[0] for t in done if "baseline" in t.user_attrs] or [t.values[0] for t in done]
    kl_ref = max((k for k in kls if math.isfinite(k)), default=0.0)
    if kl_ref <= 0 or min(base_cost) <= 0:
        return None
    return (kl_ref, float(base_cost[0]), float(base_cost[1]))


def study_hypervolume(trials: Sequence[FrozenTrial], reference: Sequence[float], ideal: Sequence[float]) -> float:
    return hypervolume((t.values for t in trials if feasible(t)), reference, ideal)


def cost_box(cost_model: Any, space: Any, ctx: Any) -> dict[str, list[float]]:
    """Give the base model's cost and the ideal point (KL 0, the space's lowest latency and memory)."""
    c = cost_model.predict(Plan(model=ModelRef.of(ctx.anatomy)))
    costs = [cost_model.predict(p) for p in space.extreme_plans(ctx)] or [c]
    return {
        "base": [c.latency_ms, c.memory_mb],
        "ideal": [0.0, min(x.latency_ms for x in costs), min(x.memory_mb for x in costs)],
    }


def box_of(study: optuna.Study, cost_model: Any = None, space: Any = None, ctx: Any = None) -> dict | None:
    """Give the study's cost box (see ``cost_box``), stored in the study the first time."""
    box = study.user_attrs.get(BOX_ATTR)
    if box is None and cost_model is not None:
        box = cost_box(cost_model, space, ctx)
        study.set_user_attr(BOX_ATTR, box)
    return box


def record(
    study: optuna.Study, trial: optuna.Trial, values: Sequence[float], cost_model: Any, space: Any, ctx: Any
) -> float | None:
    """Store on ``trial`` the study's hypervolume once it holds ``values`` (call right before ``tell``,
    after the trial's constraints are set)."""
    box = box_of(study, cost_model, space, ctx)
    done = list(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    me = study._storage.get_trial(trial._trial_id)
    me = optuna.trial.create_trial(values=list(values), user_attrs=me.user_attrs, system_attrs=me.system_attrs)
    ref = reference_of([*done, me], box["base"])
    if ref is None or not all(map(math.isfinite, values)):
        return None
    hv = study_hypervolume([*done, me], ref, box["ideal"])
    trial.set_user_attr(ATTR, hv)
    return hv


def curve(
    trials: Sequence[FrozenTrial], reference: Sequence[float], ideal: Sequence[float] | None = None
) -> list[tuple[int, float]]:
    """Give (number of evaluated trials, hypervolume) after each evaluated trial, in trial order,
    all against one reference (unlike the per-trial attrs, whose reference may still move early on)."""
    out: list[tuple[int, float]] = []
    front: list[Sequence[float]] = []
    n = 0
    for t in sorted(trials, key=lambda t: t.number):
        if t.state != TrialState.COMPLETE:
            continue
        n += 1
        if feasible(t):
            front.append(t.values)
        out.append((n, hypervolume(front, reference, ideal)))
    return out


def study_curve(study: optuna.Study) -> tuple[list[tuple[int, float]], Sequence[float], Sequence[float]] | None:
    """Give (``curve`` of all evaluated trials, reference, ideal) of a study, or None before it has a box."""
    trials = study.get_trials(deepcopy=False)
    box = box_of(study)
    ref = reference_of(trials, box["base"]) if box else None
    return (curve(trials, ref, box["ideal"]), ref, box["ideal"]) if ref is not None else None


def final(computed: tuple[list[tuple[int, float]], Sequence[float], Sequence[float]] | None) -> float | None:
    """Give the final hypervolume (the last point) of a ``study_curve``, or None."""
    return computed[0][-1][1] if computed and computed[0] else None


def plot(study: optuna.Study, path: Path, computed: tuple | None = None) -> Path | None:
    """Plot hypervolume against evaluated trials into ``path`` (PNG; ``computed``: the study's
    ``study_curve`` when the caller has it); None when there is nothing to plot yet (or matplotlib
    is missing)."""
    computed = computed if computed is not None else study_curve(study)
    if computed is None or not computed[0]:
        return None
    points, ref, lo = computed
    trials = study.get_trials(deepcopy=False)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    xs, ys = zip(*points, strict=True)
    ax.step(xs, ys, where="post")
    n_base = sum(1 for t in trials if t.state == TrialState.COMPLETE and "baseline" in t.user_attrs)
    if n_base:
        ax.axvline(n_base + 0.5, color="grey", linestyle=":", label="after the uniform baselines")
        ax.legend(loc="lower right")
    ax.set_xlabel("evaluated trials")
    ax.set_ylabel("hypervolume (normalised)")
    ax.set_title(
        f"{study.study_name}: box KL 0–{ref[0]:.3g}, {lo[1]:.3g}–{ref[1]:.3g} ms, {lo[2]:.4g}–{ref[2]:.4g} MB",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png", metadata={"Software": None})
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path
