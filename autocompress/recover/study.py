"""Recover trials of a finished study and add each recovered model to it as a new candidate.

A recovered model has the same plan choices, hence the same predicted costs; only quality
changes. It is stored as a new COMPLETE trial (same parameters and costs, new KL; user attr
``recovered_from``), its plan (with the ``recovery`` settings) in ``plans/<trial>.yaml`` and its
perplexity under the study's ``full:<plan hash>`` attr; then the front and summary are rewritten.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from autocompress.calib import DataConfig
from autocompress.errors import StudyError
from autocompress.evaluate import Evaluator
from autocompress.hardware import CostModel, load_profile
from autocompress.model.anatomy import ModelAnatomy
from autocompress.plan import ModelRef, Plan
from autocompress.recover.run import recover
from autocompress.recover.train import RecoverySettings, StepInfo
from autocompress.search.budget import Budget
from autocompress.search.engine import FULL_KEY, candidates_of, front_and_baselines, load_finished_study
from autocompress.search.report import write_outputs
from autocompress.search.result import Candidate, SearchResult
from autocompress.workbench import Workbench

CONSTRAINT_PREFIX = "constraints:"  # where Optuna keeps Trial.set_constraint values


@dataclass(frozen=True)
class RecoveredTrial:
    """One recovered candidate: the new trial, the trial it came from, and quality before/after."""

    trial: int
    recovered_from: int
    plan: Plan
    plan_path: Path
    steps: int
    kl_before: float
    kl_after: float
    full_before: dict[str, float] | None  # full metric: ppl/bpc for causal LMs, accuracy etc. for classifiers
    full_after: dict[str, float] | None


def full_metrics(result: Any) -> dict[str, float] | None:
    """Give the full metric's result as the study stores it (None when there is none)."""
    if result is None:
        return None
    return result.metrics() if hasattr(result, "metrics") else {"ppl": result.ppl, "bpc": result.bpc}


def _load(study: str, out: Path, storage: str | None) -> tuple[optuna.Study, Path, str, dict]:
    opt, study_dir, url, settings = load_finished_study(study, out, storage)
    if "run" not in settings:
        raise StudyError(f"study {study!r} was not written by this version of autocompress (no stored settings)")
    return opt, study_dir, url, settings


def _chosen(cands: list[Candidate], trials: list[int] | str, budget: Budget) -> list[Candidate]:
    if trials == "pareto":
        front, _ = front_and_baselines(cands, budget)
        return [c for c in front if c.plan.recovery is None]
    by_trial = {c.trial: c for c in cands}
    chosen = []
    for n in trials:
        if n not in by_trial:
            raise StudyError(f"trial {n} is not an evaluated trial of this study (with a saved plan)")
        if by_trial[n].plan.recovery is not None:
            raise StudyError(f"trial {n} is already a recovered model; recover the trial it came from")
        chosen.append(by_trial[n])
    return chosen


def _add_trial(opt: optuna.Study, src: optuna.trial.FrozenTrial, values: list[float], attrs: dict[str, Any]) -> int:
    system = {k: v for k, v in src.system_attrs.items() if k.startswith(CONSTRAINT_PREFIX)}
    if f"{CONSTRAINT_PREFIX}quality_loss" in system and "quality_loss" in attrs:
        system[f"{CONSTRAINT_PREFIX}quality_loss"] = values[0] - attrs.pop("quality_loss")
    attrs.pop("quality_loss", None)
    trial = optuna.trial.create_trial(
        state=TrialState.COMPLETE,
        values=values,
        params=src.params,
        distributions=src.distributions,
        user_attrs=attrs,
        system_attrs=system,
    )
    trial._validate()
    # what Study.add_trial does, keeping the new trial's id (its number is not known otherwise under concurrency)
    trial_id = opt._storage.create_new_trial(opt._study_id, template_trial=trial)
    return opt._storage.get_trial_number_from_id(trial_id)


