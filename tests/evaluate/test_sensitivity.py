from __future__ import annotations

import random
from dataclasses import replace

import pytest

from autocompress.calib import DataConfig
from autocompress.evaluate import Evaluator
from autocompress.evaluate.sensitivity import build_sensitivity, plan_keys, unit_probes
from autocompress.hardware import load_profile
from autocompress.model import state_dict_hash
from autocompress.model.loading import anatomy_from_config
from autocompress.plan import Provenance
from autocompress.space import SearchSpace, SpaceContext
from autocompress.workbench import Workbench

DATA = DataConfig(seq_len=64, calib_tokens=512, proxy_tokens=128, eval_tokens=256)
SPACE = {
    "name": "t",
    "linear": {"bits": [16, 8, 4], "group_size": [32], "sparsity": [0.0, 0.5]},
    "structure": {"keep_mlp_ratio": [1.0, 0.5], "drop_blocks": [0, 1]},
}


@pytest.fixture(scope="module")
def wb(tmp_path_factory):
    return Workbench.open("tiny-llama", DATA)


def _ctx(wb):
    return SpaceContext(wb.lm.anatomy, wb.stats.drop_order(), wb.provenance())


def test_table_entries_equal_single_unit_evaluations(wb, tmp_path):
    space = SearchSpace.from_dict(SPACE)
    ctx = _ctx(wb)
    before = state_dict_hash(wb.lm.model)
    tokens = wb.data.proxy
    table = build_sensitivity(wb.lm.model, lambda m, p: wb.apply(p, into=m), space, ctx, tokens, tmp_path)
    assert state_dict_hash(wb.lm.model) == before  # probing never touches the base model
    probes = dict(unit_probes(space, ctx))
    assert set(table.entries) == set(probes)
    assert len(probes) == 8 * 3 + 4 * 2  # 8 units × (w8, w4, s50) + 4 blocks × (mlp width, drop)
    ev = Evaluator(wb.lm.model, wb.data, "causal-lm")
    for key in random.Random(0).sample(sorted(probes), 6):  # the shared-tensor copy gives the same KL as a full copy
        assert table.entries[key] == pytest.approx(ev.proxy(wb.apply(probes[key])).kl, rel=1e-5, abs=1e-8)
        assert plan_keys(probes[key], space, ctx) == [key]
    assert table.predict(replace(probes[next(iter(probes))], layers={}), space, ctx) == 0.0


def test_table_is_read_from_the_cache(wb, tmp_path, monkeypatch):
    space = SearchSpace.from_dict(SPACE)
    ctx = _ctx(wb)
    first = build_sensitivity(wb.lm.model, lambda m, p: wb.apply(p, into=m), space, ctx, wb.data.proxy, tmp_path)

    def boom(*_a, **_k):
        raise AssertionError("recomputed")

    monkeypatch.setattr("autocompress.evaluate.sensitivity.kl_to_base", boom)
    again = build_sensitivity(wb.lm.model, lambda m, p: wb.apply(p, into=m), space, ctx, wb.data.proxy, tmp_path)
    assert again.entries == first.entries


def test_a_model_wide_unit_is_probed_on_a_copy_of_every_block(wb, tmp_path):
    space = SearchSpace.from_dict(
        {"name": "m", "granularity": "model", "linear": {"bits": [16, 4], "group_size": [32]}}
    )
    ctx = _ctx(wb)
    before = state_dict_hash(wb.lm.model)
    table = build_sensitivity(wb.lm.model, lambda m, p: wb.apply(p, into=m), space, ctx, wb.data.proxy, tmp_path)
    assert state_dict_hash(wb.lm.model) == before  # the probe compressed copies of all blocks, not the base's
    probes = dict(unit_probes(space, ctx))
    assert sorted(k.partition("|")[0] for k in table.entries) == ["attn.", "mlp."]
    ev = Evaluator(wb.lm.model, wb.data, "causal-lm")
    for key, plan in probes.items():
        assert table.entries[key] == pytest.approx(ev.proxy(wb.apply(plan)).kl, rel=1e-5, abs=1e-8)


@pytest.mark.slow
def test_every_probe_of_the_default_model_reads_back_as_its_own_key():
    """A plan's table lookup finds the level each unit was set to, also where the runtime stores some of
    the unit's linears in a fallback (a K-quant MLP on a 576-wide model keeps gate/up in Q5_0 / Q4_0):
    reading a unit off its first linear priced a Q2_K MLP as a Q4_0 one. Config only: no weights read."""
    a = anatomy_from_config(None)
    space = SearchSpace.load("default").for_profile(load_profile("jetson"))
    ctx = SpaceContext(a, list(range(a.num_blocks)), Provenance())
    probes = list(unit_probes(space, ctx))
    fallbacks = 0
    for key, plan in probes:
        assert plan_keys(plan, space, ctx) == [key]
        fallbacks += len({c.format for c in plan.layers.values()}) > 1
    assert fallbacks >= a.num_blocks  # the case above is there: units whose linears hold different formats
