"""No-fake-speed-up rules and monotonicity: what a device model must never claim."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autocompress.errors import PlanError
from autocompress.hardware import CostModel, list_profiles, load_profile, predict
from autocompress.hardware.anchors import llama_like_anatomy
from autocompress.model.anatomy import ModelAnatomy
from autocompress.plan import LayerChoice, ModelRef, Plan

PROFILES = {p.id: p for p in list_profiles() if not p.calibrated}  # shipped ones; not this machine's local.yaml
ONE_B = llama_like_anatomy("one-b", n_blocks=4)


def plan_for(a: ModelAnatomy, **kw: object) -> Plan:
    return Plan(model=ModelRef.of(a), **kw)  # type: ignore[arg-type]


def sparse_runtime(profile_id: str):
    p = PROFILES[profile_id]
    kernels = p.kernels.model_copy(update={"unstructured_sparse_storage": True, "sparse_runtime": "deepsparse"})
    return p.model_copy(update={"kernels": kernels})


@pytest.mark.parametrize("profile_id", sorted(PROFILES))
def test_unstructured_sparsity_without_sparse_runtime_changes_nothing(profile_id: str) -> None:
    cm = CostModel(PROFILES[profile_id], ONE_B)
    dense = cm.predict(plan_for(ONE_B, default=LayerChoice(bits=8)))
    for s in (0.3, 0.5, 0.9):
        sparse = cm.predict(plan_for(ONE_B, default=LayerChoice(bits=8, sparsity=s)))
        assert sparse == dense  # zeros stored dense: no bytes, no time, no energy saved


@pytest.mark.parametrize("profile_id", ["jetson-orin-nano-25w", "raspberry-pi-5", "nvidia-a100-80gb"])
@pytest.mark.parametrize("bits", [16, 8, 4])
def test_more_sparsity_with_a_sparse_runtime_never_costs_more(profile_id: str, bits: int) -> None:
    cm = CostModel(sparse_runtime(profile_id), ONE_B)
    costs = [
        cm.predict(plan_for(ONE_B, default=LayerChoice(bits=bits, group_size=128 if bits < 8 else None, sparsity=s)))
        for s in (0.0, 0.3, 0.5, 0.7, 0.9)
    ]
    for lo, hi in itertools.pairwise(costs):
        assert hi.latency_ms <= lo.latency_ms + 1e-12 and hi.weights_mb <= lo.weights_mb + 1e-12
    assert costs[-1].latency_ms < costs[0].latency_ms  # 90 % sparse is cheaper than dense on any format


@pytest.mark.parametrize("profile_id", sorted(PROFILES))
def test_lower_rank_below_break_even_never_costs_more(profile_id: str) -> None:
    cm = CostModel(PROFILES[profile_id], ONE_B)
    costs = [cm.predict(plan_for(ONE_B, default=LayerChoice(rank_ratio=r))) for r in (1.0, 0.9, 0.75, 0.5, 0.25)]
    for hi, lo in itertools.pairwise(costs):
        assert lo.latency_ms <= hi.latency_ms + 1e-12
        assert lo.prefill_ms <= hi.prefill_ms + 1e-12
        assert lo.weights_mb < hi.weights_mb
    # at the break-even rank the same numbers are stored, in two kernels: never cheaper than dense
    dense = cm.predict(plan_for(ONE_B))
    assert costs[0].latency_ms >= dense.latency_ms


def test_rank_above_break_even_is_rejected() -> None:
    # a 4 x 16 gate: r* = 3.2, and rank_for rounds up to the minimum rank 8 (capped at 4) -> above r*
    a = llama_like_anatomy("narrow", n_blocks=1, hidden=16, heads=2, kv=2, mlp=4, vocab=32)
    gate = next(s for s in a.linears if s.role == "gate")
    plan = plan_for(a, layers={gate.name: LayerChoice(rank_ratio=1.0)})
    with pytest.raises(PlanError, match=r"break-even rank 3\.2"):
        CostModel(PROFILES["jetson-orin-nano-25w"], a).predict(plan)


def test_two_four_is_bytes_and_compute_only_where_declared() -> None:
    plan = plan_for(ONE_B, default=LayerChoice(sparsity=0.5, sparsity_pattern="2:4"))
    for p in PROFILES.values():
        cm = CostModel(p, ONE_B, prompt_tokens=512)
        dense, sparse = cm.predict(plan_for(ONE_B)), cm.predict(plan)
        if p.kernels.sparse_2_4:
            assert sparse.latency_ms < dense.latency_ms and dense.latency_ms / sparse.latency_ms < 2.0
        else:
            assert sparse == dense, p.id


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    profile_id=st.sampled_from(sorted(PROFILES)),
    bits=st.sampled_from([16, 8, 6, 4, 3, 2]),
    group=st.sampled_from([None, 32, 128]),
    rank=st.sampled_from([None, 0.25, 0.9]),
    prompt=st.sampled_from([1, 16, 512]),
    ctx=st.sampled_from([1, 1024, 8192]),
)
def test_prediction_never_beats_the_roofline_floor(profile_id, bits, group, rank, prompt, ctx) -> None:
    c = predict(
        plan_for(ONE_B, default=LayerChoice(bits=bits, group_size=group, rank_ratio=rank)),
        ONE_B,
        PROFILES[profile_id],
        prompt_tokens=prompt,
        context_tokens=ctx,
    )
    assert 0 < c.decode_floor_ms <= c.decode_ms_per_token == c.latency_ms
    assert 0 < c.prefill_floor_ms <= c.prefill_ms
    assert c.tokens_per_s == pytest.approx(1e3 / c.latency_ms)
    assert c.energy_mj_per_token == c.energy_mj > 0


def test_fp32_runtime_stores_dense_weights_in_four_bytes() -> None:
    laptop = PROFILES["x86-avx2-laptop"]
    fp32 = laptop.model_copy(update={"dense_bits": 32})
    a = ONE_B
    c16, c32 = (CostModel(p, a).predict(plan_for(a)) for p in (laptop, fp32))
    assert c32.weights_mb == pytest.approx(2 * c16.weights_mb)
    assert c32.latency_ms > c16.latency_ms
    q16, q32 = (CostModel(p, a).predict(plan_for(a, default=LayerChoice(bits=8))) for p in (laptop, fp32))
    assert q32.weights_mb == pytest.approx(q16.weights_mb + a.other_params * 2 / 1e6)  # only embeddings grow


def test_bottom_up_energy_split_is_used_when_present() -> None:
    p = load_profile("jetson")
    split = p.model_copy(update={"energy_pJ_per_byte": 100.0, "energy_pJ_per_flop": 1.0})
    plan = plan_for(ONE_B)
    base, bottom_up = CostModel(p, ONE_B).predict(plan), CostModel(split, ONE_B).predict(plan)
    assert bottom_up.latency_ms == base.latency_ms
    bytes_mj = (base.weights_mb + base.kv_cache_mb) * 1e6 * 100.0 * 1e-9
    assert bottom_up.energy_mj > p.idle_W * base.latency_ms + bytes_mj


def test_measured_fixed_costs_may_make_tiny_layers_slower_but_never_real_ones() -> None:
    """A calibrated CPU profile measures dynamic int8 paying ~1 µs per linear (quantize + rescale) that
    fp32 does not: on a 64-wide toy layer int8 is really slower, and the model says so instead of
    inventing a speed-up; on model-sized layers fewer bits are faster again."""
    cpu = PROFILES["x86-avx2-laptop"].model_copy(
        update={"dense_bits": 32, "linear_overhead_us_by_format": {"fp32": 0.0, "int8": 1.0, "int4": 1.0}}
    )
    toy = llama_like_anatomy("toy", n_blocks=2, hidden=64, heads=4, kv=2, mlp=128, vocab=256)
    small = llama_like_anatomy("small", n_blocks=2, hidden=576, heads=9, kv=3, mlp=1536, vocab=49152)
    for a, int8_wins in ((toy, False), (small, True)):
        cm = CostModel(cpu, a)
        fp32, int8 = (cm.predict(plan_for(a, default=LayerChoice(bits=b))) for b in (16, 8))
        assert (int8.latency_ms < fp32.latency_ms) == int8_wins
        assert int8.weights_mb < fp32.weights_mb  # bytes always shrink
