"""The indicators of bench/search.py on hand-made fronts whose answers are worked out by hand."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location("bench_search", Path(__file__).parents[2] / "bench" / "search.py")
bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench)


def test_igd_plus_counts_only_where_a_point_is_worse():
    ref = [(0.0, 1.0), (1.0, 0.0)]
    # (0.5, 0.5) is 0.5 worse than each reference point on one objective only: IGD+ 0.5 (IGD would be 0.707)
    assert bench.igd_plus([(0.5, 0.5)], ref) == pytest.approx(0.5)
    assert bench.igd_plus(ref, ref) == 0.0
    assert bench.igd_plus([(-1.0, -1.0)], ref) == 0.0  # a point better than the whole front
    # the nearest point per reference point: (0, 1) is matched exactly, (1, 0) is 0.2 and 0.1 away
    assert bench.igd_plus([(0.0, 1.0), (1.2, 0.1)], ref) == pytest.approx(math.hypot(0.2, 0.1) / 2)
    assert bench.igd_plus([], ref) == math.inf


def test_front_of_drops_dominated_and_repeated_points():
    pts = [(1, 3), (2, 2), (2, 2), (3, 3), (3, 1), (1, 4)]
    assert bench.front_of(pts) == [(1.0, 3.0), (2.0, 2.0), (3.0, 1.0)]


def test_box_hypervolume_in_log_kl():
    # KL 0.01..1 on a log scale (0.1 sits halfway), latency 0..10 ms, memory 0..100 MB
    box = bench.Box(kl_floor=0.01, kl_ref=1.0, ideal_cost=(0.0, 0.0), base_cost=(10.0, 100.0))
    a = (0.1, 5.0, 50.0)  # scaled (0.5, 0.5, 0.5): dominates 1/8 of the box
    assert box.hypervolume([a]) == pytest.approx(0.125)
    below_floor = (1e-6, 7.5, 50.0)  # counts at the floor: scaled (0, 0.75, 0.5)
    assert box.hypervolume([below_floor]) == pytest.approx(1.0 * 0.25 * 0.5)
    # union by inclusion-exclusion: 0.125 + 0.125 - [0.5,1]x[0.75,1]x[0.5,1]
    assert box.hypervolume([a, below_floor]) == pytest.approx(0.125 + 0.125 - 0.5 * 0.25 * 0.5)
    assert box.hypervolume([(1.0, 5.0, 50.0)]) == 0.0  # at the reference KL: outside the box
    # kl_shift is in decades: ten times worse (one decade, half the box's log span) takes a to the
    # reference; a factor sqrt(10) better takes its KL coordinate from 0.5 to 0.25
    assert box.hypervolume([a], kl_shift=1.0) == 0.0
    assert box.hypervolume([a], kl_shift=-0.5) == pytest.approx(0.75 * 0.5 * 0.5)


def _trial(n: int, kl: float, lat: float, name: str = "", kind: str = "proposed") -> dict:
    return {"trial": n, "kind": kind, "name": name, "values": [kl, lat, 100.0], "plan_hash": f"h{n}"}


def test_perplexity_at_targets_takes_the_least_kl_plan_at_or_below_each_and_ratios_need_a_seed_loss():
    seeds = [_trial(0, 0.0, 10.0, "uncompressed", "seed"), _trial(1, 0.2, 4.0, "recipe Q4_K_M", "seed")]
    seeds.append(_trial(2, 0.5, 3.0, "recipe Q2_K", "seed"))
    result = {
        "runs": {
            "seeds/0": {"trials": seeds},
            "evo/0": {"trials": [*seeds, _trial(3, 0.1, 3.9), _trial(4, 0.05, 4.1)]},
        },
        "ppl_by_plan": {"h0": 10.0, "h1": 12.0, "h2": 14.0, "h3": 11.0, "h4": 10.5},
    }
    assert bench.recipe_targets(result) == [("Q2_K", 3.0), ("Q4_K_M", 4.0)]
    at = bench.ppl_at(result, [3.0, 4.0, 10.0], ["seeds", "evo"], 1)
    # at 4.0 ms evo's trial 3 (3.9 ms, KL 0.1) beats the recipe; trial 4 is over the target
    assert at == {"seeds": [[14.0, 12.0, 10.0]], "evo": [[14.0, 11.0, 10.0]]}
    # loss ratios: 4 / 4 at 3 ms, 1 / 2 at 4 ms, none at 10 ms (the seed there loses nothing)
    assert bench.loss_ratios(at, 10.0, 3) == [1.0, 0.5, None]
    assert bench.loss_ratios(at, None, 3) == [None, None, None]
    # a best-seed loss under NO_LOSS of the base forms no ratio (0.005 over 10 is 0.05 %)
    tiny = {"seeds": [[10.005]], "evo": [[10.001]]}
    assert bench.loss_ratios(tiny, 10.0, 1) == [None]
