"""The samplers ``--sampler`` can name, all Optuna's own and all multi-objective with constraints
(budgets are passed as ``Trial.set_constraint`` values, which every one of them reads), and the
wrapper through which the seed plans enter a study."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.samplers import BaseSampler
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState

from autocompress.errors import StudyError
from autocompress.search.seeding import Knapsack, Seed

SAMPLERS = ("nsga2", "tpe", "gp", "random", "evo")
SEEDS_KEY = "seeds"  # study user attr: the seed plans served first, as [kind, name, params]
HELP = (
    "nsga2 (default: NSGA-II, generation 0 = the seeds) | tpe (multivariate TPE) | "
    "gp (Optuna's GPSampler, log-EHVI with constraints; slow on spaces with hundreds of parameters) | random | "
    "evo (level-switch evolution at fixed predicted-cost targets, from the knapsack's plans)"
)


def make_sampler(
    name: str, seed: int, population: int, knapsack: Knapsack | None = None, anchors: Sequence[float] = ()
) -> BaseSampler:
    """Give the Optuna sampler for ``--sampler``; ``population`` is NSGA-II's generation size and
    the other model-based samplers' number of start-up trials (the seeds fill them); ``evo``
    evolves the plans of ``knapsack`` (the space's levels and what each costs and saves), with cost
    targets at ``anchors`` (latency savings) besides its own."""
    if name == "evo":
        if knapsack is None:
            raise StudyError("--sampler evo needs a per-block or per-linear space with a sensitivity table")
        from autocompress.search.evo import EvoSampler

        return EvoSampler(knapsack, seed=seed, anchors=anchors)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=population)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, n_startup_trials=population)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=population, warn_independent_sampling=False)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise StudyError(f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}")


class SeededSampler(BaseSampler):
    """Serves the seed plans as the study's first trials, then leaves every trial to ``inner``.

    Trial number ``i`` < ``len(seeds)`` takes seed ``i``'s parameters. Numbers are handed out by
    the storage, once each, so every process on a study (workers, a resumed run) serves each seed
    exactly once, with nothing queued and nothing private of Optuna's written. ``inner`` still runs
    its own bookkeeping on seed trials (NSGA-II files them in generation 0, its first parents);
    only its proposals are replaced by the seed's values.
    """

    def __init__(self, inner: BaseSampler, seeds: Sequence[Seed] = ()) -> None:
        self.inner = inner
        self.seeds = list(seeds)

    @classmethod
    def for_study(cls, study: Study, inner: BaseSampler) -> SeededSampler:
        """Give ``inner`` wrapped to serve the seeds stored in ``study`` (none in older studies)."""
        return cls(inner, [Seed.from_list(item) for item in study.user_attrs.get(SEEDS_KEY, [])])

    def store(self, study: Study) -> None:
        """Record the seeds in a new study, for workers and resumed runs (``for_study``)."""
        study.set_user_attr(SEEDS_KEY, [s.to_list() for s in self.seeds])

    def seed_of(self, trial: FrozenTrial | optuna.Trial) -> Seed | None:
        """Give the seed a trial stands for (None for the inner sampler's own trials)."""
        return self.seeds[trial.number] if 0 <= trial.number < len(self.seeds) else None

    def reseed_rng(self) -> None:
        self.inner.reseed_rng()

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self.inner.infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        proposal = self.inner.sample_relative(study, trial, search_space)  # its bookkeeping runs either way
        seed = self.seed_of(trial)
        if seed is None:
            return proposal
        return {**proposal, **{k: v for k, v in seed.params.items() if _holds(search_space.get(k), v)}}

    def sample_independent(
        self, study: Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        seed = self.seed_of(trial)
        if seed is not None and param_name in seed.params and _holds(param_distribution, seed.params[param_name]):
            return seed.params[param_name]
        return self.inner.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        self.inner.before_trial(study, trial)

    def after_trial(self, study: Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None) -> None:
        self.inner.after_trial(study, trial, state, values)


def _holds(dist: BaseDistribution | None, value: Any) -> bool:
    if dist is None:
        return False
    if isinstance(dist, CategoricalDistribution):
        return value in dist.choices
    if isinstance(dist, (FloatDistribution, IntDistribution)):
        return isinstance(value, (int, float)) and dist.low <= value <= dist.high
    return False
