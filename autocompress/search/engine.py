"""The search: an Optuna multi-objective study over plans, screened by the cost model,
scored by the KL proxy, with the full metric run on the front at the end."""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

from autocompress._io import atomic_write_text, cache_dir, check_writable
from autocompress.calib import DataConfig
from autocompress.compress.numerics import attach
from autocompress.device import cache_tag, resolve_device
from autocompress.errors import AutocompressError, BudgetError, StudyError
from autocompress.evaluate import EvaluationError, Evaluator
from autocompress.evaluate.ladder import Ladder, merge
from autocompress.evaluate.predictor import QualityPredictor, plan_features
from autocompress.evaluate.sensitivity import SensitivityTable, build_sensitivity, plan_keys
from autocompress.hardware import CostModel, load_profile
from autocompress.model.loading import anatomy_from_config
from autocompress.plan import ModelRef, Plan
from autocompress.recover.run import rebuild
from autocompress.search import heartbeat, hypervolume
from autocompress.search.budget import Budget, check_fits_memory
from autocompress.search.heartbeat import GRACE_S, HEARTBEAT_S
from autocompress.search.interrupt import InterruptGate
from autocompress.search.pareto import pareto_front
from autocompress.search.recipe_seeds import recipe_seeds
from autocompress.search.report import describe_plan, write_outputs
from autocompress.search.result import Candidate, SearchResult
from autocompress.search.samplers import SAMPLERS, SeededSampler, make_sampler
from autocompress.search.seeding import build_knapsack, prioritise, seed_plans
from autocompress.space import SearchSpace, SpaceContext
from autocompress.workbench import Workbench

MAX_FAILS_IN_A_ROW = 20
DEFAULT_TRIALS = 60
DEFAULT_TIMEOUT_S = 540.0
FULL_KEY = "full:"  # study user attr prefix: rung-2 results keyed by plan hash


def quiet_optuna() -> None:
    """Keep Optuna's per-trial INFO lines off the console (called where a search or worker starts,
    not on import: importing autocompress changes no other library's settings)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def open_storage(storage: str | None, study_dir: Path) -> tuple[Any, str]:
    """Give an Optuna storage (SQLite in the study folder by default; a ``.log`` path is a journal file).

    Every command that opens a study comes through here, so Optuna's console lines are quieted here."""
    quiet_optuna()
    if storage is None:
        study_dir.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{study_dir / 'study.db'}"
    else:
        url = storage
    try:
        if url.endswith(".log") and "://" not in url:
            from optuna.storages.journal import JournalFileBackend, JournalStorage

            Path(url).parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(url)), url
        return optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S), url
    except Exception as exc:
        raise StudyError(f"cannot open storage {url!r}: {str(exc).splitlines()[0][:160]}") from None


def load_finished_study(study: str, out: str | Path, storage: str | None) -> tuple[optuna.Study, Path, str, dict]:
    """Open a study written by ``search`` without re-running anything: (study, its folder, storage URL, settings)."""
    study_dir = Path(out) / study
    if storage is None and not (study_dir / "study.db").is_file():
        raise StudyError(f"no study database at {study_dir / 'study.db'}; give --storage for another backend")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        st, url = open_storage(storage, study_dir)
    try:
        opt = optuna.load_study(study_name=study, storage=st)
    except KeyError:
        raise StudyError(f"study {study!r} not found in {url}") from None
    settings = opt.user_attrs.get("settings") or {}
    if "anatomy" not in settings:
        raise StudyError(f"study {study!r} was not written by this version of autocompress (no stored anatomy)")
    return opt, study_dir, url, settings


def _settings(
    space: SearchSpace, wb: Workbench, profile_id: str, budget: Budget, seed: int, cost_scenario: dict
) -> dict:
    return {
        "model_hash": wb.lm.anatomy.model_hash,
        "model": wb.lm.anatomy.name,
        "data_hash": wb.data.data_hash,
        "space": space.name,
        "space_def": space.definition(),
        "profile": profile_id,
        "numerics": wb.numerics,  # the runtime's activation rounding the KL was measured with
        "budgets": budget.to_dict(),
        "seed": seed,
        "scenario": cost_scenario,
        "anatomy": wb.lm.anatomy.to_dict(),
    }


def _check_resume(study: optuna.Study, settings: dict) -> bool:
    """Give True for a new study; for an existing one, insist on the same settings."""
    stored = study.user_attrs.get("settings")
    if stored is None:
        return True
    for key in ("model_hash", "data_hash", "space_def", "profile", "budgets", "seed", "scenario"):  # not "run"
        if stored.get(key) != settings[key]:
            what = {"space_def": "search space", "model_hash": "model", "data_hash": "data"}.get(key, key)
            was, now = (
                (stored.get("space"), settings["space"]) if key == "space_def" else (stored.get(key), settings[key])
            )
            if was == now:  # same space name, edited definition
                was, now = f"{was} as it was", f"{now} as it is now"
            raise StudyError(
                f"study {study.study_name!r} already exists with a different {what} "
                f"({was!r:.60} vs {now!r:.60}); use another --study name"
            )
    return False


