"""Hypervolume of a study's front, tracked per trial and plotted.

Objectives (KL to the base model, latency, memory) are divided by a reference: the base model's
predicted latency and memory, and the KL of the worst uniform baseline. The normalised reference
point is (1, 1, 1) and the ideal (0, 0, 0), so a hypervolume is the fraction of that box the
feasible front dominates (0 to 1); the base model itself adds nothing to it. Optuna's exact
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
BASE_ATTR = "hv_base"  # study user attr: [latency_ms, memory_mb] of the base model


def hypervolume(points: Iterable[Sequence[float]], reference: Sequence[float]) -> float:
    """Give the normalised hypervolume of ``points`` (minimised objectives) against ``reference``:
    each objective is divided by the reference's, points not strictly inside the box are ignored."""
    ref = np.asarray(reference, dtype=float)
    if ref.ndim != 1 or not np.all(ref > 0):
        raise ValueError(f"a hypervolume reference needs positive values, got {reference!r}")
    pts = np.asarray([list(p) for p in points], dtype=float).reshape(-1, len(ref)) / ref
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
    worst KL so far), and the base model's latency and memory; None before any positive KL."""
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.values is not None]
    kls = [t.values[0] for t in done if "baseline" in t.user_attrs] or [t.values[0] for t in done]
    kl_ref = max((k for k in kls if math.isfinite(k)), default=0.0)
    if kl_ref <= 0 or min(base_cost) <= 0:
        return None
    return (kl_ref, float(base_cost[0]), float(base_cost[1]))


def study_hypervolume(trials: Sequence[FrozenTrial], reference: Sequence[float]) -> float:
    return hypervolume((t.values for t in trials if feasible(t)), reference)


def base_cost_of(study: optuna.Study, cost_model: Any = None) -> tuple[float, float] | None:
    """Give the base model's (latency_ms, memory_mb), stored in the study the first time."""
    stored = study.user_attrs.get(BASE_ATTR)
    if stored is None and cost_model is not None:
        c = cost_model.predict(Plan(model=ModelRef.of(cost_model.anatomy)))
        stored = [c.latency_ms, c.memory_mb]
        study.set_user_attr(BASE_ATTR, stored)
    return None if stored is None else (float(stored[0]), float(stored[1]))


def record(study: optuna.Study, trial: optuna.Trial, values: Sequence[float], cost_model: Any) -> float | None:
    """Store on ``trial`` the study's hypervolume once it holds ``values`` (call right before ``tell``,
    after the trial's constraints are set)."""
    done = list(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    me = study._storage.get_trial(trial._trial_id)
    me = optuna.trial.create_trial(values=list(values), user_attrs=me.user_attrs, system_attrs=me.system_attrs)
    ref = reference_of([*done, me], base_cost_of(study, cost_model) or (0.0, 0.0))
    if ref is None:
        return None
    hv = study_hypervolume([*done, me], ref)
    trial.set_user_attr(ATTR, hv)
    return hv


def curve(trials: Sequence[FrozenTrial], reference: Sequence[float]) -> list[tuple[int, float]]:
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
        out.append((n, hypervolume(front, reference)))
    return out


def plot(study: optuna.Study, path: Path) -> Path | None:
    """Plot hypervolume against evaluated trials into ``path`` (PNG); None when there is nothing
    to plot yet (or matplotlib is missing)."""
    trials = study.get_trials(deepcopy=False)
    base = base_cost_of(study)
    ref = reference_of(trials, base) if base else None
    if ref is None:
        return None
    points = curve(trials, ref)
    if not points:
        return None
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
    ax.set_title(f"{study.study_name}: KL ref {ref[0]:.3g}, {ref[1]:.3g} ms, {ref[2]:.4g} MB", fontsize=9)
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
