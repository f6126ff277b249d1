"""A worker: joins an existing study (from this or another machine) and evaluates trials.

Everything it needs is in the study itself (model, data settings, space, profile, budgets, seed);
it checks that its model and data hash as the study's did, so a worker on a machine with other
weights or text refuses to join instead of polluting the front. ``spawn_workers`` starts such
workers as local processes for ``search --jobs N``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import torch

from autocompress.calib import DataConfig
from autocompress.device import resolve_device
from autocompress.errors import StudyError
from autocompress.evaluate import Evaluator
from autocompress.hardware import CostModel, load_profile
from autocompress.search.budget import Budget
from autocompress.search.objective import TrialRunner
from autocompress.search.samplers import SeededSampler, make_sampler
from autocompress.search.seeding import build_knapsack
from autocompress.search.storage import open_storage, quiet_optuna
from autocompress.search.table import sensitivity_table
from autocompress.space import SearchSpace, SpaceContext
from autocompress.workbench import Workbench


def run_worker(
    study: str,
    storage: str,
    out: str | Path = "studies",
    trials: int | None = None,
    deadline: float | None = None,
    index: int = 0,
    log: Any = None,
    progress: Any = None,
    device: str | None = "auto",
) -> int:
    """Evaluate trials of ``study`` until it holds ``trials`` (default: the study's target); give how many this worker did.

    ``device``: auto | cpu | cuda | cuda:N, where this worker holds the model and scores plans.
    """
    say = log or (lambda _m: None)
    resolve_device(device)  # fail fast, before reading the study
    quiet_optuna()
    st, url = open_storage(storage, Path(out) / study)
    try:
        settings = optuna.load_study(study_name=study, storage=st).user_attrs.get("settings")
    except KeyError:
        raise StudyError(f"study {study!r} not found in {url}") from None
    if not settings or "run" not in settings:
        raise StudyError(f"study {study!r} was not created by `autocompress search`; nothing to join")
    run = settings["run"]
    space = SearchSpace.load(run["space"]).for_profile(load_profile(settings["profile"]))
    wb = Workbench.open(run["model"], DataConfig(**run["data"]), log=say, device=device)
    if wb.lm.anatomy.model_hash != settings["model_hash"] or wb.data.data_hash != settings["data_hash"]:
        raise StudyError(f"this machine's model or data differ from study {study!r}'s; refusing to join")
    profile = load_profile(settings["profile"])
    wb.numerics = settings.get("numerics", "exact")  # as the study measured KL, whatever this machine's profile says
    anatomy = wb.lm.anatomy
    cost_model = CostModel(profile, anatomy, **settings["scenario"])
    prov = wb.provenance(seed=settings["seed"], profile=profile.id, space=space.name, study=study)
    ctx = SpaceContext(anatomy=anatomy, drop_order=wb.stats.drop_order(), provenance=prov)
    table = sensitivity_table(wb, space, ctx, None, say)
    budget = Budget(**settings["budgets"])
    knapsack = None if table is None else build_knapsack(space, ctx, table, cost_model, budget)
    opt = optuna.load_study(study_name=study, storage=st)
    sampler = make_sampler(
        run["sampler"], settings["seed"] + 7919 * index, run["population"], knapsack, run.get("anchors", ())
    )
    opt.sampler = SeededSampler.for_study(opt, sampler)
    evaluator = Evaluator(wb.lm.model, wb.data, anatomy.task)
    runner = TrialRunner(opt, space, ctx, wb, evaluator, cost_model, budget, Path(out) / study, table)
    target = trials if trials is not None else int(run.get("trials", 0)) or 10**9
    return runner.run(target, deadline, progress)


def spawn_workers(
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
