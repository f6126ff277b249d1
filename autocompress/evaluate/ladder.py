"""The fidelity ladder's gate: a proposal climbs to the next rung only while it can still reach the front.

Rung 0 is free (the sensitivity table's additive sum, or the learned predictor once it ranks
better); rung 1 is the KL proxy, measured in two stages (the first proxy sequence, then the rest);
rung 2 is the full metric, run on the front at the end of a search. Before each climb the gate
turns the current estimate into a *lower bound* on the KL the plan will measure — the estimate
times the 5 % quantile of measured/estimated ratios seen so far, times a safety factor — and
stops the climb when an evaluated plan has a lower KL at no more latency and memory (the plan
could not reach the front), or when the bound already breaks the quality budget.

Optuna's ``Trial.report``/``should_prune`` exist for single-objective studies only, so the gate
is ours: a stopped trial is told PRUNED with the rung it reached and the reason in user attrs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from autocompress.evaluate.metrics import Fidelity


@dataclass
class Ladder:
    min_history: int = 8  # ratios needed before a rung may stop anything
    quantile: float = 0.05
    safety: float = 0.8
    quality_limit: float | None = None  # the quality_loss budget (KL), if any
    points: list[tuple[float, float, float, int]] = field(default_factory=list)  # (kl, latency, memory, trial)
    ratios: dict[str, list[float]] = field(default_factory=lambda: {"rung0": [], "partial": []})

    def observe(self, trial: int, kl: float, latency: float, memory: float, **estimates: float) -> None:
        """Record an evaluated plan and how its measured KL compares with each earlier estimate."""
        self.points.append((kl, latency, memory, trial))
        for stage, est in estimates.items():
            if est is not None and math.isfinite(est) and est > 0 and math.isfinite(kl):
                self.ratios[stage].append(kl / est)

    def lower_bound(self, stage: str, estimate: float | None) -> float | None:
        """Give a KL the plan should measure at least, or None while too little is known."""
        seen = self.ratios[stage]
        if estimate is None or not math.isfinite(estimate) or len(seen) < self.min_history:
            return None
        return max(estimate, 0.0) * float(np.quantile(seen, self.quantile)) * self.safety

    def blocker(self, kl_bound: float | None, latency: float, memory: float) -> str | None:
        """Give why a plan whose KL is at least ``kl_bound`` cannot reach the front (None: it still can)."""
        if kl_bound is None:
            return None
        if self.quality_limit is not None and kl_bound > self.quality_limit:
            return f"KL ≥ {kl_bound:.4g} breaks the quality budget {self.quality_limit:g}"
        for kl, lat, mem, trial in self.points:
            if kl < kl_bound and lat <= latency and mem <= memory:
                return f"KL ≥ {kl_bound:.4g} is dominated by trial {trial} (KL {kl:.4g}, {lat:.4g} ms, {mem:.4g} MB)"
        return None


def merge(parts: list[tuple[Fidelity, int]]) -> Fidelity:
    """Combine proxy results measured on disjoint row sets (weights: rows in each part)."""
    n = sum(w for _, w in parts)

    def mean(attr: str) -> float:
        return sum(getattr(f, attr) * w for f, w in parts) / n

    return Fidelity(kl=mean("kl"), top1_agreement=mean("top1_agreement"), topk_kl=mean("topk_kl"))
