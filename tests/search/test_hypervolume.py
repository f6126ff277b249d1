"""Hypervolume: normalised to the base model and the worst baseline, tracked per trial, plotted."""

from __future__ import annotations

import itertools

import optuna
import pytest
from optuna.trial import TrialState

from autocompress.search import hypervolume as hvm
from autocompress.search import search
from tests.conftest import TINY_DATA


def test_normalised_box_volume():
    # one point halfway on every axis covers an eighth of the box, whatever the units
    assert hvm.hypervolume([(0.5, 0.5, 0.5)], (1, 1, 1)) == pytest.approx(0.125)
    assert hvm.hypervolume([(1.0, 10.0, 100.0)], (2, 20, 200)) == pytest.approx(0.125)
    # with an ideal point the box runs from it to the reference: a memory floor of 100 MB halves at 150
    assert hvm.hypervolume([(1.0, 15.0, 150.0)], (2, 20, 200), ideal=(0, 10, 100)) == pytest.approx(0.125)
    # a dominated point adds nothing; a point on or past the reference is ignored
    two = hvm.hypervolume([(0.5, 0.5, 0.5), (0.2, 0.2, 0.2)], (1, 1, 1))
    assert two == pytest.approx(0.8**3)
    assert hvm.hypervolume([(0.2, 0.2, 0.2), (0.6, 0.6, 0.6), (0.1, 1.0, 0.1), (2.0, 0.0, 0.0)], (1, 1, 1)) == two
    assert hvm.hypervolume([], (1, 1, 1)) == 0.0
    # an objective no plan can improve (ideal = reference) is left out instead of failing
    assert hvm.hypervolume([(0.5, 1.0, 0.5)], (1, 1, 1), ideal=(0, 1, 0)) == pytest.approx(0.25)
    assert hvm.hypervolume([(0.5, 0.5, 0.5)], (0, 0, 0)) == 0.0
    with pytest.raises(ValueError):
        hvm.hypervolume([(0.1, 0.1, 0.1)], (1, 1, 1), ideal=(0, 0))


def _frozen(number, values, baseline=None, constraints=None):
    t = optuna.trial.create_trial(
        values=values,
        user_attrs={"baseline": baseline} if baseline else {},
        system_attrs={"constraints:memory_mb": constraints[0]} if constraints else {},
    )
    t.number = number
    return t


def test_reference_is_worst_baseline_and_infeasible_trials_do_not_count():
    trials = [
        _frozen(0, [0.0, 10.0, 100.0], baseline="uncompressed"),
        _frozen(1, [2.0, 5.0, 50.0], baseline="int4"),
        _frozen(2, [8.0, 1.0, 10.0]),  # worse than every baseline: not the reference
        _frozen(3, [1.0, 5.0, 50.0], constraints=[0.5]),  # breaks a budget
    ]
    ref = hvm.reference_of(trials, (10.0, 100.0))
    assert ref == (2.0, 10.0, 100.0)
    assert hvm.study_hypervolume(trials, ref, (0, 0, 0)) == 0.0  # the int4 point sits on the KL reference
    curve = hvm.curve(trials, ref)
    assert [n for n, _ in curve] == [1, 2, 3, 4]
    trials[3] = _frozen(3, [1.0, 5.0, 50.0])  # now feasible: half the KL, half the latency and memory
    assert hvm.study_hypervolume(trials, ref, (0, 0, 0)) == pytest.approx(0.125)


def test_search_records_hypervolume_per_trial_and_plots_it(tmp_path):
    result = search(model="tiny-llama", data=TINY_DATA, trials=24, out=tmp_path, study="hv", full_eval=0)
    study = optuna.load_study(study_name="hv", storage=result.storage)
    done = [t for t in study.get_trials() if t.state == TrialState.COMPLETE]
    assert len(done) == 24
    assert all(hvm.ATTR in t.user_attrs for t in done[1:])  # the first (KL 0) trial fixes no reference yet
    values = [t.user_attrs[hvm.ATTR] for t in done if hvm.ATTR in t.user_attrs]
    assert all(0.0 <= v <= 1.0 for v in values) and values[-1] > 0
    n_base = sum("baseline" in t.user_attrs for t in done)
    after = values[n_base:]  # once every baseline is in, the reference is fixed: the front only grows
    assert all(b >= a - 1e-12 for a, b in itertools.pairwise(after))
    box = study.user_attrs[hvm.BOX_ATTR]
    assert box["ideal"][1] < box["base"][0] and box["ideal"][2] < box["base"][1]  # compression can only cut cost
    png = tmp_path / "hv" / "hypervolume.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("space", ["lowrank-only", "structure-only"])
def test_narrow_spaces_search_without_failures(tmp_path, space):
    # lowrank-only cannot cut latency on jetson (llama.cpp): that objective drops out of the
    # hypervolume box instead of failing trials
    result = search(model="tiny-llama", data=TINY_DATA, trials=10, out=tmp_path, study=space, space=space, full_eval=0)
    assert result.counts["failed"] == 0 and result.counts["evaluated"] == 10
    study = optuna.load_study(study_name=space, storage=result.storage)
    assert all(hvm.ATTR in t.user_attrs for t in study.get_trials(states=(TrialState.COMPLETE,)) if t.values[0] > 0)