def recover_trials(
    study: str,
    trials: list[int] | str,
    out: str | Path = "studies",
    settings: RecoverySettings | None = None,
    log: Callable[[str], None] | None = None,
    storage: str | None = None,
    on_step: Callable[[StepInfo, Any], None] | None = None,
    wb: Workbench | None = None,
    device: str | None = "auto",
) -> list[RecoveredTrial]:
    """Recover ``trials`` (trial numbers, or ``"pareto"`` for the front) of a finished study; give the new trials.

    ``wb``: the study's workbench when the caller has it open (the search), else it is opened here
    on ``device`` (auto | cpu | cuda | cuda:N: where the distillation trains).
    """
    say = log or (lambda _m: None)
    settings = settings or RecoverySettings()
    opt, study_dir, url, stored = _load(study, Path(out), storage)
    anatomy = ModelAnatomy.from_dict(stored["anatomy"])
    budget = Budget(**stored.get("budgets", {}))
    chosen = _chosen(candidates_of(opt, study_dir, anatomy), trials, budget)
    if not chosen:
        say("nothing to recover")
        return []
    run = stored["run"]
    model = None if run.get("model") in (None, "default") else run["model"]
    wb = wb or Workbench.open(model, DataConfig(**run["data"]), log=say, device=device)
    if wb.data.data_hash != stored.get("data_hash") or wb.lm.anatomy.model_hash != stored.get("model_hash"):
        raise StudyError(f"the model or data here differ from those study {study!r} was run with")
    wb.numerics = stored.get("numerics", "exact")  # evaluate as the study did
    cost_model = CostModel(load_profile(stored["profile"]), anatomy, **stored.get("scenario", {}))
    evaluator = Evaluator(wb.lm.model, wb.data, anatomy.task)
    full_attrs = {k[len(FULL_KEY) :]: v for k, v in opt.user_attrs.items() if k.startswith(FULL_KEY)}
    done: list[RecoveredTrial] = []
    for c in chosen:
        say(f"recovering trial {c.trial}: {c.description}")
        model_c = wb.apply(c.plan)
        with wb.evaluating(c.plan, model_c):
            before = full_attrs.get(c.plan.hash()) or full_metrics(evaluator.full(model_c))
        t0 = time.time()
        new_plan = recover(wb, c.plan, model_c, settings, on_step)  # trains without the runtime's rounding
        with wb.evaluating(new_plan, model_c):
            fid = evaluator.proxy(model_c)
            full = full_metrics(evaluator.full(model_c))
        cost = cost_model.predict(new_plan).to_dict()
        attrs = {
            "cost": cost,
            "plan_hash": new_plan.hash(),
            "top1_agreement": fid.top1_agreement,
            "rung": 1,
            "recovered_from": c.trial,
            "recovery_s": time.time() - t0,
        }
        if budget.quality_loss is not None:
            attrs["quality_loss"] = budget.quality_loss
        src = opt.trials[c.trial]
        number = _add_trial(opt, src, [fid.kl, cost["latency_ms"], cost["memory_mb"]], attrs)
        new_plan = new_plan.with_provenance(trial=number)
        path = new_plan.save(study_dir / "plans" / f"{number}.yaml")
        if full is not None:
            opt.set_user_attr(f"{FULL_KEY}{new_plan.hash()}", full)
        done.append(
            RecoveredTrial(
                trial=number,
                recovered_from=c.trial,
                plan=new_plan,
                plan_path=path,
                steps=new_plan.recovery.steps,
                kl_before=c.metrics["kl"],
                kl_after=fid.kl,
                full_before=before,
                full_after=full,
            )
        )
        say(f"trial {c.trial} → {number}: KL {c.metrics['kl']:.4g} → {fid.kl:.4g} ({new_plan.recovery.steps} steps)")
    rewrite_front(opt, study_dir, url, stored, anatomy, cost_model, budget, evaluator)
    return done


def rewrite_front(
    opt: optuna.Study,
    study_dir: Path,
    url: str,
    stored: dict,
    anatomy: ModelAnatomy,
    cost_model: CostModel,
    budget: Budget,
    evaluator: Evaluator,
) -> SearchResult:
    """Recompute the study's front from all its candidates and rewrite pareto.json / summary.md."""
    front, baselines = front_and_baselines(candidates_of(opt, study_dir, anatomy), budget)
    base = opt.user_attrs.get("base_full")
    if base is None and (base := full_metrics(evaluator.base_full())) is not None:
        opt.set_user_attr("base_full", base)
    base_cost = cost_model.predict(Plan(model=ModelRef.of(anatomy)))
    states = [t.state for t in opt.get_trials(deepcopy=False)]
    result = SearchResult(
        study_name=opt.study_name,
        study_dir=study_dir,
        storage=url,
        profile=stored["profile"],
        pareto=front,
        baselines=baselines,
        base_metrics={**(base or {}), "kl": 0.0, "latency_ms": base_cost.latency_ms, "memory_mb": base_cost.memory_mb},
        counts={
            "evaluated": states.count(TrialState.COMPLETE),
            "screened_out": states.count(TrialState.PRUNED),
            "failed": states.count(TrialState.FAIL),
        },
        agreement=opt.user_attrs.get("agreement", {}),
    )
    write_outputs(result, budget, anatomy)
    return result


__all__ = ["RecoveredTrial", "recover_trials", "rewrite_front"]
