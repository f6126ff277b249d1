"""Plans in the target runtime's formats: legacy plans, per-profile spaces, embedding tables, exports."""

from __future__ import annotations

import json
import math

import optuna
import pytest
import torch
from safetensors import safe_open

from autocompress import formats
from autocompress.compress import apply_plan_to
from autocompress.compress.quantize import rtn_quantize
from autocompress.errors import PlanError
from autocompress.export import export_hf
from autocompress.hardware import load_profile
from autocompress.hardware.anchors import anchor_anatomy
from autocompress.plan import LayerChoice, ModelRef, Plan, Provenance
from autocompress.space import EMBEDDING_PARAM, SearchSpace, SpaceContext

optuna.logging.set_verbosity(optuna.logging.WARNING)

LEGACY = """# autocompress plan 0123456789abcdef
schema_version: 1
model: {name: tiny-llama, hash: HASH, architecture: llama, num_blocks: NBLOCKS}
default: {bits: 4, group_size: 32, symmetric: false}
layers:
  LAYER: {bits: 8}
provenance: {seed: 0}
"""


def _legacy(tiny_llama) -> str:
    a = tiny_llama.anatomy
    return (
        LEGACY.replace("HASH", a.model_hash).replace("NBLOCKS", str(a.num_blocks)).replace("LAYER", a.linears[0].name)
    )


def test_a_plan_written_before_formats_loads_as_generic_grids_with_the_same_weights(tiny_llama, tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text(_legacy(tiny_llama))
    plan = Plan.load(path)
    a = tiny_llama.anatomy
    assert plan.default.format == "int4-g32-asym" and plan.layers[a.linears[0].name].format == "int8-ch-sym"
    assert "bits" not in plan.to_dict()["default"]  # saved again, it names the format
    model = apply_plan_to(tiny_llama.model, a, plan, None)
    for site in a.linears[:3]:
        w = tiny_llama.model.get_submodule(site.name).weight.detach().float()
        c = plan.choice_for(site.name)
        want = rtn_quantize(w, c.bits, c.group_size, c.symmetric)  # the pre-format quantizer
        assert torch.equal(model.get_submodule(site.name).weight, want), site.name


@pytest.fixture(scope="module")
def smollm_space():
    a = anchor_anatomy("smollm2-135m")
    space = SearchSpace.load("default").for_profile(load_profile("jetson"))
    ctx = SpaceContext(a, drop_order=list(range(a.num_blocks)), provenance=Provenance())
    return a, space, ctx


def test_jetson_space_offers_only_gguf_formats_each_tensor_can_hold(smollm_space):
    a, space, ctx = smollm_space
    gguf = {f.name for f in formats.for_runtime("llama.cpp")}
    for u in space.units(a):
        offered = set(space.unit_levels(u.group, u.linears, a)["format"]) - {"dense"}
        assert offered <= gguf
        widths = {a.find_linear(n).in_features for n in u.linears}
        k_quants = {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}
        if widths == {576}:  # attention
            assert not offered & k_quants and {"Q8_0", "Q4_0", "IQ4_NL"} <= offered
        else:  # the MLP: gate/up 576 wide, ffn_down 1536 (a multiple of 256)
            assert k_quants <= offered
    assert space.levels_for("mlp")["sparsity"] == (0.0,) and space.levels_for("mlp")["rank_ratio"] == (None,)
    assert any("sparsity" in r for r in space.removed) and any("rank_ratio" in r for r in space.removed)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    for _ in range(20):  # random plans, structure included: every tensor stays storable
        plan = space.suggest(study.ask(), ctx)
        plan.validate(a)


def test_runtime_baselines_follow_llama_cpp_fallbacks(smollm_space):
    a, space, ctx = smollm_space
    params = space.baseline_params(a)
    plan = space.plan_from_params(params["Q4_K"], ctx)
    blk = a.blocks[0]
    by_role = {s.role: plan.choice_for(s.name).format for s in blk.linears}
    assert by_role == {"q": "Q5_0", "k": "Q5_0", "v": "Q5_0", "o": "Q5_0", "gate": "Q5_0", "up": "Q5_0", "down": "Q4_K"}
    emb = a.embeddings[0].name
    assert plan.embedding_choice(emb).format == "Q8_0"  # llama.cpp's Q6_K head falls back on 576-wide rows
    assert params["Q4_K"][EMBEDDING_PARAM] == "Q8_0"
    cut = space.plan_from_params({**params["Q4_K"], "b0.keep_mlp_ratio": 0.875}, ctx)
    assert cut.choice_for(blk.linears[-1].name).format == "Q5_0"  # 1344 wide: Q4_K falls back
    cut.validate(a)


@pytest.mark.parametrize("hw", ["nvidia-l4", "nvidia-a100-80gb"])
def test_gpu_spaces_give_plans_the_compressed_tensors_exporter_takes(hw):
    """On a TensorRT-LLM / torchao target the 576-wide rows cannot hold int4 groups of 128 in the
    packed checkpoint those runtimes load: baselines and proposals store them per channel instead."""
    from autocompress.export.compressed_tensors import compressed_tensors_blockers

    a = anchor_anatomy("smollm2-135m")
    space = SearchSpace.load("default").for_profile(load_profile(hw))
    ctx = SpaceContext(a, drop_order=list(range(a.num_blocks)), provenance=Provenance())
    params = space.baseline_params(a)
    assert "int4-g128-sym" in params
    plan = space.plan_from_params(params["int4-g128-sym"], ctx)
    by_role = {s.role: plan.choice_for(s.name).format for s in a.blocks[0].linears}
    assert by_role == {r: "int8-ch-sym" for r in ("q", "k", "v", "o", "gate", "up")} | {"down": "int4-g128-sym"}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=5))
    plans = [plan, *(space.suggest(study.ask(), ctx) for _ in range(20))]
    for p in plans:
        p.validate(a)
        assert not [b for b in compressed_tensors_blockers(p, a) if "multiple of the group size" in b]


