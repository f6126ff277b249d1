"""What ``make_sampler`` promises a search: ``population`` is NSGA-II's generation size and the
model-based samplers' start-up, every model-based sampler steers by the budgets the search sets
with ``Trial.set_constraint``, a seed fixes the proposals, and every ``--sampler`` name works."""

from __future__ import annotations

import warnings

import optuna
import pytest
from optuna.trial import TrialState

from autocompress.errors import StudyError
from autocompress.search.samplers import SAMPLERS, make_sampler

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


@pytest.mark.parametrize("name", SAMPLERS)
def test_each_sampler_name_runs_and_a_seed_fixes_its_proposals(name):
    first = _run(make_sampler(name, seed=5, population=4), 8)
    again = _run(make_sampler(name, seed=5, population=4), 8)
    other = _run(make_sampler(name, seed=6, population=4), 8)
    assert all(t.state == TrialState.COMPLETE for t in first.trials)
    assert [t.params for t in first.trials] == [t.params for t in again.trials]
    assert [t.params for t in first.trials] != [t.params for t in other.trials]


def test_unknown_sampler_is_a_clear_error():
    with pytest.raises(StudyError, match="choose from nsga2, tpe, gp, random"):
        make_sampler("cmaes", seed=0, population=8)
