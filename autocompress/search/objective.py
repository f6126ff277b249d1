"""The objective: one process's trial loop (ask, turn the trial into a plan, screen it by the cost
model and the gate (``gate.py``), apply and score it on the KL proxy, tell), for the main search or a worker."""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from autocompress.errors import AutocompressError, StudyError
from autocompress.evaluate import Evaluator
from autocompress.evaluate.ladder import merge
from autocompress.evaluate.sensitivity import SensitivityTable
from autocompress.hardware import CostModel
from autocompress.plan import Plan
from autocompress.search import heartbeat, hypervolume
from autocompress.search.budget import Budget
from autocompress.search.gate import Estimate, Gate
from autocompress.search.interrupt import InterruptGate
from autocompress.search.report import describe_plan
from autocompress.search.samplers import SeededSampler
from autocompress.space import SearchSpace, SpaceContext
from autocompress.workbench import Workbench

MAX_FAILS_IN_A_ROW = 20


@dataclass
class TrialRunner:
    """Everything one process needs to evaluate trials of a study (the main search or a worker)."""

    opt: optuna.Study
    space: SearchSpace
    ctx: SpaceContext
    wb: Workbench
    evaluator: Evaluator
    cost_model: CostModel
    budget: Budget
    study_dir: Path
    table: SensitivityTable | None

    gated: bool = True  # let the gate stop proposals that cannot reach the front

    def __post_init__(self) -> None:
        self.cache = self.wb.eval_cache()
        self.interrupts = InterruptGate()
        self.gate = Gate(
            self.space,
            self.ctx,
            self.table,
            quality_limit=self.budget.quality_loss,
            enabled=self.gated,
            publish=lambda figures: self.opt.set_user_attr("predictor", figures),
        )
        self.known: dict[str, dict[str, float]] = {}  # plan hash -> proxy result, for this study
        for t in self.opt.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            ua = t.user_attrs
            if "plan_hash" not in ua:
                continue
            kl, lat, mem = t.values
            self.known[ua["plan_hash"]] = {
                "kl": kl,
                "top1_agreement": ua.get("top1_agreement", math.nan),
                "topk_kl": ua.get("topk_kl", math.nan),
                "partial_kl": ua.get("rung1_partial_kl", math.nan),
            }
            path = self.study_dir / "plans" / f"{t.number}.yaml"
            est = self.gate.estimate(Plan.load(path)) if self.table is not None and path.is_file() else None
            self.gate.observe(t.number, kl, lat, mem, est, ua.get("rung1_partial_kl"))

    def _stop(self, trial: optuna.Trial, rung: int, why: str) -> None:
        trial.set_user_attr("rung", rung)
        trial.set_user_attr("ladder", f"stopped at rung {rung}: {why}")
        self.opt.tell(trial, state=TrialState.PRUNED)

    def _climb(self, trial: optuna.Trial, plan: Plan, cost: Any, est: Estimate | None) -> dict | None:
        """Measure the KL proxy in two stages, stopping when the plan cannot reach the front; give the result."""
        lat, mem = cost.latency_ms, cost.memory_mb
        gated = not ({"baseline", "seed"} & set(trial.user_attrs))  # seeds are always measured
        why = self.gate.before_measuring(est, lat, mem) if gated else None
        if why:
            self._stop(trial, 0, why)
            return None
        with self.interrupts.open():  # the time goes here: Ctrl-C stops it at once
            # evaluation only: the copy shares every tensor the plan leaves unchanged with the base
            compressed = self.wb.apply(plan, share_base=True)
        with self.wb.evaluating(plan, compressed) as model:
            rows = self.evaluator.proxy_rows
            if rows < 2:
                with self.interrupts.open():
                    fid = self.evaluator.proxy(model)
                return {**asdict(fid), "partial_kl": math.nan}
            with self.interrupts.open():
                first = self.evaluator.proxy(model, slice(0, 1))
            trial.set_user_attr("rung1_partial_kl", first.kl)
            why = self.gate.after_partial(first.kl, lat, mem) if gated else None
            if why:
                self._stop(trial, 1, f"first of {rows} proxy sequences: {why}")
                return None
            with self.interrupts.open():
                rest = self.evaluator.proxy(model, slice(1, None))
        return {**asdict(merge([(first, 1), (rest, rows - 1)])), "partial_kl": first.kl}

    def run(self, trials: int, deadline: float | None, progress: Any = None) -> int:
        """Ask/evaluate/tell until the study holds ``trials`` evaluated trials (or time runs out);
        give how many this process evaluated. Other processes may work on the same study."""
        opt, space, ctx = self.opt, self.space, self.ctx
        cost_model, budget, study_dir = self.cost_model, self.budget, self.study_dir
        anatomy = ctx.anatomy

        def n_done() -> int:
            return len(opt.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))

        mine = 0
        asks = 0
        fails_in_a_row = 0
        last_reason = ""
        max_asks = trials * 50 + 200
        beat = heartbeat.Heartbeat(opt)
        task = progress.add_task("search", total=trials, completed=min(n_done(), trials)) if progress else None
        while (done := n_done()) < trials:
            if progress:
                progress.update(task, completed=done)
            if deadline is not None and time.time() > deadline:
                break
            if asks >= max_asks:
                break
            asks += 1
            # Ctrl-C waits for a safe point (see interrupt.py): none lands between ask and claim, or mid-write
            with self.interrupts.shut():
                trial = opt.ask()
                beat.track(trial)  # mark it ours; keep its heartbeat fresh; recover stale trials now and then
                try:
                    seed = opt.sampler.seed_of(trial) if isinstance(opt.sampler, SeededSampler) else None
                    if seed is not None:
                        trial.set_user_attr(seed.kind, seed.name)
                    plan = space.suggest(trial, ctx).with_provenance(trial=trial.number)
                    if seed is not None and seed.plan is not None:  # a recipe the space cannot express
                        plan = replace(Plan.from_dict(seed.plan), provenance=plan.provenance)
                        trial.set_user_attr("fixed_plan", True)  # its parameters are only the nearest setting
                    plan.validate(anatomy)
                    cost = cost_model.predict(plan)
                    phash = plan.hash()
                    trial.set_user_attr("plan_hash", phash)
                    trial.set_user_attr("plan", describe_plan(plan, anatomy))  # readable in optuna-dashboard
                    trial.set_user_attr("pid", os.getpid())
                    est = self.gate.estimate(plan)
                    if est is not None:
                        trial.set_user_attr("rung0_kl", est.table_kl)
                    trial.set_user_attr("cost", cost.to_dict())
                    violations = {k: getattr(cost, k) - v for k, v in budget.cost_items().items()}
                    for k, v in violations.items():
                        trial.set_constraint(k, v)
                    broken = [
                        f"{k} {getattr(cost, k):.3g} > {getattr(budget, k):g}" for k, v in violations.items() if v > 0
                    ]
                    if broken:
                        if budget.quality_loss is not None:
                            trial.set_constraint("quality_loss", 0.0)
                        trial.set_user_attr("screened_out", "; ".join(broken))
                        opt.tell(trial, state=TrialState.PRUNED)
                        continue
                    res = self.known.get(phash) or self.cache.get("proxy", phash)
                    if res is None:
                        res = self._climb(trial, plan, cost, est)
                        if res is None:
                            continue
                        self.cache.put("proxy", phash, res)
                    self.known[phash] = res
                    kl = res["kl"]
                    trial.set_user_attr("top1_agreement", res["top1_agreement"])
                    trial.set_user_attr("topk_kl", res["topk_kl"])
                    if math.isfinite(res.get("partial_kl", math.nan)):
                        trial.set_user_attr("rung1_partial_kl", res["partial_kl"])
                    trial.set_user_attr("rung", 1)
                    if budget.quality_loss is not None:
                        trial.set_constraint("quality_loss", kl - budget.quality_loss)
                    plan.save(study_dir / "plans" / f"{trial.number}.yaml")
                    hypervolume.record(opt, trial, [kl, cost.latency_ms, cost.memory_mb], cost_model, space, ctx)
                    opt.tell(trial, [kl, cost.latency_ms, cost.memory_mb])
                    self.gate.observe(trial.number, kl, cost.latency_ms, cost.memory_mb, est, res.get("partial_kl"))
                    self.gate.refit()
                    mine += 1
                    fails_in_a_row = 0
                    if progress:
                        front = len(opt.best_trials)  # current Pareto front (feasible trials only)
                        progress.update(
                            task, completed=min(n_done(), trials), description=f"search · front {front} · KL {kl:.3f}"
                        )
                except KeyboardInterrupt:
                    _fail(opt, trial, "interrupted by the user")
                    raise
                except Exception as exc:
                    last_reason = (
                        str(exc)
                        if isinstance(exc, AutocompressError)
                        else f"{exc.__class__.__name__}: {str(exc)[:300]}"
                    )
                    _fail(opt, trial, last_reason)
                    fails_in_a_row += 1
                    if fails_in_a_row >= MAX_FAILS_IN_A_ROW:
                        raise StudyError(
                            f"{fails_in_a_row} trials in a row failed; the last with: {last_reason}"
                        ) from None
        beat.stop()
        return mine


def _fail(opt: optuna.Study, trial: optuna.Trial, reason: str) -> None:
    """Fail a trial with its reason, unless it already finished (e.g. interrupted right after ``tell``)."""
    with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
        trial.set_user_attr("fail_reason", reason)
        opt.tell(trial, state=TrialState.FAIL)
