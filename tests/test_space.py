from __future__ import annotations

import optuna
import pytest
import yaml

from autocompress import formats
from autocompress.errors import SpaceError
from autocompress.hardware import load_profile
from autocompress.plan import Provenance
from autocompress.space import EMBEDDING_PARAM, SearchSpace, SpaceContext, Unit, list_spaces

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _ctx(lm):
    order = [3, 1, 0, 2] if lm.anatomy.num_blocks == 4 else list(reversed(range(lm.anatomy.num_blocks)))
    return SpaceContext(lm.anatomy, drop_order=order, provenance=Provenance(seed=0))


@pytest.mark.parametrize(
    "name", ["default", "quant-only", "prune-only", "lowrank-only", "structure-only", "joint-full"]
)
def test_shipped_spaces_give_valid_plans(name, any_tiny):
    sp = SearchSpace.load(name).for_profile(load_profile("rpi"))  # llama.cpp's formats
    study = optuna.create_study(directions=["minimize"], sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(15):
        trial = study.ask()
        plan = sp.suggest(trial, _ctx(any_tiny))
        plan.validate(any_tiny.anatomy)
        assert sp.plan_from_params(trial.params, _ctx(any_tiny)) == plan  # params alone rebuild the plan
        study.tell(trial, 0.0)


def test_listed_spaces():
    assert {"default", "quant-only", "prune-only", "lowrank-only", "structure-only", "joint-full"} <= set(list_spaces())


def test_baselines_are_uniform(tiny_llama):
    sp = SearchSpace.load("default").for_profile(load_profile("x86-avx2-laptop"))  # llama.cpp
    ctx = _ctx(tiny_llama)
    params = sp.baseline_params(tiny_llama.anatomy)
    assert {"uncompressed", "Q8_0", "Q4_0", "drop-2-blocks"} <= set(params)
    assert "2:4-50%" not in params  # llama.cpp has no sparse kernel: the level left the space
    plans = {k: sp.plan_from_params(v, ctx) for k, v in params.items()}
    assert (
        not plans["uncompressed"].layers and not plans["uncompressed"].blocks and not plans["uncompressed"].drop_blocks
    )
    q4 = plans["Q4_0"]
    emb = tiny_llama.anatomy.embeddings[0].name
    assert {c.format for n, c in q4.layers.items() if n != emb} == {"Q4_0"}
    assert len(q4.layers) == len(tiny_llama.anatomy.linears) + 1
    assert q4.layers[emb].format == "Q8_0"  # the tied table as llama.cpp stores it: Q6_K -> Q8_0 on 64-wide rows
    assert plans["drop-2-blocks"].drop_blocks == (1, 3)  # the two most redundant blocks, by measured distance
    mlp = plans["mlp-75%"]
    assert all(b.keep_mlp_channels == 96 for b in mlp.blocks.values()) and len(mlp.blocks) == 4


def test_a_baseline_may_set_the_token_table_format(tiny_llama):
    spec = {"name": "t", "linear": {"format": ["dense", "Q8_0"]}, "embedding_format": ["dense", "Q8_0", "Q4_0"]}
    sp = SearchSpace.from_dict({**spec, "baselines": {"q8": {"format": "Q8_0", "embedding_format": "Q4_0"}}})
    plan = sp.plan_from_params(sp.baseline_params(tiny_llama.anatomy)["q8"], _ctx(tiny_llama))
    assert plan.embedding_choice(tiny_llama.anatomy.embeddings[0].name).format == "Q4_0"
    with pytest.raises(SpaceError, match="baselines.q8.embedding_format"):
        SearchSpace.from_dict({**spec, "baselines": {"q8": {"embedding_format": "Q9_9"}}})


def test_mlp_width_is_aligned(tiny_llama):
    sp = SearchSpace.from_dict({"name": "t", "structure": {"keep_mlp_ratio": [0.5, 0.7]}, "alignment": 16})
    plan = sp.plan_from_params({"b0.keep_mlp_ratio": 0.7}, _ctx(tiny_llama))
    assert plan.blocks[0].keep_mlp_channels % 16 == 0


def test_extreme_plans_cover_every_linear_level(tiny_llama):
    sp = SearchSpace.load("default").for_profile(load_profile("x86-avx2-laptop"))
    plans = sp.extreme_plans(_ctx(tiny_llama))
    used = {c.format for p in plans for c in p.layers.values()}
    assert {"Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "IQ4_NL"} <= used  # every format 64-wide rows can hold
    assert all(len(p.drop_blocks) == 3 for p in plans)


@pytest.mark.parametrize(
    ("patch", "fragment"),
    [
        ({"granularity": "head"}, "granularity"),
        ({"linear": {"bits": [4, 1]}}, "invalid level"),
        ({"linear": {"colour": [1]}}, "not a knob"),
        ({"linear": {"bits": []}}, "non-empty list"),
        ({"structure": {"keep_mlp_ratio": [1.5]}}, "out of range"),
        ({"extra": 1}, "unknown field"),
        ({"name": ""}, "name"),
        ({"tie": "qkv"}, "tie must be one of"),
        ({"overrides": {"ffn": {"bits": [8]}}}, "overrides.ffn is not a group"),
        ({"linear": {"group_size": [0]}}, r"invalid level 0 in linear\.group_size"),
        ({"linear": {"bits": [16, "4"]}}, r"invalid level '4' in linear\.bits"),
        ({"overrides": {"mlp": {"sparsity": [1.5]}}}, r"overrides\.mlp\.sparsity"),
        ({"baselines": {"b": {"bits": 1}}}, r"baselines\.b\.bits"),
        ({"baselines": {"b": {"drop_blocks": -1}}}, r"baselines\.b\.drop_blocks"),
        ({"baselines": {"b": 4}}, r"baselines\.b must be a mapping"),
        ({"alignment": True}, "alignment"),
    ],
)
def test_invalid_space_files(tmp_path, patch, fragment):
    base = {"name": "x", "linear": {"bits": [16, 4]}}
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump({**base, **patch}))
    with pytest.raises(SpaceError, match=fragment):
        SearchSpace.load(f)


def test_unknown_space_lists_the_available_ones():
    with pytest.raises(SpaceError, match="available: .*default"):
        SearchSpace.load("nosuchspace")


def test_mixed_seeds_keep_the_most_sensitive_blocks_finer(tiny_llama):
    sp = SearchSpace.load("quant-only").for_profile(load_profile("x86-avx2-laptop"))
    ctx = _ctx(tiny_llama)
    seeds = sp.mixed_seed_params(tiny_llama.anatomy, sensitivity_order=[2, 0, 1, 3])
    halves = [k for k in seeds if "+50% " in k]
    assert halves
    for name in halves:
        coarse, fine = name.split("+50% ")
        plan = sp.plan_from_params(seeds[name], ctx)
        got = {s.block: plan.choice_for(s.name).format for s in tiny_llama.anatomy.linears}
        want = {f: _stored(f, 64) for f in (coarse, fine)}  # as llama.cpp stores it on 64-wide rows
        assert got == {0: want[fine], 1: want[coarse], 2: want[fine], 3: want[coarse]}, name
    assert (
        SearchSpace.from_dict({"name": "m", "granularity": "model", "linear": {"bits": [8, 4]}}).mixed_seed_params(
            tiny_llama.anatomy, [0, 1, 2, 3]
        )
        == {}
    )


def _stored(name: str, width: int) -> str:
    while formats.get(name).check((1, width)) is not None:
        name = formats.fallback(name, width)
    return name


def _layer_sets(plan, anatomy, roles):
    """Per block, the set of distinct choices the linears of ``roles`` got."""
    return [{repr(plan.layers.get(s.name)) for s in b.linears if s.role in roles} for b in anatomy.blocks]


def _random_plans(sp, lm, n=12):
    study = optuna.create_study(directions=["minimize"], sampler=optuna.samplers.RandomSampler(seed=3))
    plans = []
    for _ in range(n):
        trial = study.ask()
        plans.append(sp.suggest(trial, _ctx(lm)))
        study.tell(trial, 0.0)
    return plans


def test_fusing_runtime_ties_qkv_and_gate_up(tiny_llama):
    from autocompress.hardware import load_profile
    from autocompress.space import runtime_fuses_projections

    sp = SearchSpace.load("joint-full")
    assert sp.tie == "auto"
    assert runtime_fuses_projections(load_profile("jetson-mlc").runtime)
    assert not runtime_fuses_projections(load_profile("jetson").runtime)  # llama.cpp keeps q/k/v apart
    tied, free = sp.for_runtime("tensorrt-llm"), sp.for_runtime("llama.cpp")
    assert (tied.tie, free.tie) == ("fused", "none")
    assert tied.definition() != free.definition()  # a study or cached table never mixes the two
    a = tiny_llama.anatomy
    for plan in _random_plans(tied, tiny_llama):
        plan.validate(a)
        assert all(len(s) == 1 for s in _layer_sets(plan, a, ("q", "k", "v")))
        assert all(len(s) == 1 for s in _layer_sets(plan, a, ("gate", "up")))
    untied = [s for plan in _random_plans(free, tiny_llama) for s in _layer_sets(plan, a, ("q", "k", "v"))]
    assert any(len(s) > 1 for s in untied)  # without ties the three get their own choices
    # one parameter set per fused group: the tied space asks for fewer parameters
    n_tied = len(tied.units(a))
    assert n_tied == len(free.units(a)) - 3 * a.num_blocks  # q,k,v -> 1 and gate,up -> 1 per block


def test_tie_does_not_change_block_spaces():
    sp = SearchSpace.load("default")
    assert sp.for_runtime("tensorrt-llm").definition() == sp.for_runtime("llama.cpp").definition() == sp.definition()


def _space(granularity: str, tie: str = "none") -> SearchSpace:
    return SearchSpace.from_dict(
        {
            "name": "t",
            "granularity": granularity,
            "tie": tie,
            "linear": {"bits": [4, 8]},
            "structure": {"keep_mlp_ratio": [0.5, 1.0]},
            "embedding_format": ["Q8_0", "Q4_0"],
        }
    )


GRAINS = [("model", "none"), ("block", "none"), ("linear", "none"), ("linear", "fused")]


@pytest.mark.parametrize(("granularity", "tie"), GRAINS)
def test_units_partition_the_linears_and_their_keys_decode_back(granularity, tie, tiny_llama):
    a = tiny_llama.anatomy
    units = _space(granularity, tie).units(a)
    assert sorted(n for u in units for n in u.linears) == sorted(s.name for s in a.linears)  # each linear once
    assert len({u.key for u in units}) == len(units)
    for u in units:
        back = Unit.from_key(u.key)
        assert (back.block, back.name) == (u.block, u.name)
        assert {a.find_linear(n).group for n in u.linears} == {u.group}
        assert {a.find_linear(n).block for n in u.linears} <= ({u.block} if u.block is not None else set(range(4)))


def test_a_unit_named_by_its_linear_keeps_the_dots_of_the_name():
    u = Unit(3, "model.layers.3.mlp.down_proj")  # two linears of one role in a block are kept apart by name
    assert Unit.from_key(u.key) == u
    assert Unit.from_key(Unit.of_block(3).key) == Unit.of_block(3)
    for bad in ("b3", "mlp", "b3.mlp"):  # a parameter prefix always ends in a dot
        with pytest.raises(SpaceError, match="prefix"):
            Unit.from_key(bad)


# Parameter names that stored studies hold: a rename would make every stored trial unreadable.
STORED_NAMES = {
    ("model", "none"): {"attn.bits", "mlp.bits", "keep_mlp_ratio", "embedding.format"},
    ("block", "none"): {"b0.attn.bits", "b3.mlp.bits", "b2.keep_mlp_ratio", "embedding.format"},
    ("linear", "none"): {"b0.q.bits", "b1.v.bits", "b3.down.bits", "b3.keep_mlp_ratio"},
    ("linear", "fused"): {"b1.qkv.bits", "b1.gate_up.bits", "b1.o.bits", "b0.down.bits"},
}


@pytest.mark.parametrize(("granularity", "tie"), GRAINS)
def test_parameter_names_are_the_ones_stored_studies_hold(granularity, tie, tiny_llama):
    sp = _space(granularity, tie)
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    plan = sp.suggest(trial, _ctx(tiny_llama))
    assert STORED_NAMES[(granularity, tie)] <= set(trial.params)
    assert EMBEDDING_PARAM == "embedding.format"
    assert sp.plan_from_params(dict(trial.params), _ctx(tiny_llama)) == plan
