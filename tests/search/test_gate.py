"""The gate in front of each measurement (search/gate.py), on hand-made estimates and trials."""

from __future__ import annotations

import numpy as np

from autocompress.evaluate.ladder import Ladder
from autocompress.search.gate import REFIT_EVERY, Estimate, Gate


def _gate(**kw) -> Gate:
    return Gate(space=None, ctx=None, table=None, **kw)  # estimates are given directly here


def _history(gate: Gate, n: int = Ladder.min_history) -> None:
    """Evaluated plans whose measured KL is exactly their table estimate, the best at 1 ms / 10 MB."""
    for i in range(n):
        kl = 0.1 * (i + 1)
        gate.observe(i, kl, 1.0 + i, 10.0 + i, Estimate(kl, [float(i)]), partial_kl=kl)


def test_rung0_stops_a_plan_an_evaluated_one_dominates_and_names_it() -> None:
    gate = _gate()
    _history(gate)
    # estimate 1.0: bound 1.0 x 0.8 (safety) = 0.8 > trial 0's 0.1 at less latency and memory
    why = gate.before_measuring(Estimate(1.0, [0.0]), latency=5.0, memory=50.0)
    assert why is not None and why.startswith("sensitivity table:") and "dominated by trial 0" in why
    # faster than every evaluated plan: nothing dominates it, whatever its estimate
    assert gate.before_measuring(Estimate(1.0, [0.0]), latency=0.5, memory=50.0) is None
    # an estimate below every evaluated KL at its cost cannot be dominated
    assert gate.before_measuring(Estimate(0.05, [0.0]), latency=5.0, memory=50.0) is None


def test_nothing_stops_before_enough_history_or_when_disabled_or_without_an_estimate() -> None:
    young = _gate()
    _history(young, Ladder.min_history - 1)
    assert young.before_measuring(Estimate(1.0, [0.0]), 5.0, 50.0) is None
    assert young.after_partial(1.0, 5.0, 50.0) is None
    off = _gate(enabled=False)
    _history(off)
    assert off.before_measuring(Estimate(1.0, [0.0]), 5.0, 50.0) is None
    assert off.after_partial(1.0, 5.0, 50.0) is None
    on = _gate()
    _history(on)
    assert on.before_measuring(None, 5.0, 50.0) is None
    assert on.after_partial(1.0, 5.0, 50.0) is not None  # the partial KL needs no table


def test_quality_budget_stops_what_the_bound_already_breaks() -> None:
    gate = _gate(quality_limit=0.3)
    _history(gate)
    why = gate.before_measuring(Estimate(1.0, [0.0]), latency=0.5, memory=1.0)  # nothing dominates it
    assert why is not None and "quality budget 0.3" in why


def test_the_predictor_screens_only_while_it_ranks_better_than_the_table() -> None:
    rng = np.random.default_rng(0)
    published: list[dict] = []
    useless = _gate(publish=published.append)
    useful = _gate(publish=published.append)
    for i in range(32):
        x = float(rng.uniform(0, 1))
        kl = 0.01 + x  # the features tell KL exactly
        noise = float(rng.uniform(0, 1))
        useless.observe(i, kl, 1.0, 1.0, Estimate(noise, [x, noise]))  # the table says nothing
        useful.observe(i, kl, 1.0, 1.0, Estimate(kl, [x, noise]))  # the table ranks perfectly
        if (i + 1) % REFIT_EVERY == 0:
            useless.refit()
            useful.refit()
    assert useless.predictor.ready and useless.predictor_screens
    assert useful.predictor.ready and not useful.predictor_screens  # a perfect table is never beaten
    assert {p["screens"] for p in published} == {True, False} and all(p["n"] >= 16 for p in published)
    _history(useless)  # enough ladder history; the predictor's bound now decides at rung 0
    why = useless.before_measuring(Estimate(0.0, [1.0, 0.0]), latency=50.0, memory=50.0)
    assert why is not None and why.startswith("learned predictor:")
