"""The search: an Optuna multi-objective study over plans, screened by the cost model,
scored by the KL proxy, with the full metric run on the front at the end.

This module only orchestrates ``search()``; each step lives in its own module: ``storage`` (open,
resume, settings), ``table`` (the sensitivity table), ``seeding`` and ``recipe_seeds`` (the seed
plans), ``samplers`` (the proposers), ``objective`` (the trial loop), ``gate`` (may a proposal reach the front),
``worker`` (extra processes on the study), ``front`` (the front, the full metric, the outputs).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from autocompress._io import check_writable
from autocompress.calib import DataConfig
from autocompress.device import resolve_device
from autocompress.errors import StudyError
from autocompress.evaluate import Evaluator
from autocompress.hardware import CostModel, load_profile
from autocompress.model.loading import anatomy_from_config
from autocompress.search.budget import Budget, check_budgets_reachable, check_fits_memory
from autocompress.search.front import FULL_KEY, candidates_of, finish, front_and_baselines, spread
from autocompress.search.objective import TrialRunner
from autocompress.search.recipe_seeds import recipe_seeds
from autocompress.search.result import SearchResult
from autocompress.search.samplers import SAMPLERS, SeededSampler, make_sampler
from autocompress.search.seeding import anchor_savings, build_knapsack, prioritise, seed_plans
from autocompress.search.storage import (
    check_resume,
    load_finished_study,
    open_storage,
    quiet_optuna,
    recover_interrupted,
    study_settings,
)
from autocompress.search.table import SENSITIVITY_SHAPE, sensitivity_table
from autocompress.search.worker import spawn_workers
from autocompress.space import SearchSpace, SpaceContext
from autocompress.workbench import Workbench

# The names other modules, bench/ scripts and tests import from here (``recipe_seeds`` stays looked up
# in this module by ``search()``, so a test may patch it here).
__all__ = [
    "DEFAULT_TIMEOUT_S",
    "DEFAULT_TRIALS",
    "FULL_KEY",
    "SAMPLERS",
    "SENSITIVITY_SHAPE",
    "TrialRunner",
    "candidates_of",
    "front_and_baselines",
    "load_finished_study",
    "open_storage",
    "quiet_optuna",
    "recipe_seeds",
    "search",
    "spread",
]

DEFAULT_TRIALS = 60
DEFAULT_TIMEOUT_S = 540.0


def search(
    model: str | Path | None = None,
    hw: str = "jetson",
    budgets: Budget | None = None,
    space: str | Path = "default",
    trials: int | None = None,
    timeout: float | None = None,
    study: str | None = None,
    storage: str | None = None,
    out: str | Path = "studies",
    seed: int = 0,
    data: DataConfig | None = None,
    sampler: str = "nsga2",
    full_eval: int = 8,
    prompt_tokens: int = 128,
    context_tokens: int = 1024,
    jobs: int = 1,
    log: Callable[[str], None] | None = None,
    progress: Any = None,
    device: str | None = "auto",
    max_seeds: int | None = None,
) -> SearchResult:
    """Search for Pareto-optimal compression plans of ``model`` on hardware ``hw``.

    Objectives (all minimised): KL to the base model, predicted decode latency per token,
    predicted memory. Budgets are hard constraints; a plan whose predicted cost breaks one is
    recorded as screened out and never evaluated. Running the same study again resumes it
    until it holds ``trials`` evaluated trials. ``jobs`` > 1 starts that many worker processes
    in all on the same study (Optuna's own distributed model; other machines can join with
    ``autocompress worker``). ``timeout`` (seconds) stops new trials that long after the first
    one: set-up (statistics, the sensitivity table) is not charged to it. ``device``: auto | cpu |
    cuda | cuda:N, where the model is held and plans are applied and scored (bf16 on a GPU); the
    plans and their hashes do not depend on it. ``max_seeds`` keeps a new study to that many seed
    plans (``seeding.prioritise``), so a short run leaves trials to the sampler.
    """
    t_start = time.time()
    quiet_optuna()
    say = log or (lambda _m: None)
    budget = budgets or Budget()
    trials = DEFAULT_TRIALS if trials is None else trials
    if trials < 1:
        raise StudyError(f"--trials must be at least 1, got {trials}")
    if sampler not in SAMPLERS:
        raise StudyError(f"unknown sampler {sampler!r}; choose from {', '.join(SAMPLERS)}")
    if jobs < 1:
        raise StudyError(f"--jobs must be at least 1, got {jobs}")
    if max_seeds is not None and max_seeds < 0:
        raise StudyError(f"--seeds must be 0 or more, got {max_seeds}")
    if jobs > 1 and storage is not None and storage.startswith("sqlite:///:memory:"):
        raise StudyError("--jobs needs a storage that several processes can share (not an in-memory database)")
    resolve_device(device)  # fail fast on a bad device
    profile = load_profile(hw)  # fail fast on a bad profile, before loading anything heavy
    space_obj = SearchSpace.load(space).for_profile(profile)  # its formats; ties where the runtime fuses
    for note in space_obj.removed:
        say(f"space for {profile.id}: removed {note}")
    study_name = study or f"{space_obj.name}-{profile.id}"
    study_dir = Path(out) / study_name
    check_writable(study_dir, StudyError)
    # Refuse a model the target cannot hold even at the smallest plan, before loading its weights.
    shape = anatomy_from_config(model)
    check_fits_memory(
        space_obj, shape, CostModel(profile, shape, prompt_tokens=prompt_tokens, context_tokens=context_tokens)
    )
    wb = Workbench.open(model, data, log=say, device=device)
    wb.numerics = profile.numerics
    if wb.numerics != "exact":
        say(f"evaluating plans as {profile.runtime} computes them: {wb.numerics} activation rounding emulated")
    anatomy = wb.lm.anatomy
    cost_model = CostModel(profile, anatomy, prompt_tokens=prompt_tokens, context_tokens=context_tokens)
    prov = wb.provenance(seed=seed, profile=profile.id, space=space_obj.name, study=study_name)
    ctx = SpaceContext(anatomy=anatomy, drop_order=wb.stats.drop_order(), provenance=prov)
    check_budgets_reachable(space_obj, ctx, cost_model, budget, profile.id)

    st, url = open_storage(storage, study_dir)
    table = sensitivity_table(wb, space_obj, ctx, progress, say)
    # The study's first trials are the seeds (uniform baselines, mixed-precision and knapsack
    # plans), served by the sampler; NSGA-II files them as generation 0, so its first offspring
    # recombine and mutate sensible plans, not random ones.
    most_active = sorted(range(anatomy.num_blocks), key=lambda i: -wb.stats.block_distance[i])
    knapsack = None if table is None else build_knapsack(space_obj, ctx, table, cost_model, budget)
    seeds = seed_plans(space_obj, ctx, most_active, knapsack)
    if profile.runtime == "llama.cpp":  # what llama.cpp users download, improved from there
        seeds += recipe_seeds(space_obj, ctx, wb, log=say)
    # the recipes' own predicted costs are cost targets of the evolution (before --seeds drops any)
    anchors = [] if knapsack is None else anchor_savings(seeds, space_obj, ctx, cost_model, knapsack)
    all_seeds = len(seeds)
    if max_seeds is not None:
        seeds = prioritise(seeds, max_seeds)
    population = max(8, len(seeds))
    try:
        opt = optuna.create_study(
            study_name=study_name,
            storage=st,
            directions=["minimize"] * 3,
            sampler=SeededSampler(make_sampler(sampler, seed, population, knapsack, anchors), seeds),
            load_if_exists=True,
        )
    except Exception as exc:
        raise StudyError(f"cannot create study {study_name!r} in {url}: {str(exc).splitlines()[0][:160]}") from None
    scenario = {"prompt_tokens": prompt_tokens, "context_tokens": context_tokens}
    settings = study_settings(space_obj, wb, profile.id, budget, seed, scenario)
    settings["run"] = {  # what a worker needs to rebuild this process's state (not compared on resume)
        "model": str(model) if model is not None else "default",
        "data": asdict(wb.data_config),
        "space": str(space),
        "sampler": sampler,
        "population": population,
        "anchors": anchors,
        "trials": trials,
    }
    is_new = check_resume(opt, settings)
    if is_new:
        if len(seeds) < all_seeds:
            say(f"seeds: {len(seeds)} of {all_seeds} ({', '.join(x.name for x in seeds)}); the rest left out (--seeds)")
        opt.sampler.store(opt)  # before the settings: a worker that finds them finds the seeds
        opt.set_user_attr("settings", settings)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            opt.set_metric_names(["kl_to_base", "latency_ms", "memory_mb"])
    else:
        opt.sampler = SeededSampler.for_study(opt, opt.sampler.inner)  # the seeds it was started with
        n = recover_interrupted(opt)
        done = len(opt.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        say(
            f"resuming study {study_name}: {done} evaluated trials kept" + (f", {n} interrupted re-queued" if n else "")
        )

    say("scoring the base model on the proxy sequences")
    evaluator = Evaluator(wb.lm.model, wb.data, anatomy.task)
    # The time budget is the search's: set-up (conversion, statistics, Hessians, the sensitivity
    # table, all cached for the next run) is reported on its own and not charged to it.
    t_trials = time.time()
    say(f"set-up: {t_trials - t_start:.1f} s (model, data, statistics, sensitivity table); the time budget starts now")
    deadline = None if timeout is None else t_trials + timeout
    runner = TrialRunner(opt, space_obj, ctx, wb, evaluator, cost_model, budget, study_dir, table)
    workers = spawn_workers(jobs - 1, study_name, url, Path(out), trials, deadline, say, str(wb.device))
    try:
        runner.run(trials, deadline, progress)
    finally:
        for w in workers:
            w.wait()
    say(f"trials: {time.time() - t_trials:.1f} s")
    result = finish(opt, wb, evaluator, cost_model, budget, profile.id, study_dir, url, full_eval, say)
    result.elapsed_s = time.time() - t_start
    result.setup_s = t_trials - t_start
    return result
