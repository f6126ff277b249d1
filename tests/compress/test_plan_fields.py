"""The fields this package added to LayerChoice: defaults keep old YAML and hashes, bad values name the field."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from autocompress.errors import PlanError
from autocompress.plan import BlockChoice, LayerChoice, ModelRef, Plan, Provenance


def _plan(default: LayerChoice) -> Plan:
    return Plan(
        model=ModelRef("tiny", "ab" * 32, "llama", 4),
        default=default,
        layers={
            "model.layers.1.mlp.up_proj": LayerChoice(
                sparsity=0.5, sparsity_pattern="2:4", rank_ratio=0.5, prune_method="magnitude"
            ),
            "model.layers.2.mlp.down_proj": LayerChoice(),
        },
        blocks={1: BlockChoice(keep_heads=2, keep_mlp_channels=64)},
        drop_blocks=(3,),
        provenance=Provenance(data_hash="cd" * 32, seed=7),
    )


def test_default_fields_keep_the_old_hash():
    # computed with plan.py before quant_method / lowrank_method / act_bits existed
    old = "d55df04f5eb9549ac504fc1052d44cdce4c9b43c26d35c20cd69d1540566a7e6"
    plan = _plan(LayerChoice(bits=4, group_size=128, symmetric=False))
    assert plan.hash() == old
    assert "quant_method" not in plan.to_yaml() and "act_bits" not in plan.to_yaml()


@pytest.mark.parametrize(
    "field,value",
    [("quant_method", "gptq"), ("lowrank_method", "svd-llm"), ("lowrank_method", "asvd"), ("act_bits", 8)],
)
def test_new_fields_round_trip_and_change_the_hash(field, value):
    base = _plan(LayerChoice(bits=4, rank_ratio=0.5))
    plan = _plan(LayerChoice(bits=4, rank_ratio=0.5, **{field: value}))
    assert f"{field}: {value}" in plan.to_yaml()
    assert Plan.from_yaml(plan.to_yaml()) == plan
    assert plan.hash() != base.hash()


@pytest.mark.parametrize(
    "field,value", [("quant_method", "awq"), ("lowrank_method", "pca"), ("act_bits", 4), ("act_bits", True)]
)
def test_bad_values_name_the_field(field, value):
    text = _plan(LayerChoice()).to_yaml().replace("default: {}", f"default: {{{field}: {value}}}")
    with pytest.raises(PlanError, match=rf"plan\.default: {field} must be one of"):
        Plan.from_yaml(text)


@given(
    st.integers(8, 4096),
    st.integers(8, 4096),
    st.floats(0.01, 1.0, allow_nan=False),
)
def test_rank_never_exceeds_break_even(out_f, in_f, ratio):
    r_star = out_f * in_f / (out_f + in_f)
    choice = LayerChoice(rank_ratio=ratio)
    if r_star < 8:
        with pytest.raises(PlanError, match="break-even"):
            choice.rank_for(out_f, in_f)
    else:
        rank = choice.rank_for(out_f, in_f)
        assert rank % 8 == 0 and 8 <= rank <= r_star
