from __future__ import annotations

import itertools
import random

import pytest

from autocompress.errors import BudgetError
from autocompress.search import Budget, dominates, pareto_front


def test_pareto_on_a_hand_made_set():
    pts = [
        (0.0, 10.0, 100.0),  # 0 best quality
        (0.5, 5.0, 50.0),  # 1 trade-off
        (0.6, 5.0, 50.0),  # 2 dominated by 1
        (1.0, 2.0, 80.0),  # 3 fastest
        (1.0, 2.0, 80.0),  # 4 duplicate of 3: kept once
        (0.5, 6.0, 40.0),  # 5 smallest memory
        (2.0, 11.0, 101.0),  # 6 dominated by everything
    ]
    assert pareto_front(pts) == [0, 1, 3, 5]


def test_pareto_properties_on_random_sets():
    rng = random.Random(0)
    for _ in range(50):
        pts = [tuple(rng.choice([0, 1, 2, 3]) for _ in range(3)) for _ in range(rng.randint(1, 25))]
        front = pareto_front(pts)
        assert front, "a non-empty set has a non-empty front"
        for i, j in itertools.product(front, repeat=2):
            assert not dominates(pts[i], pts[j])
        for k in set(range(len(pts))) - set(front):
            assert any(dominates(pts[i], pts[k]) or pts[i] == pts[k] for i in front)


def test_budget_parse():
    b = Budget.parse(["latency_ms=40", "memory_mb=300.5"])
    assert b.latency_ms == 40 and b.memory_mb == 300.5 and b.quality_loss is None
    assert b.cost_items() == {"latency_ms": 40, "memory_mb": 300.5}


@pytest.mark.parametrize(
    ("item", "fragment"),
    [
        ("speed=3", "unknown budget 'speed'"),
        ("latency_ms", "KEY=VALUE"),
        ("latency_ms=fast", "must be a number"),
        ("latency_ms=-1", "must be positive"),
        ("memory_mb=0", "must be positive"),
        ("memory_mb=inf", "finite"),
    ],
)
def test_bad_budgets(item, fragment):
    with pytest.raises(BudgetError, match=fragment):
        Budget.parse([item])


def test_ac_search_stays_callable_after_the_package_is_imported():
    import autocompress as ac
    import autocompress.search.engine  # binds the subpackage as ``autocompress.search``

    assert callable(ac.search) and ac.search.Budget is ac.Budget