def test_a_bits_space_is_refused_for_a_runtime_without_those_grids():
    legacy = SearchSpace.from_dict({"name": "old", "linear": {"bits": [16, 4], "group_size": [128]}})
    with pytest.raises(Exception, match=r"int4-g128-sym.*llama\.cpp"):
        legacy.for_profile(load_profile("jetson"))


def test_embedding_table_is_quantized_in_its_format(tiny_llama):
    a = tiny_llama.anatomy
    emb = a.embeddings[0]
    fmt = formats.get("Q8_0")
    plan = Plan(model=ModelRef.of(a), layers={emb.name: LayerChoice(format="Q8_0")})
    model = apply_plan_to(tiny_llama.model, a, plan, None)
    base = tiny_llama.model.get_submodule(emb.name).weight.detach().float()
    want = fmt.dequantize(fmt.quantize(base))
    assert torch.equal(model.get_submodule(emb.name).weight, want)
    assert not torch.equal(want, base)
    with pytest.raises(PlanError, match="rtn only"):
        Plan(model=ModelRef.of(a), layers={emb.name: LayerChoice(format="Q8_0", quant_method="gptq")}).validate(a)


def test_hf_export_is_in_the_base_dtype_and_size(tiny_llama, tmp_path):
    a = tiny_llama.anatomy
    plan = Plan(model=ModelRef.of(a), default=LayerChoice(format="Q4_0"))
    model = apply_plan_to(tiny_llama.model, a, plan, None)
    export_hf(model, plan, tmp_path / "out")
    f = tmp_path / "out" / "model.safetensors"
    with safe_open(str(f), "pt") as st:
        names = list(st.keys())
        dtypes = {st.get_slice(k).get_dtype() for k in names}
        numel = sum(math.prod(st.get_slice(k).get_shape()) for k in names)
    assert dtypes == {"BF16"}
    assert f.stat().st_size == pytest.approx(2 * numel, rel=0.02)  # 2 bytes a weight (+ the header)
    assert json.loads((tmp_path / "out" / "autocompress.json").read_text())["dtype"] == "bfloat16"
