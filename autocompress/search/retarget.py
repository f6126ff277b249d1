"""Re-targeting: price every evaluated plan of a finished study on another hardware profile.

Quality is hardware-independent and cost is plan-only, so this evaluates nothing: it reads the
plans and their stored metrics, runs the cost model, and writes the new profile's front beside
the study (``<study>/retarget-<profile>/pareto.json`` and ``summary.md``).
"""

from __future__ import annotations

import time
from pathlib import Path

from optuna.trial import TrialState

from autocompress.hardware import CostModel, load_profile
from autocompress.model.anatomy import ModelAnatomy
from autocompress.plan import ModelRef, Plan
from autocompress.search.budget import Budget
from autocompress.search.front import candidates_of, front_and_baselines
from autocompress.search.report import write_outputs
from autocompress.search.result import SearchResult
from autocompress.search.storage import load_finished_study


def retarget(
    study: str, hw: str, out: str | Path = "studies", storage: str | None = None, budgets: Budget | None = None
) -> SearchResult:
    """Give (and write) the Pareto front of ``study``'s evaluated plans priced on profile ``hw``."""
    t0 = time.time()
    profile = load_profile(hw)
    budget = budgets or Budget()
    opt, study_dir, url, settings = load_finished_study(study, out, storage)
    anatomy = ModelAnatomy.from_dict(settings["anatomy"])
    cost_model = CostModel(profile, anatomy, **settings.get("scenario", {}))
    cands = candidates_of(opt, study_dir, anatomy)
    for c in cands:
        c.cost = cost_model.predict(c.plan).to_dict()
    front, baselines = front_and_baselines(cands, budget)
    base_cost = cost_model.predict(Plan(model=ModelRef.of(anatomy)))
    base = {k: v for k, v in (opt.user_attrs.get("base_full") or {}).items()}
    states = [t.state for t in opt.get_trials(deepcopy=False)]
    result = SearchResult(
        study_name=study,
        study_dir=study_dir / f"retarget-{profile.id}",
        storage=url,
        profile=profile.id,
        pareto=front,
        baselines=baselines,
        base_metrics={**base, "kl": 0.0, "latency_ms": base_cost.latency_ms, "memory_mb": base_cost.memory_mb},
        counts={
            "evaluated": states.count(TrialState.COMPLETE),
            "screened_out": 0,
            "failed": states.count(TrialState.FAIL),
        },
        agreement=opt.user_attrs.get("agreement", {}),
    )
    write_outputs(result, budget, anatomy)
    result.elapsed_s = time.time() - t0
    return result
