"""A learned quality predictor: plan features + sensitivity sums → KL, trained on evaluated trials.

The sensitivity table (rung 0) is additive: it cannot see that two compressed neighbours hurt more
together than apart. A gradient-boosted regressor on a handful of plan features (the table's sums
per technique, parameter-weighted bits / sparsity / rank, kept width and depth) learns those
interactions from the trials the search has already evaluated. Its cross-validated rank agreement
with the measured KL is reported, and the search uses it to screen proposals only while it ranks
better than the table alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from autocompress.model.anatomy import ModelAnatomy
from autocompress.plan import Plan

KINDS = ("quant", "prune", "rank", "heads", "mlp", "drop")
EPS = 1e-4  # KL floor inside the log target
FEATURE_NAMES = (
    *(f"rung0_{k}" for k in KINDS),
    "rung0_total",
    "mean_bits",
    "frac_le4_bits",
    "frac_le3_bits",
    "attn_mean_bits",
    "mlp_mean_bits",
    "mean_sparsity",
    "frac_2of4",
    "mean_rank_ratio",
    "heads_kept",
    "mlp_kept",
    "blocks_dropped",
)


def _kind(key: str) -> str:
    part = key.split("|", 1)[1]
    for k in KINDS:
        if part.startswith(k):
            return k
    return "quant"


def plan_features(plan: Plan, anatomy: ModelAnatomy, table_entries: Sequence[tuple[str, float]] = ()) -> list[float]:
    """Give the predictor's feature vector of ``plan`` (names in FEATURE_NAMES).

    ``table_entries`` are the (key, KL) sensitivity-table entries the plan switches on.
    """
    sums = dict.fromkeys(KINDS, 0.0)
    for key, kl in table_entries:
        sums[_kind(key)] += kl
    dropped = set(plan.drop_blocks)
    w = bits = le4 = le3 = sparsity = two4 = rank = 0.0
    group_bits = {"attn": [0.0, 0.0], "mlp": [0.0, 0.0]}
    for site in anatomy.linears:
        if site.block in dropped:
            continue
        c = plan.choice_for(site.name)
        n = float(site.params)
        b = float(c.bits) if c.quantized else 16.0
        w += n
        bits += n * b
        le4 += n * (b <= 4)
        le3 += n * (b <= 3)
        sparsity += n * c.sparsity
        two4 += n * (c.sparsity_pattern == "2:4" and c.pruned)
        rank += n * (c.rank_ratio if c.rank_ratio is not None else 1.0)
        g = group_bits.get(site.group, group_bits["mlp"])
        g[0] += n * b
        g[1] += n
    w = w or 1.0
    heads = mlp = 0.0
    for blk in anatomy.blocks:
        bc = plan.block_choice(blk.index)
        heads += (bc.keep_heads if bc.keep_heads is not None else blk.num_heads) / blk.num_heads
        mlp += (bc.keep_mlp_channels if bc.keep_mlp_channels is not None else blk.mlp_dim) / blk.mlp_dim
    nb = max(anatomy.num_blocks, 1)
    return [
        *(math.log1p(sums[k]) for k in KINDS),
        math.log1p(sum(sums.values())),
        bits / w,
        le4 / w,
        le3 / w,
        *(g[0] / g[1] if g[1] else 16.0 for g in group_bits.values()),
        sparsity / w,
        two4 / w,
        rank / w,
        heads / nb,
        mlp / nb,
        len(dropped) / nb,
    ]


@dataclass
class QualityPredictor:
    """Gradient-boosted regressor of log(KL) with a cross-validated lower bound.

    ``fit`` also measures the cross-validated Spearman rank agreement (``cv_spearman``) and keeps
    the 5 % quantile of the cross-validated residuals, so ``lower_bound`` is a KL the true value
    falls below only about 5 % of the time.
    """

    min_samples: int = 16
    folds: int = 5
    seed: int = 0
    cv_spearman: float = math.nan
    n_samples: int = 0
    _model: object | None = field(default=None, repr=False)
    _low_residual: float = 0.0

    @property
    def ready(self) -> bool:
        return self._model is not None

    def fit(self, features: Sequence[Sequence[float]], kl: Sequence[float]) -> QualityPredictor:
        """Fit on evaluated trials; with fewer than ``min_samples`` the predictor stays unready."""
        from scipy.stats import spearmanr
        from sklearn.ensemble import GradientBoostingRegressor
        from sklearn.model_selection import KFold, cross_val_predict

        x = np.asarray(features, dtype=np.float64)
        y = np.log(np.asarray(kl, dtype=np.float64) + EPS)
        self.n_samples = len(y)
        if len(y) < self.min_samples or np.ptp(y) == 0:
            self._model = None
            return self

        def make() -> GradientBoostingRegressor:
            return GradientBoostingRegressor(
                n_estimators=150, max_depth=3, learning_rate=0.05, subsample=0.8, random_state=self.seed
            )

        cv = KFold(n_splits=min(self.folds, len(y)), shuffle=True, random_state=self.seed)
        pred = cross_val_predict(make(), x, y, cv=cv)
        self.cv_spearman = float(spearmanr(pred, y)[0])
        self._low_residual = float(np.quantile(y - pred, 0.05))
        self._model = make().fit(x, y)
        return self

    def predict(self, features: Sequence[Sequence[float]]) -> np.ndarray:
        """Give predicted KL for each feature row."""
        if self._model is None:
            raise RuntimeError("the predictor is not fitted yet")
        return np.exp(self._model.predict(np.asarray(features, dtype=np.float64))) - EPS

    def lower_bound(self, features: Sequence[float]) -> float:
        """Give a KL the plan's measured KL is expected to exceed (5 % quantile of CV residuals)."""
        y = float(self._model.predict(np.asarray([features], dtype=np.float64))[0])
        return max(math.exp(y + self._low_residual) - EPS, 0.0)
