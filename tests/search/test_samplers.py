"""Every ``--sampler`` works on what a search asks of it: categorical knobs, three objectives and
budget constraints set with ``Trial.set_constraint``."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from autocompress.errors import StudyError
from autocompress.search.samplers import SAMPLERS, make_sampler

LEVELS = [16, 8, 4, 3]


def _run(sampler, n):
    study = optuna.create_study(directions=["minimize"] * 3, sampler=sampler)
    for _ in range(n):
        trial = study.ask()
        bits = [trial.suggest_categorical(f"b{i}.bits", LEVELS) for i in range(4)]
        drop = trial.suggest_categorical("drop_blocks", [0, 1, 2])
        size = sum(bits) / 64 * (4 - drop) / 4
        err = sum((16 - b) ** 2 for b in bits) / 400 + 0.3 * drop
        trial.set_constraint("memory_mb", size - 0.6)  # a budget: only smaller plans are feasible
        study.tell(trial, [err, size, size * 1.1])
    return study


@pytest.mark.parametrize("name", SAMPLERS)
def test_each_sampler_runs_constrained_multi_objective_trials(name):
    study = _run(make_sampler(name, seed=0, population=6), 14)
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(done) == 14
    assert all(set(t.params) == {"b0.bits", "b1.bits", "b2.bits", "b3.bits", "drop_blocks"} for t in done)
    assert any(t.constraints["memory_mb"] <= 0 for t in done)  # some feasible plans were found


def test_same_seed_same_proposals():
    a = [t.params for t in _run(make_sampler("tpe", seed=5, population=4), 8).trials]
    b = [t.params for t in _run(make_sampler("tpe", seed=5, population=4), 8).trials]
    assert a == b


def test_unknown_sampler_is_a_clear_error():
    with pytest.raises(StudyError, match="choose from nsga2, tpe, gp, random"):
        make_sampler("cmaes", seed=0, population=8)