def _recover_interrupted(study: optuna.Study) -> int:
    """Fail the trials left RUNNING by a dead process (not those of live workers) and queue them again."""
    return heartbeat.recover(study)


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
    _precheck_budgets(space_obj, ctx, cost_model, budget, profile.id)

    st, url = open_storage(storage, study_dir)
    table = _sensitivity(wb, space_obj, ctx, progress, say)
    # The study's first trials are the seeds (uniform baselines, mixed-precision and knapsack
    # plans), served by the sampler; NSGA-II files them as generation 0, so its first offspring
    # recombine and mutate sensible plans, not random ones.
    most_active = sorted(range(anatomy.num_blocks), key=lambda i: -wb.stats.block_distance[i])
    knapsack = None if table is None else build_knapsack(space_obj, ctx, table, cost_model, budget)
    seeds = seed_plans(space_obj, ctx, most_active, knapsack)
    if profile.runtime == "llama.cpp":  # what llama.cpp users download, improved from there
        seeds += recipe_seeds(space_obj, ctx, wb, log=say)
    all_seeds = len(seeds)
    if max_seeds is not None:
        seeds = prioritise(seeds, max_seeds)
    population = max(8, len(seeds))
    try:
        opt = optuna.create_study(
            study_name=study_name,
            storage=st,
            directions=["minimize"] * 3,
            sampler=SeededSampler(make_sampler(sampler, seed, population, knapsack), seeds),
            load_if_exists=True,
        )
    except Exception as exc:
        raise StudyError(f"cannot create study {study_name!r} in {url}: {str(exc).splitlines()[0][:160]}") from None
    scenario = {"prompt_tokens": prompt_tokens, "context_tokens": context_tokens}
    settings = _settings(space_obj, wb, profile.id, budget, seed, scenario)
    settings["run"] = {  # what a worker needs to rebuild this process's state (not compared on resume)
        "model": str(model) if model is not None else "default",
        "data": asdict(wb.data_config),
        "space": str(space),
        "sampler": sampler,
        "population": population,
        "trials": trials,
    }
    is_new = _check_resume(opt, settings)
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
        n = _recover_interrupted(opt)
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
    workers = _spawn_workers(jobs - 1, study_name, url, Path(out), trials, deadline, say, str(wb.device))
    try:
        runner.run(trials, deadline, progress)
    finally:
        for w in workers:
            w.wait()
    say(f"trials: {time.time() - t_trials:.1f} s")
    result = _finish(opt, wb, evaluator, cost_model, budget, profile.id, study_dir, url, full_eval, say)
    result.elapsed_s = time.time() - t_start
    result.setup_s = t_trials - t_start
    return result


def _spawn_workers(
    n: int,
    study: str,
    url: str,
    out: Path,
    trials: int,
    deadline: float | None,
    say: Callable[[str], None],
    device: str = "cpu",
) -> list[subprocess.Popen]:
    """Start ``n`` ``autocompress worker`` processes on the study; threads are split between processes."""
    if n <= 0:
        return []
    threads = max(1, (os.cpu_count() or 1) // (n + 1))
    torch.set_num_threads(threads)
    env = {**os.environ, "AUTOCOMPRESS_THREADS": str(threads)}
    say(f"starting {n} worker process(es) on the study, {threads} thread(s) each")
    procs = []
    for i in range(1, n + 1):
        cmd = [
            sys.executable,
            "-m",
            "autocompress.cli",
            "worker",
            "--study",
            study,
            "--storage",
            url,
            "--out",
            str(out),
        ]
        cmd += ["--trials", str(trials), "--index", str(i), "--device", device]
        if deadline is not None:
            cmd += ["--deadline", f"{deadline:.3f}"]
        log_path = out / study / f"worker-{i}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "w") as fh:  # the child keeps its own handle
            procs.append(subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT))
    return procs


SENSITIVITY_SHAPE = (1, 128)  # sequences × tokens of the held-out proxy set used for the table


def _sensitivity(
    wb: Workbench, space: SearchSpace, ctx: SpaceContext, progress: Any, say: Callable[[str], None]
) -> SensitivityTable | None:
    """Build (or read from the cache) the sensitivity table; None for model-wide spaces."""
    if space.granularity == "model":
        return None
    n, length = SENSITIVITY_SHAPE
    tokens = wb.data.proxy[:n, :length]
    task = progress.add_task("sensitivity table", total=None) if progress else None

    def tick(done: int, total: int) -> None:
        if progress:
            progress.update(task, completed=done, total=total)

    say(f"sensitivity table: each knob level on each unit alone, KL on {int(tokens.numel())} held-out tokens")

    def probe(m: Any, p: Plan) -> Any:  # a probe is discarded after its forward, hooks and all
        model = wb.apply(p, into=m)
        attach(model, wb.lm.anatomy, p, wb.numerics)
        return model

    tag = cache_tag(wb.lm.model)  # a table measured in bf16 (on a GPU) is kept apart from the float32 ones
    root = cache_dir() / f"device{tag}" if tag else cache_dir()
    table = build_sensitivity(wb.lm.model, probe, space, ctx, tokens, root, tick, numerics=wb.numerics)
    if progress:
        progress.remove_task(task)
    return table


def _precheck_budgets(
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


def _finish(
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
