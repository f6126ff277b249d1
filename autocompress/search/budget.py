"""Budgets: hard limits on predicted cost or measured quality loss."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from autocompress.errors import BudgetError

if TYPE_CHECKING:
    from autocompress.hardware import CostModel
    from autocompress.space import SearchSpace, SpaceContext

BUDGET_KEYS = {
    "latency_ms": "decode latency per token on the target (ms)",
    "prefill_ms": "prefill latency for the prompt on the target (ms)",
    "memory_mb": "memory on the target: weights + KV cache + runtime (MB)",
    "energy_mj": "energy per decoded token on the target (mJ)",
    "quality_loss": "KL divergence to the base model (nats per token)",
}


@dataclass(frozen=True)
class Budget:
    """Hard constraints; None means unconstrained. A plan over a cost budget is never evaluated."""

    latency_ms: float | None = None
    prefill_ms: float | None = None
    memory_mb: float | None = None
    energy_mj: float | None = None
    quality_loss: float | None = None

    def __post_init__(self) -> None:
        for key, value in asdict(self).items():
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise BudgetError(f"budget {key} must be a finite number, got {value!r}")
            if value <= 0:
                raise BudgetError(f"budget {key} must be positive, got {value}")

    @classmethod
    def parse(cls, items: Iterable[str]) -> Budget:
        """Parse ``KEY=VALUE`` strings such as ``latency_ms=40``."""
        values: dict[str, float] = {}
        for item in items:
            key, sep, raw = item.partition("=")
            key = key.strip()
            if not sep:
                raise BudgetError(f"budget {item!r} must look like KEY=VALUE, e.g. latency_ms=40")
            if key not in BUDGET_KEYS:
                raise BudgetError(f"unknown budget {key!r}; allowed: {', '.join(BUDGET_KEYS)}")
            try:
                values[key] = float(raw)
            except ValueError:
                raise BudgetError(f"budget {key} must be a number, got {raw.strip()!r}") from None
        return cls(**values)

    def cost_items(self) -> dict[str, float]:
        """Give the budgets that the cost model can check before evaluation."""
        return {k: v for k, v in asdict(self).items() if v is not None and k != "quality_loss"}

    def to_dict(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def __str__(self) -> str:
        return ", ".join(f"{k}={v:g}" for k, v in self.to_dict().items()) or "none"


def check_fits_memory(space: Any, anatomy: Any, cost_model: Any) -> None:
    """Refuse a model that does not fit the target's usable memory even at the smallest plan of the
    space, predicted from its anatomy alone (call it before any weight is loaded)."""
    from autocompress.plan import Provenance
    from autocompress.space import SpaceContext

    ctx = SpaceContext(anatomy=anatomy, drop_order=list(range(anatomy.num_blocks)), provenance=Provenance())
    costs = [cost_model.predict(p) for p in space.extreme_plans(ctx)]
    if costs and not any(c.fits_memory for c in costs):
        profile = cost_model.profile
        raise BudgetError(
            f"model {anatomy.name!r} does not fit {profile.id}: even the smallest plan in space {space.name!r} "
            f"needs {min(c.memory_mb for c in costs):.0f} MB, the target has {profile.usable_memory_GB * 1e3:.0f} MB "
            "usable; pick a smaller model or a larger target"
        )


def check_budgets_reachable(
    space: SearchSpace, ctx: SpaceContext, cost_model: CostModel, budget: Budget, profile_id: str
) -> None:
    """Refuse before searching when no plan in the space can meet a cost budget."""
    items = budget.cost_items()
    if not items:
        return
    costs = [cost_model.predict(p) for p in space.extreme_plans(ctx)]
    for key, limit in items.items():
        best = min(getattr(c, key) for c in costs)
        if best > limit:
            raise BudgetError(
                f"no plan in space {space.name!r} can meet {key}={limit:g}: the best in this space is "
                f"{best:.3g} on {profile_id}"
            )
