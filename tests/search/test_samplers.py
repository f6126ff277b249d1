"""What ``make_sampler`` promises a search: ``population`` is NSGA-II's generation size and the
model-based samplers' start-up, every model-based sampler steers by the budgets the search sets
with ``Trial.set_constraint``, a seed fixes the proposals, and every ``--sampler`` name works."""

from __future__ import annotations

import warnings

import optuna
import pytest
from optuna.trial import TrialState

from autocompress.errors import StudyError
from autocompress.search.samplers import SAMPLERS, SeededSampler, make_sampler
from autocompress.search.seeding import Seed

LEVELS = [16, 8, 4, 3]
BUDGET = 0.45  # "memory": a plan of all-16-bit blocks (the most accurate) is far over it


def _run(sampler, n, constrained=True):
    """Give the study of ``n`` trials on a toy plan space where accuracy pulls against the budget."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study = optuna.create_study(directions=["minimize"] * 2, sampler=sampler)
        for _ in range(n):
            trial = study.ask()
            bits = [trial.suggest_categorical(f"b{i}.bits", LEVELS) for i in range(4)]
            drop = trial.suggest_categorical("drop_blocks", [0, 1, 2])
            size = sum(bits) / 64 * (4 - drop) / 4
            err = sum((16 - b) ** 2 for b in bits) / 400 + 0.3 * drop
            if constrained:
                trial.set_constraint("memory_mb", size - BUDGET)  # as the search sets each budget
            trial.set_user_attr("size", size)
            study.tell(trial, [err, size * 0.01])
    return study


def _feasible_after(study, start: int) -> int:
    return sum(t.user_attrs["size"] <= BUDGET for t in study.trials[start:])


@pytest.mark.parametrize("name", ["nsga2", "tpe"])
def test_model_based_samplers_steer_by_the_budgets(name):
    """A sampler that ignored ``set_constraint`` would chase the accurate, over-budget plans."""
    aware = _feasible_after(_run(make_sampler(name, seed=0, population=8), 40), 8)
    blind = _feasible_after(_run(make_sampler(name, seed=0, population=8), 40, constrained=False), 8)
    assert aware >= blind + 4, (aware, blind)
    assert aware >= 0.7 * 32  # most proposals after the start-up meet the budget


def test_population_is_the_nsga2_generation_size():
    study = _run(make_sampler("nsga2", seed=3, population=6), 20)
    generations = [t.system_attrs["NSGAIISampler:generation"] for t in study.trials]
    assert generations == [0] * 6 + [1] * 6 + [2] * 6 + [3] * 2


def test_population_is_the_tpe_start_up():
    tpe = [t.params for t in _run(make_sampler("tpe", seed=3, population=6), 10).trials]
    rnd = [t.params for t in _run(make_sampler("random", seed=3, population=6), 10).trials]
    assert tpe[:6] == rnd[:6]  # the start-up trials: independent random proposals
    assert tpe[6:] != rnd[6:]  # then the model proposes


OPTUNA_OWN = [n for n in SAMPLERS if n != "evo"]  # evo needs a knapsack: tests/search/test_evo.py


@pytest.mark.parametrize("name", OPTUNA_OWN)
def test_each_sampler_name_runs_and_a_seed_fixes_its_proposals(name):
    first = _run(make_sampler(name, seed=5, population=4), 8)
    again = _run(make_sampler(name, seed=5, population=4), 8)
    other = _run(make_sampler(name, seed=6, population=4), 8)
    assert all(t.state == TrialState.COMPLETE for t in first.trials)
    assert [t.params for t in first.trials] == [t.params for t in again.trials]
    assert [t.params for t in first.trials] != [t.params for t in other.trials]


def test_unknown_sampler_is_a_clear_error():
    with pytest.raises(StudyError, match="choose from nsga2, tpe, gp, random, evo"):
        make_sampler("cmaes", seed=0, population=8)


# ---- seeds enter through the sampler ------------------------------------------------------------

SEEDS = [
    Seed("baseline", "all-8", {"b0.bits": 8, "b1.bits": 8, "b2.bits": 8, "b3.bits": 8, "drop_blocks": 0}),
    Seed("seed", "mixed", {"b0.bits": 16, "b1.bits": 8, "b2.bits": 8, "b3.bits": 16, "drop_blocks": 0}),
    Seed("seed", "deep", {"b0.bits": 16, "b1.bits": 16, "b2.bits": 8, "b3.bits": 8, "drop_blocks": 0}),
    Seed("seed", "cut", {"b0.bits": 8, "b1.bits": 16, "b2.bits": 16, "b3.bits": 8, "drop_blocks": 0}),
]
SEED_VALUES = {k: {s.params[k] for s in SEEDS} for k in SEEDS[0].params}  # bits: {8, 16}; drop: {0}


def _ask_tell(study, n):
    for _ in range(n):
        trial = study.ask()
        bits = [trial.suggest_categorical(f"b{i}.bits", LEVELS) for i in range(4)]
        drop = trial.suggest_categorical("drop_blocks", [0, 1, 2])
        study.tell(trial, [sum((16 - b) ** 2 for b in bits) / 400 + 0.3 * drop, sum(bits) * (4 - drop)])


@pytest.mark.parametrize("name", OPTUNA_OWN)
def test_seeds_are_the_first_trials_then_the_inner_sampler_proposes(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study = optuna.create_study(directions=["minimize"] * 2, sampler=SeededSampler(make_sampler(name, 0, 4), SEEDS))
        _ask_tell(study, 10)
    assert [t.params for t in study.trials[:4]] == [s.params for s in SEEDS]
    assert not any("fixed_params" in t.system_attrs for t in study.trials)  # nothing queued
    assert [study.sampler.seed_of(t) for t in study.trials] == [*SEEDS, *[None] * 6]
    own = [t.params for t in study.trials[4:]]
    assert any(p not in [s.params for s in SEEDS] for p in own)


def test_nsga2_takes_the_seeds_as_generation_0_and_breeds_from_them():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study = optuna.create_study(
            directions=["minimize"] * 2, sampler=SeededSampler(make_sampler("nsga2", 0, 4), SEEDS)
        )
        _ask_tell(study, 12)
    generations = [t.system_attrs["NSGAIISampler:generation"] for t in study.trials]
    assert generations == [0] * 4 + [1] * 4 + [2] * 4
    # the offspring recombine the seeds' values (a value outside them can only come from a mutation)
    gen1 = [(k, v) for t in study.trials[4:8] for k, v in t.params.items()]
    inherited = sum(v in SEED_VALUES[k] for k, v in gen1)
    assert inherited >= 0.7 * len(gen1), (inherited, len(gen1))


def test_each_seed_is_served_once_by_workers_and_a_resumed_run(tmp_path):
    """Two processes' samplers on one storage, then a third after a 'restart': seed i is trial i, once."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        a = optuna.create_study(
            study_name="s",
            storage=url,
            directions=["minimize"] * 2,
            sampler=SeededSampler(make_sampler("random", 0, 4), SEEDS),
        )
        b = optuna.load_study(study_name="s", storage=url, sampler=SeededSampler(make_sampler("random", 1, 4), SEEDS))
        for _ in range(3):  # interleaved, as two workers ask
            _ask_tell(a, 1)
            _ask_tell(b, 1)
        c = optuna.load_study(study_name="s", storage=url, sampler=SeededSampler(make_sampler("random", 2, 4), SEEDS))
        _ask_tell(c, 4)
    trials = c.trials
    assert [t.params for t in trials[:4]] == [s.params for s in SEEDS]
    # random proposals of 768 plans repeat a seed by chance only (fixed sampler seeds: none do here)
    assert sum(t.params in [s.params for s in SEEDS] for t in trials) == len(SEEDS)
    assert len(trials) == 10
