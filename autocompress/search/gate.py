"""The gate in front of each measurement: may this proposal still reach the front?

It joins the fidelity ladder (``evaluate.ladder``: lower bounds from the ratios measured/estimated
seen so far, and the domination test) to the two rung-0 estimates it can use: the sensitivity
table's additive sum, and the learned predictor (``evaluate.predictor``), refitted every
``REFIT_EVERY`` new samples and trusted only while its cross-validated rank correlation beats the
table's. The trial loop (``objective.TrialRunner``) asks it twice per proposal: before applying
the plan (rung 0) and after the first proxy sequence (rung 1's partial KL); it tells it every
evaluated plan.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from autocompress.evaluate.ladder import Ladder
from autocompress.evaluate.predictor import QualityPredictor, plan_features
from autocompress.evaluate.sensitivity import SensitivityTable, plan_keys
from autocompress.plan import Plan
from autocompress.space import SearchSpace, SpaceContext

REFIT_EVERY = 8  # new samples between two fits of the learned predictor


@dataclass(frozen=True)
class Estimate:
    """A plan's rung-0 estimates: the table's additive KL sum and the predictor's features."""

    table_kl: float
    features: list[float]


@dataclass
class Gate:
    """Decide whether a proposal is worth measuring (see the module docstring).

    ``enabled`` False measures every proposal (and still learns from each); ``publish`` receives the
    predictor's figures after each fit (the study stores them as a user attr)."""

    space: SearchSpace
    ctx: SpaceContext
    table: SensitivityTable | None
    quality_limit: float | None = None
    enabled: bool = True
    publish: Callable[[dict], None] | None = None
    ladder: Ladder = field(init=False)
    predictor: QualityPredictor = field(default_factory=QualityPredictor)
    samples: list[tuple[list[float], float, float]] = field(default_factory=list)  # (features, table KL, KL)

    def __post_init__(self) -> None:
        self.ladder = Ladder(quality_limit=self.quality_limit)
        self._fitted_at = 0
        self._table_spearman = math.nan

    def estimate(self, plan: Plan) -> Estimate | None:
        """Give the plan's rung-0 estimates (None without a table, or when it lacks one of the plan's keys)."""
        if self.table is None:
            return None
        entries = [(k, self.table.entries.get(k)) for k in plan_keys(plan, self.space, self.ctx)]
        if any(v is None for _, v in entries):
            return None
        return Estimate(sum(v for _, v in entries), plan_features(plan, self.ctx.anatomy, entries))

    @property
    def predictor_screens(self) -> bool:
        """True while the learned predictor ranks measured KL better than the table does."""
        return self.predictor.ready and self.predictor.cv_spearman > self._table_spearman

    def before_measuring(self, est: Estimate | None, latency: float, memory: float) -> str | None:
        """Give why a plan with these estimates and costs cannot reach the front (None: measure it)."""
        if not self.enabled or est is None:
            return None
        if self.predictor_screens:
            bound, source = self.predictor.lower_bound(est.features), "learned predictor"
        else:
            bound, source = self.ladder.lower_bound("rung0", est.table_kl), "sensitivity table"
        why = self.ladder.blocker(bound, latency, memory)
        return f"{source}: {why}" if why else None

    def after_partial(self, partial_kl: float, latency: float, memory: float) -> str | None:
        """Give why a plan whose first proxy sequence measured ``partial_kl`` cannot reach the front."""
        if not self.enabled:
            return None
        return self.ladder.blocker(self.ladder.lower_bound("partial", partial_kl), latency, memory)

    def observe(
        self,
        trial: int,
        kl: float,
        latency: float,
        memory: float,
        est: Estimate | None = None,
        partial_kl: float | None = None,
    ) -> None:
        """Learn from an evaluated plan: the ladder's ratios and front, and the predictor's samples."""
        self.ladder.observe(trial, kl, latency, memory, rung0=est.table_kl if est else None, partial=partial_kl)
        if est is not None:
            self.samples.append((est.features, est.table_kl, kl))

    def refit(self) -> None:
        """Refit the learned predictor once ``REFIT_EVERY`` samples came in since the last fit."""
        from scipy.stats import spearmanr

        if len(self.samples) - self._fitted_at < REFIT_EVERY:
            return
        self._fitted_at = len(self.samples)
        feats, table_kl, kl = zip(*self.samples, strict=True)
        self.predictor.fit(feats, kl)
        if not self.predictor.ready:
            return
        self._table_spearman = float(spearmanr(table_kl, kl)[0])
        if self.publish is not None:
            self.publish(
                {
                    "n": self.predictor.n_samples,
                    "cv_spearman": self.predictor.cv_spearman,
                    "table_spearman": self._table_spearman,
                    "screens": self.predictor_screens,
                }
            )
