"""The samplers ``--sampler`` can name, all Optuna's own and all multi-objective with constraints
(budgets are passed as ``Trial.set_constraint`` values, which every one of them reads)."""

from __future__ import annotations

import optuna

from autocompress.errors import StudyError

SAMPLERS = ("nsga2", "tpe", "gp", "random")
HELP = (
    "nsga2 (default: NSGA-II, generation 0 = the seeds) | tpe (multivariate TPE) | "
    "gp (Optuna's GPSampler, log-EHVI with constraints; slow on spaces with hundreds of parameters) | random"
)


def make_sampler(name: str, seed: int, population: int) -> optuna.samplers.BaseSampler:
    """Give the Optuna sampler for ``--sampler``; ``population`` is NSGA-II's generation size and
    the other model-based samplers' number of start-up trials (the seeds fill them)."""
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=population)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, n_startup_trials=population)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=population, warn_independent_sampling=False)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise StudyError(f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}")
