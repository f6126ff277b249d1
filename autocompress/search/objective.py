"""The objective: one process's trial loop (ask, turn the trial into a plan, screen it by the cost
model and the fidelity ladder, apply and score it on the KL proxy, tell), for the main search or a worker."""

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
from autocompress.evaluate.ladder import Ladder, merge
from autocompress.evaluate.predictor import QualityPredictor, plan_features
from autocompress.evaluate.sensitivity import SensitivityTable, plan_keys
from autocompress.hardware import CostModel
from autocompress.plan import Plan
from autocompress.search import heartbeat, hypervolume
from autocompress.search.budget import Budget
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

    gate: bool = True  # let the fidelity ladder stop proposals that cannot reach the front

    def __post_init__(self) -> None:
        self.cache = self.wb.eval_cache()
        self.interrupts = InterruptGate()
        self.ladder = Ladder(quality_limit=self.budget.quality_loss)
        self.predictor = QualityPredictor()
        self.samples: list[tuple[list[float], float, float]] = []  # (features, rung-0 sum, measured KL)
        self._fitted_at = 0
        self._table_spearman = math.nan
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
            self.ladder.observe(t.number, kl, lat, mem, rung0=ua.get("rung0_kl"), partial=ua.get("rung1_partial_kl"))
            path = self.study_dir / "plans" / f"{t.number}.yaml"
            if self.table is not None and path.is_file():
                est = self._estimate(Plan.load(path))
                if est is not None:
                    self.samples.append((est[1], est[0], kl))

    def _estimate(self, plan: Plan) -> tuple[float, list[float]] | None:
        """Give the rung-0 sum and the predictor features of a plan (None without a complete table)."""
        if self.table is None:
            return None
        entries = [(k, self.table.entries.get(k)) for k in plan_keys(plan, self.space, self.ctx)]
        if any(v is None for _, v in entries):
            return None
        return sum(v for _, v in entries), plan_features(plan, self.ctx.anatomy, entries)

    def _refit(self) -> None:
        """Refit the learned predictor every 8 new samples; it screens only while it ranks better than the table."""
        from scipy.stats import spearmanr

        if len(self.samples) - self._fitted_at < 8:
            return
        self._fitted_at = len(self.samples)
        feats, rung0, kl = zip(*self.samples, strict=True)
        self.predictor.fit(feats, kl)
        if not self.predictor.ready:
            return
        self._table_spearman = float(spearmanr(rung0, kl)[0])
        self.opt.set_user_attr(
            "predictor",
            {
                "n": self.predictor.n_samples,
                "cv_spearman": self.predictor.cv_spearman,
                "table_spearman": self._table_spearman,
                "screens": self._predictor_screens,
            },
        )

    @property
    def _predictor_screens(self) -> bool:
        return self.predictor.ready and self.predictor.cv_spearman > self._table_spearman

    def _stop(self, trial: optuna.Trial, rung: int, why: str) -> None:
        trial.set_user_attr("rung", rung)
        trial.set_user_attr("ladder", f"stopped at rung {rung}: {why}")
        self.opt.tell(trial, state=TrialState.PRUNED)

    def _climb(self, trial: optuna.Trial, plan: Plan, cost: Any, est: tuple[float, list[float]] | None) -> dict | None:
        """Measure the KL proxy in two stages, stopping when the plan cannot reach the front; give the result."""
        lat, mem = cost.latency_ms, cost.memory_mb
        gate = self.gate and not ({"baseline", "seed"} & set(trial.user_attrs))  # seeds are always measured
        if gate and est is not None:
            if self._predictor_screens:
                bound, source = self.predictor.lower_bound(est[1]), "learned predictor"
            else:
                bound, source = self.ladder.lower_bound("rung0", est[0]), "sensitivity table"
            why = self.ladder.blocker(bound, lat, mem)
            if why:
                self._stop(trial, 0, f"{source}: {why}")
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
            why = self.ladder.blocker(self.ladder.lower_bound("partial", first.kl), lat, mem) if gate else None
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
                    est = self._estimate(plan)
                    if est is not None:
                        trial.set_user_attr("rung0_kl", est[0])
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
                    self.ladder.observe(
                        trial.number,
                        kl,
                        cost.latency_ms,
                        cost.memory_mb,
                        rung0=est[0] if est else None,
                        partial=res.get("partial_kl"),
                    )
                    if est is not None:
                        self.samples.append((est[1], est[0], kl))
                        self._refit()
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
