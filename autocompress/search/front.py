"""The front of a study: its evaluated trials as candidates, the feasible Pareto front and the
baselines, the full metric on a spread of the front, trial counts and rank agreement between rungs,
and the result written out (pareto.json, summary.md, hypervolume.png)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from autocompress._io import atomic_write_text
from autocompress.evaluate import EvaluationError, Evaluator
from autocompress.hardware import CostModel
from autocompress.plan import ModelRef, Plan
from autocompress.recover.run import rebuild
from autocompress.search import hypervolume
from autocompress.search.budget import Budget
from autocompress.search.pareto import pareto_front
from autocompress.search.report import describe_plan, write_outputs
from autocompress.search.result import Candidate, SearchResult
from autocompress.workbench import Workbench

FULL_KEY = "full:"  # study user attr prefix: rung-2 results keyed by plan hash


def candidates_of(opt: optuna.Study, study_dir: Path, anatomy: Any) -> list[Candidate]:
    """Give every evaluated trial of a study as a Candidate (full metrics attached when present)."""
    out = []
    full = {k[len(FULL_KEY) :]: v for k, v in opt.user_attrs.items() if k.startswith(FULL_KEY)}
    for t in opt.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        path = study_dir / "plans" / f"{t.number}.yaml"
        if not path.is_file():
            continue
        plan = Plan.load(path)
        metrics = {"kl": t.values[0], "top1_agreement": t.user_attrs.get("top1_agreement", math.nan)}
        metrics.update(full.get(t.user_attrs.get("plan_hash", ""), {}))
        out.append(
            Candidate(
                trial=t.number,
                plan=plan,
                metrics=metrics,
                cost=t.user_attrs["cost"],
                baseline=t.user_attrs.get("baseline"),
                seed=t.user_attrs.get("seed"),
                plan_path=path,
                description=describe_plan(plan, anatomy),
            )
        )
    return out


def front_and_baselines(cands: list[Candidate], budget: Budget) -> tuple[list[Candidate], dict[str, Candidate]]:
    """Give the feasible Pareto front (sorted by latency) and the baselines by name."""
    feasible = [c for c in cands if _feasible(c, budget)]
    front = [feasible[i] for i in pareto_front([c.objectives for c in feasible])]
    front.sort(key=lambda c: (c.cost["latency_ms"], c.metrics["kl"]))
    baselines: dict[str, Candidate] = {}
    for c in sorted(cands, key=lambda c: c.trial):
        if c.baseline and c.baseline not in baselines:
            baselines[c.baseline] = c
    return front, baselines


def _feasible(c: Candidate, budget: Budget) -> bool:
    if any(c.cost[k] > v for k, v in budget.cost_items().items()):
        return False
    return budget.quality_loss is None or c.metrics["kl"] <= budget.quality_loss


def finish(
    opt: optuna.Study,
    wb: Workbench,
    evaluator: Evaluator,
    cost_model: CostModel,
    budget: Budget,
    profile_id: str,
    study_dir: Path,
    url: str,
    full_eval: int,
    say: Callable[[str], None],
) -> SearchResult:
    """Run the full metric on the front and the baselines, then write pareto.json and summary.md."""
    anatomy = wb.lm.anatomy
    front, baselines = front_and_baselines(candidates_of(opt, study_dir, anatomy), budget)
    if evaluator.full_metric is not None and full_eval > 0:
        chosen = spread(front, full_eval)
        todo = {c.plan.hash(): c for c in [*chosen, *baselines.values()]}
        todo = {h: c for h, c in todo.items() if f"{FULL_KEY}{h}" not in opt.user_attrs}
        if todo:
            unit = "articles" if anatomy.task == "encoder" else "tokens"
            n_eval = f"{wb.data.eval.shape[0] if unit == 'articles' else int(wb.data.eval.numel())} held-out {unit}"
            say(f"full metric ({evaluator.full_metric} on {n_eval}) for {len(todo)} plans")
        cache = wb.eval_cache()

        def full_metric(plan: Plan) -> dict[str, float]:
            with wb.evaluating(plan, rebuild(wb, plan)) as model:  # a recovered candidate: its recovery too
                return evaluator.full(model).metrics()  # ppl, bpc; or accuracy, macro_f1, ece

        for h, c in todo.items():
            with contextlib.suppress(EvaluationError):
                opt.set_user_attr(f"{FULL_KEY}{h}", cache.get_or_compute("full", h, lambda c=c: full_metric(c.plan)))
        base = opt.user_attrs.get("base_full")
        if base is None:
            base = evaluator.base_full().metrics()
            opt.set_user_attr("base_full", base)
        full = {k[len(FULL_KEY) :]: v for k, v in opt.user_attrs.items() if k.startswith(FULL_KEY)}
        for c in [*front, *baselines.values()]:
            c.metrics.update(full.get(c.plan.hash(), {}))
    else:
        base = {}
    base_ref = ModelRef.of(anatomy)
    base_cost = cost_model.predict(Plan(model=base_ref))
    base_metrics = {**base, "kl": 0.0, "latency_ms": base_cost.latency_ms, "memory_mb": base_cost.memory_mb}
    agreement = _agreement(opt, [*front, *baselines.values()])
    if "predictor" in opt.user_attrs:
        agreement["predictor"] = opt.user_attrs["predictor"]
    opt.set_user_attr("agreement", agreement)
    counts = trial_counts(opt)
    hv_curve = hypervolume.study_curve(opt)  # one pass for the summary's figure and the plot
    result = SearchResult(
        study_name=opt.study_name,
        study_dir=study_dir,
        storage=url,
        profile=profile_id,
        pareto=front,
        baselines=baselines,
        base_metrics=base_metrics,
        counts=counts,
        agreement=agreement,
        hypervolume=hypervolume.final(hv_curve),
    )
    write_outputs(result, budget, anatomy)
    hypervolume.plot(opt, study_dir / "hypervolume.png", hv_curve)
    atomic_write_text(study_dir / "storage.txt", url + "\n")
    return result


def trial_counts(opt: optuna.Study) -> dict[str, int]:
    """Give how many trials were evaluated, screened out by the cost model, stopped by the ladder, failed."""
    trials = opt.get_trials(deepcopy=False)
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    return {
        "evaluated": sum(t.state == TrialState.COMPLETE for t in trials),
        "screened_out": sum("ladder" not in t.user_attrs for t in pruned),
        "stopped_rung0": sum(t.user_attrs.get("rung") == 0 for t in pruned if "ladder" in t.user_attrs),
        "stopped_rung1": sum(t.user_attrs.get("rung") == 1 for t in pruned if "ladder" in t.user_attrs),
        "failed": sum(t.state == TrialState.FAIL for t in trials),
    }


def _agreement(opt: optuna.Study, with_full: list[Candidate]) -> dict[str, dict[str, float]]:
    """Give rank agreement between adjacent rungs on the trials that reached both.

    rung0→rung1: the sensitivity table's additive prediction vs the measured KL, on all evaluated
    trials; rung1→rung2: the measured KL vs perplexity, on the plans that got the full metric.
    """
    from scipy.stats import kendalltau, spearmanr

    pairs = {"rung0_vs_rung1": [], "rung1_vs_rung2": []}
    for t in opt.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if "rung0_kl" in t.user_attrs:
            pairs["rung0_vs_rung1"].append((t.user_attrs["rung0_kl"], t.values[0]))
    seen = set()
    for c in with_full:
        full = c.metrics.get("ppl", 1.0 - c.metrics.get("accuracy", math.nan))  # classifiers: error rate
        if math.isfinite(full) and c.trial not in seen:
            seen.add(c.trial)
            pairs["rung1_vs_rung2"].append((c.metrics["kl"], full))
    out = {}
    for name, xy in pairs.items():
        if len(xy) >= 3 and len({x for x, _ in xy}) > 1 and len({y for _, y in xy}) > 1:
            x, y = zip(*xy, strict=True)
            out[name] = {"n": len(xy), "spearman": float(spearmanr(x, y)[0]), "kendall": float(kendalltau(x, y)[0])}
    return out


def spread(front: list[Candidate], k: int) -> list[Candidate]:
    """Give up to ``k`` front points spread evenly along the latency axis."""
    if len(front) <= k:
        return list(front)
    idx = sorted({round(i * (len(front) - 1) / (k - 1)) for i in range(k)}) if k > 1 else [0]
    return [front[i] for i in idx]
