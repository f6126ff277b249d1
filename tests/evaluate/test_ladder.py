"""The fidelity ladder: top-k KL, the evaluation cache, the gate, and the learned predictor."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch

from autocompress.evaluate.cache import EvalCache
from autocompress.evaluate.ladder import Ladder, merge
from autocompress.evaluate.metrics import Fidelity, topk_kl
from autocompress.evaluate.predictor import FEATURE_NAMES, QualityPredictor, plan_features
from autocompress.plan import LayerChoice
from autocompress.search.pareto import pareto_front
from tests.conftest import TINY_DATA, plan_for


def _logprobs(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(*shape, generator=g) * 3, dim=-1)


def test_topk_kl_never_exceeds_full_kl_and_equals_it_over_the_whole_vocabulary():
    p, q = _logprobs((5, 7, 50), 0), _logprobs((5, 7, 50), 1)
    full = (p.exp() * (p - q)).sum(-1)
    for k in (1, 4, 16):
        assert (topk_kl(p, q, k) <= full + 1e-5).all()
    assert torch.allclose(topk_kl(p, q, 50), full, atol=1e-5)
    assert torch.allclose(topk_kl(p, p, 8), torch.zeros_like(full), atol=1e-6)
    assert (topk_kl(p, q, 8) > 0).all()


def test_merge_weights_parts_by_rows():
    a = Fidelity(kl=1.0, top1_agreement=1.0, topk_kl=0.5)
    b = Fidelity(kl=4.0, top1_agreement=0.0, topk_kl=2.0)
    m = merge([(a, 1), (b, 3)])
    assert m.kl == pytest.approx(3.25) and m.top1_agreement == pytest.approx(0.25) and m.topk_kl == pytest.approx(1.625)


def test_gate_needs_history_then_stops_only_dominated_plans():
    lad = Ladder(min_history=3, quantile=0.0, safety=1.0)
    assert lad.lower_bound("rung0", 1.0) is None
    for i, (kl, est) in enumerate([(0.2, 0.1), (0.4, 0.2), (0.9, 0.3)]):
        lad.observe(i, kl, latency=5.0 + i, memory=100.0, rung0=est)
    assert lad.lower_bound("rung0", 1.0) == pytest.approx(2.0)  # smallest measured/estimated ratio is 2
    # KL >= 2 at 6 ms / 100 MB: trial 0 (KL 0.2, 5 ms, 100 MB) dominates it
    assert "trial 0" in lad.blocker(2.0, latency=6.0, memory=100.0)
    # faster than every evaluated plan: it can still reach the front, however bad its KL
    assert lad.blocker(2.0, latency=4.0, memory=100.0) is None
    assert lad.blocker(None, latency=9.0, memory=999.0) is None
    assert "quality budget" in Ladder(quality_limit=0.1).blocker(0.5, latency=1.0, memory=1.0)


def test_cache_gives_back_what_was_stored_and_skips_damaged_entries(tmp_path):
    cache = EvalCache("d" * 64, tmp_path)
    calls = []
    compute = lambda: calls.append(1) or {"kl": 0.5}  # noqa: E731
    assert cache.get_or_compute("proxy", "abc", compute) == {"kl": 0.5}
    assert cache.get_or_compute("proxy", "abc", compute) == {"kl": 0.5}
    assert len(calls) == 1 and (cache.hits, cache.misses) == (1, 1)
    assert EvalCache("e" * 64, tmp_path).get("proxy", "abc") is None  # another data set
    (cache.dir / "proxy" / "abc.json").write_text("{not json")
    assert cache.get("proxy", "abc") is None


def test_predictor_learns_an_interaction_the_additive_sum_misses():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, size=(80, 3))
    kl = 0.05 * (x[:, 0] + x[:, 1]) + 2.0 * x[:, 0] * x[:, 1] * x[:, 2]  # product term: not additive
    additive = x[:, 0] + x[:, 1] + x[:, 2]
    pred = QualityPredictor(min_samples=16).fit(x, kl)
    assert pred.ready and pred.n_samples == 80
    from scipy.stats import spearmanr

    assert pred.cv_spearman > float(spearmanr(additive, kl)[0])
    assert pred.cv_spearman > 0.8
    low = [pred.lower_bound(row) for row in x]
    assert np.mean(np.asarray(low) <= kl + 1e-12) >= 0.85  # a lower bound most of the time
    assert not QualityPredictor(min_samples=16).fit(x[:10], kl[:10]).ready


def test_plan_features_follow_the_plan(tiny_llama):
    a = tiny_llama.anatomy
    dense = plan_features(plan_for(a), a)
    four = plan_features(plan_for(a, default=LayerChoice(bits=4, group_size=32)), a)
    names = dict(zip(FEATURE_NAMES, four, strict=True))
    assert len(dense) == len(FEATURE_NAMES)
    assert dict(zip(FEATURE_NAMES, dense, strict=True))["mean_bits"] == 16.0
    assert names["mean_bits"] == 4.0 and names["frac_le4_bits"] == 1.0 and names["frac_le3_bits"] == 0.0
    dropped = dict(zip(FEATURE_NAMES, plan_features(plan_for(a, drop_blocks=(1,)), a), strict=True))
    assert dropped["blocks_dropped"] == pytest.approx(1 / a.num_blocks)


def _count_evaluations(monkeypatch):
    from autocompress.evaluate import Evaluator

    seen = {"proxy": 0, "full": 0}
    proxy, full = Evaluator.proxy, Evaluator.full

    def counting_proxy(self, model, rows=slice(None)):
        seen["proxy"] += 1
        return proxy(self, model, rows)

    def counting_full(self, model):
        seen["full"] += model is not self._base_model
        return full(self, model)

    monkeypatch.setattr(Evaluator, "proxy", counting_proxy)
    monkeypatch.setattr(Evaluator, "full", counting_full)
    return seen


def test_a_new_study_on_the_same_data_evaluates_nothing_again(tmp_path, monkeypatch):
    from autocompress.search import search

    seen = _count_evaluations(monkeypatch)
    kw = dict(model="tiny-llama", data=TINY_DATA, trials=6, out=tmp_path, full_eval=2, seed=0)
    first = search(study="a", **kw)
    assert seen["proxy"] > 0 and seen["full"] > 0
    seen.update(proxy=0, full=0)
    second = search(study="b", **kw)
    assert seen == {"proxy": 0, "full": 0}
    assert [c.metrics["kl"] for c in second.pareto] == [c.metrics["kl"] for c in first.pareto]


def test_ladder_stops_only_trials_an_evaluated_plan_dominates(tmp_path, monkeypatch):
    from autocompress.search import search

    monkeypatch.setattr(Ladder, "min_history", 2)
    monkeypatch.setattr(Ladder, "safety", 1.0)
    monkeypatch.setattr(Ladder, "quantile", 0.5)  # an aggressive gate, so that it fires on a tiny study
    from autocompress.search import engine

    monkeypatch.setattr(
        engine, "recipe_seeds", lambda *_a, **_k: []
    )  # seeds are never gated: keep the trials for proposals
    res = search(
        model="tiny-llama", data=TINY_DATA, trials=44, out=tmp_path, study="g", full_eval=0, seed=1
    )  # past the ~25 seeds
    opt = optuna.load_study(study_name="g", storage=f"sqlite:///{tmp_path / 'g' / 'study.db'}")
    done = {t.number: t for t in opt.get_trials(states=(optuna.trial.TrialState.COMPLETE,))}
    stopped = [t for t in opt.get_trials(states=(optuna.trial.TrialState.PRUNED,)) if "ladder" in t.user_attrs]
    assert stopped, "the gate never fired"
    assert res.counts["stopped_rung0"] + res.counts["stopped_rung1"] == len(stopped)
    for t in stopped:
        assert t.user_attrs["rung"] in (0, 1)
        assert "baseline" not in t.user_attrs and "seed" not in t.user_attrs  # seeds are always measured
        blocker = done[int(t.user_attrs["ladder"].split("trial ")[1].split()[0])]
        assert blocker.values[1] <= t.user_attrs["cost"]["latency_ms"]
        assert blocker.values[2] <= t.user_attrs["cost"]["memory_mb"]
        if t.user_attrs["rung"] == 1:
            assert math.isfinite(t.user_attrs["rung1_partial_kl"])


def test_agreement_below_threshold_warns_and_names_the_fix():
    from autocompress.search.report import agreement_lines

    low = agreement_lines({"rung0_vs_rung1": {"n": 12, "spearman": 0.55, "kendall": 0.4}})
    high = agreement_lines({"rung0_vs_rung1": {"n": 12, "spearman": 0.93, "kendall": 0.8}})
    assert "misleading" in low[0] and "--proxy-tokens" in low[0]
    assert not any("misleading" in line for line in high)
    assert "not enough trials" in low[1]  # rung 1 -> 2 absent


# ---- the gate replayed on stored evaluated plans: how often it stops a plan that was on the front ----
LADDER_PLANS = Path(__file__).parent / "data" / "ladder_plans.json"  # written by bench/ladder_dataset.py


def _replay(ladder: Ladder) -> tuple[set[int], set[int], int]:
    """Give (trials the gate stops, trials on the front of every measured plan, gated proposals).

    The plans come in trial order, as in the search that measured them all (gate off); a stopped plan
    is not observed, as in the search; seeds are never gated.
    """
    plans = json.loads(LADDER_PLANS.read_text())["plans"]
    front = {plans[i]["trial"] for i in pareto_front([(p["kl"], p["latency_ms"], p["memory_mb"]) for p in plans])}
    stopped: set[int] = set()
    for p in plans:
        if not p["seeded"]:
            why = ladder.blocker(ladder.lower_bound("rung0", p["rung0"]), p["latency_ms"], p["memory_mb"])
            why = why or ladder.blocker(ladder.lower_bound("partial", p["partial"]), p["latency_ms"], p["memory_mb"])
            if why:
                stopped.add(p["trial"])
                continue
        ladder.observe(p["trial"], p["kl"], p["latency_ms"], p["memory_mb"], rung0=p["rung0"], partial=p["partial"])
    return stopped, front, sum(not p["seeded"] for p in plans)


def test_the_gate_rarely_stops_a_plan_that_would_have_reached_the_front():
    stopped, front, gated = _replay(Ladder())
    assert len(front) >= 10 and gated >= 60  # enough plans for a rate to mean something
    false_stop_rate = len(stopped & front) / len(front)
    assert false_stop_rate <= 0.05, sorted(stopped & front)
    assert len(stopped) >= 0.25 * gated  # and it does save work: a quarter of the proposals stop early


def test_an_over_eager_gate_shows_up_as_false_stops():
    """The replay can fail: trusting the median ratio (and doubling it) stops front plans."""
    stopped, front, _ = _replay(Ladder(quantile=0.5, safety=2.0))
    assert len(stopped & front) / len(front) > 0.05
