"""What a search gives back: candidates on the Pareto front, with plans, metrics and costs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autocompress.plan import Plan

OBJECTIVES = ("quality_loss", "latency_ms", "memory_mb")


@dataclass
class Candidate:
    """One evaluated plan: its trial number, plan, quality metrics and predicted cost."""

    trial: int
    plan: Plan
    metrics: dict[str, float]  # kl, top1_agreement; ppl, bpc once the full metric ran
    cost: dict[str, Any]  # Cost.to_dict() on the study's hardware profile
    baseline: str | None = None
    seed: str | None = None  # name of the mixed-precision seed this trial was enqueued as
    plan_path: Path | None = None
    description: str = ""

    @property
    def kind(self) -> str:
        return self.baseline or (f"seed {self.seed}" if self.seed else "searched")

    @property
    def objectives(self) -> tuple[float, float, float]:
        return (self.metrics["kl"], self.cost["latency_ms"], self.cost["memory_mb"])

    def to_dict(self) -> dict[str, Any]:
        return {
            "trial": self.trial,
            "baseline": self.baseline,
            "seed": self.seed,
            "plan_hash": self.plan.hash(),
            "plan_path": str(self.plan_path) if self.plan_path else None,
            "description": self.description,
            "metrics": self.metrics,
            "cost": self.cost,
        }


@dataclass
class SearchResult:
    """The outcome of ``autocompress.search``: the front, the baselines and where it all lives."""

    study_name: str
    study_dir: Path
    storage: str
    profile: str
    pareto: list[Candidate]
    baselines: dict[str, Candidate]
    base_metrics: dict[str, float]
    counts: dict[str, int] = field(default_factory=dict)
    agreement: dict[str, dict[str, float]] = field(default_factory=dict)  # rank agreement between rungs
    elapsed_s: float = 0.0
    setup_s: float = 0.0  # of elapsed_s, before the first trial (not charged to the time budget)
    hypervolume: float | None = None  # of all evaluated trials, objectives scaled as in hypervolume.png

    def to_dict(self) -> dict[str, Any]:
        """Give the result as plain data (what ``autocompress --json search`` prints)."""
        return {
            "study": self.study_name,
            "study_dir": str(self.study_dir),
            "storage": self.storage,
            "profile": self.profile,
            "base": self.base_metrics,
            "counts": self.counts,
            "hypervolume": self.hypervolume,
            "agreement": self.agreement,
            "elapsed_s": self.elapsed_s,
            "setup_s": self.setup_s,
            "pareto": [c.to_dict() for c in self.pareto],
            "baselines": {k: c.to_dict() for k, c in self.baselines.items()},
        }
