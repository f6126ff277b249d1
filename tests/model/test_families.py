"""Every family is recognised by its structure: random-init models built from real configs of
Qwen3 (head_dim != hidden / heads, per-head q / k norms), Mistral, OLMo-2 (post-norms, q / k norms
over all heads), Granite (multipliers), Phi-3 (fused qkv_proj and gate_up_proj), GPT-2 and BERT.
For each: the anatomy the config and module tree imply, a plan using every knob family applied
bit-identically twice, pruning that slices fused and separate projections alike, the cost model's
head_dim, and a search of 8 trials end to end."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from autocompress.calib import DataConfig
from autocompress.compress import apply_plan_to
from autocompress.compress.hessian import Hessians, collect_hessians, input_key
from autocompress.compress.structure import dense_weight, shrink_heads, shrink_mlp
from autocompress.errors import ModelLoadError
from autocompress.hardware import CostModel, load_profile
from autocompress.model.inspect import anatomy_of, block_path
from autocompress.model.loading import load_model, state_dict_hash, tiny_model
from autocompress.plan import BlockChoice, LayerChoice, ModelRef, Plan, Provenance

DATA = "d" * 16
SEARCH_DATA = DataConfig(seq_len=16, calib_tokens=128, proxy_tokens=32, eval_tokens=32)
LLAMA_ROLES = {"q", "k", "v", "o", "gate", "up", "down"}
FAMILIES = {  # tiny model -> the linear roles its blocks must show
    "tiny-qwen3": LLAMA_ROLES,
    "tiny-mistral": LLAMA_ROLES,
    "tiny-olmo2": LLAMA_ROLES,
    "tiny-granite": LLAMA_ROLES,
    "tiny-phi3": {"qkv", "o", "gate_up", "down"},
    "tiny-gpt2": {"qkv", "o", "fc1", "fc2"},
    "tiny-bert": {"q", "k", "v", "o", "fc1", "fc2"},
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    return load_model(request.param)


def _ids(seed=0, tokens=16):
    return torch.randint(3, 250, (2, tokens), generator=torch.Generator().manual_seed(seed))


def _out(model, ids):
    out = model(ids)
    return out.logits


def test_anatomy_follows_the_config_and_the_module_tree(family):
    a, model, cfg = family.anatomy, family.model, family.model.config
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    assert a.num_blocks == cfg.num_hidden_layers == len(model.get_submodule(block_path(model)))
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert a.tied_embeddings == (head is not None and head.weight is emb.weight)
    assert a.task == ("encoder" if a.architecture == "bert" else "causal-lm")
    params = {id(p): p.numel() for p in model.parameters()}
    assert a.block_linear_params + a.other_params == sum(params.values())
    for b in a.blocks:
        assert {s.role for s in b.linears} == FAMILIES[a.name]
        assert (b.num_heads, b.num_kv_heads, b.head_dim) == (heads, kv, head_dim)
        for s in b.linears:
            w = dense_weight(model.get_submodule(s.name))
            assert (s.out_features, s.in_features) == tuple(w.shape)
            if s.parts:  # fused: the roles stacked along the output fill it exactly
                assert sum(width for _, width in s.parts) == s.out_features
    if a.name == "tiny-qwen3":
        assert head_dim * heads != cfg.hidden_size and a.blocks[0].qk_norm == "per-head"
    if a.name == "tiny-olmo2":
        assert a.blocks[0].qk_norm == "per-projection" and "post_feedforward_layernorm" in a.blocks[0].norms
    if a.name == "tiny-granite":
        assert a.embedding_scale == cfg.embedding_multiplier != 1.0
    if a.name == "tiny-phi3":
        qkv = next(s for s in a.blocks[0].linears if s.role == "qkv")
        assert dict(qkv.parts) == {"q": heads * head_dim, "k": kv * head_dim, "v": kv * head_dim}


def _from_model_type(model_type: str, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = dict(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
        eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**shape, **extra})).eval()


@pytest.mark.parametrize(
    ("model_type", "roles"),
    [
        ("gemma3_text", LLAMA_ROLES),
        ("cohere2", LLAMA_ROLES),
        ("smollm3", LLAMA_ROLES),
        ("glm", {"q", "k", "v", "o", "gate_up", "down"}),
        ("nemotron", {"q", "k", "v", "o", "up", "down"}),  # an MLP without a gate
        ("starcoder2", {"q", "k", "v", "o", "fc1", "fc2"}),
        ("phi", {"q", "k", "v", "o", "fc1", "fc2"}),
    ],
)
def test_more_families_are_recognised_and_pruned(model_type, roles):
    """Families no test above builds: found by structure alone, heads and MLP channels cut, still running."""
    model = _from_model_type(model_type)
    a = anatomy_of(model, model_type, "")
    b = a.blocks[0]
    assert {s.role for s in b.linears} == roles and (b.num_heads, b.num_kv_heads, b.head_dim) == (4, 2, 16)
    shrink_heads(model, 0, b.heads_per_kv)
    shrink_mlp(model, 0, b.mlp_dim // 2)
    assert torch.isfinite(_out(model, _ids(4, 8))).all()


@pytest.mark.parametrize(
    ("model_type", "said"),
    [
        ("qwen3_moe", r"mlp\.experts: mixture-of-experts blocks are not supported"),
        ("gpt_neox", r"no attention q/k/v .*attention\.query_key_value"),  # fused per head, not [q | k | v]
    ],
)
def test_layouts_not_handled_are_one_line_errors(model_type, said):
    with pytest.raises(ModelLoadError, match=said) as err:
        anatomy_of(_from_model_type(model_type), model_type, "")
    assert "\n" not in str(err.value)


def test_unknown_layout_names_the_block_and_what_it_saw():
    model = tiny_model("tiny-mistral")
    mlp = model.model.layers[0].mlp
    mlp.w_out = mlp.down_proj
    del mlp.down_proj
    with pytest.raises(ModelLoadError) as err:
        anatomy_of(model, "m", "")
    msg = str(err.value)
    assert "\n" not in msg and "model.layers.0" in msg and "MLP output" in msg and "mlp.w_out" in msg
    mlp.experts = nn.ModuleList([nn.Linear(64, 64)])  # a mixture-of-experts MLP is named as such
    del mlp.gate_proj, mlp.up_proj
    with pytest.raises(ModelLoadError, match=r"MLP input .*mlp\.experts: mixture-of-experts"):
        anatomy_of(model, "m", "")
    model.config.num_hidden_layers = 7  # no block list of that length
    with pytest.raises(ModelLoadError, match="no ModuleList of 7 blocks"):
        anatomy_of(model, "m", "")


@pytest.mark.parametrize("arch", ["tiny-qwen3", "tiny-phi3"])
def test_a_saved_folder_of_a_new_family_loads_with_the_same_anatomy(tmp_path, arch):
    """What a user brings: an HF folder of a family no list names. Its config alone (weights unread)
    and the loaded model give the anatomy of the model that was saved."""
    from autocompress.model.loading import anatomy_from_config
    from autocompress.model.tokenizer import ByteTokenizer

    model = tiny_model(arch)
    model.save_pretrained(tmp_path / "m", safe_serialization=True)
    ByteTokenizer().save_pretrained(tmp_path / "m")
    want = anatomy_of(model, "m", "")
    loaded = load_model(tmp_path / "m", progress=False)
    assert dataclasses.replace(loaded.anatomy, model_hash="") == want
    assert loaded.anatomy.model_hash == state_dict_hash(model)
    assert anatomy_from_config(tmp_path / "m") == want


def _every_knob_plan(loaded) -> Plan:
    a = loaded.anatomy
    b1 = a.blocks[1]
    attn = [s.name for s in b1.linears if s.group == "attn"]
    mlp = [s.name for s in b1.linears if s.group == "mlp"]
    embed = a.embeddings[0].name
    return Plan(
        model=ModelRef.of(a),
        default=LayerChoice(bits=4, group_size=16),
        layers={
            attn[0]: LayerChoice(bits=8, sparsity=0.3, act_bits=8),
            mlp[0]: LayerChoice(rank_ratio=0.5, bits=4, group_size=16),
            mlp[-1]: LayerChoice(sparsity=0.5, sparsity_pattern="2:4", bits=4, quant_method="gptq"),
            embed: LayerChoice(format="Q8_0"),
        },
        blocks={1: BlockChoice(keep_heads=b1.heads_per_kv * (b1.num_kv_heads - 1), keep_mlp_channels=b1.mlp_dim // 2)},
        drop_blocks=(0,),
        provenance=Provenance(data_hash=DATA),
    )


def test_plan_with_every_knob_applies_bit_identically_twice(family):
    a = family.anatomy
    hess = Hessians(
        a.model_hash, DATA, {s.name: input_key(s) for s in a.linears}, collect_hessians(family.model, a, _ids())
    )
    stats = _hook_stats(family)
    plan = _every_knob_plan(family)
    plan.validate(a)
    model = apply_plan_to(family.model, a, plan, stats, hessians=hess)
    first = state_dict_hash(model)
    again = apply_plan_to(family.model, a, plan, stats, hessians=hess)
    assert state_dict_hash(again) == first
    assert torch.isfinite(_out(model, _ids(1))).all()
    assert state_dict_hash(family.model) == a.model_hash  # the base is untouched
    # the pruned block (now block 0) has the shapes the anatomy predicts for it
    b1 = a.blocks[1]
    head_frac, mlp_frac = b1.fractions(plan.blocks[1].keep_heads, plan.blocks[1].keep_mlp_channels)
    bpath = block_path(model)
    for s in b1.linears:
        if plan.choice_for(s.name).rank_ratio is not None:
            continue
        rel = s.name.removeprefix(f"{b1.prefix}.")
        assert tuple(dense_weight(model.get_submodule(f"{bpath}.0.{rel}")).shape) == s.shape_after(head_frac, mlp_frac)


def _hook_stats(loaded):
    from ..compress.conftest import hook_stats

    return hook_stats(loaded)


def _silence(model: nn.Module, anatomy, heads: bool) -> torch.Tensor:
    """Zero block 0's o-projection columns of KV group 0 (heads) or its down-projection columns of
    the first half of the MLP channels, so those units add nothing; give the units kept."""
    b = anatomy.blocks[0]
    role = "o" if heads else next(s.role for s in b.linears if s.role in ("down", "fc2"))
    w = dense_weight(model.get_submodule(next(s.name for s in b.linears if s.role == role)))
    width = b.heads_per_kv * b.head_dim if heads else b.mlp_dim // 2
    with torch.no_grad():
        w[:, :width] = 0.0
        w[:, width:] += torch.sign(w[:, width:]) * 0.5  # the rest clearly more important
    return torch.arange(width, w.shape[1])


@pytest.mark.parametrize("heads", [True, False], ids=["heads", "mlp"])
def test_pruning_silent_units_leaves_the_output_unchanged(family, heads):
    """Slicing the wrong rows of a fused [q | k | v] or [gate | up], or of a q / k norm, would change
    the output; cutting only units that add nothing must not."""
    a = family.anatomy
    if heads and a.blocks[0].qk_norm == "per-projection":
        pytest.skip("OLMo-2's q / k norms average over every head: removing heads changes the others")
    if heads and a.blocks[0].num_kv_heads < 2:
        pytest.skip("one KV group: nothing to cut")
    model = copy.deepcopy(family.model)
    _silence(model, a, heads)
    ids = _ids(2)
    before = _out(model, ids)
    b = a.blocks[0]
    if heads:
        shrink_heads(model, 0, b.heads_per_kv * (b.num_kv_heads - 1))
    else:
        shrink_mlp(model, 0, b.mlp_dim // 2)
    after = _out(model, ids)
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    changed = sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in family.model.parameters())
    assert changed


def test_cost_model_kv_cache_grows_with_the_anatomy_head_dim():
    """Qwen3's head_dim (24) is not hidden / heads (16): the KV cache a longer context adds must
    follow the anatomy's head_dim, 24 / 16 of what hidden / heads would give."""
    a = load_model("tiny-qwen3").anatomy
    narrow = dataclasses.replace(a, blocks=tuple(dataclasses.replace(b, head_dim=16) for b in a.blocks))
    profile = load_profile("jetson")
    plan = Plan(model=ModelRef.of(a))

    def kv_growth(anatomy):
        short = CostModel(profile, anatomy, context_tokens=256).predict(plan).memory_mb
        long = CostModel(profile, anatomy, context_tokens=4352).predict(plan).memory_mb
        return long - short

    assert kv_growth(a) == pytest.approx(kv_growth(narrow) * 24 / 16, rel=1e-6)


@pytest.mark.parametrize("per_block", [False, True], ids=["uniform", "per-block"])
def test_hf_export_loads_back(family, tmp_path, per_block):
    if per_block and family.anatomy.name not in ("tiny-phi3", "tiny-qwen3"):
        pytest.skip("per-block widths: load_compressed is tested on the fused and the head_dim family")
    """Widths the same in every kept block go into the config: plain transformers loads them (all but
    GPT-2 / BERT, whose head size is hidden ÷ heads); per-block widths load with load_compressed.
    Either way the logits are the compressed model's (as stored in the base dtype)."""
    import json

    from autocompress.export import export_hf, load_compressed

    from ..conftest import as_stored

    a = family.anatomy
    b = a.blocks[0]
    keep_heads = b.heads_per_kv * (b.num_kv_heads - 1) if b.num_kv_heads > 1 else None
    blocks = {i: BlockChoice(keep_heads=keep_heads, keep_mlp_channels=b.mlp_dim // 2) for i in range(a.num_blocks)}
    if per_block:
        blocks[a.num_blocks - 1] = BlockChoice(keep_mlp_channels=b.mlp_dim // 4)
    plan = Plan(model=ModelRef.of(a), default=LayerChoice(bits=8), blocks=blocks)
    model = apply_plan_to(family.model, a, plan)
    export_hf(model, plan, tmp_path / "hf", family.tokenizer)
    info = json.loads((tmp_path / "hf" / "autocompress.json").read_text())
    plain = not per_block and a.architecture not in ("gpt2", "bert")
    assert info["loadable_with_plain_transformers"] == plain, info["not_loadable_because"]
    if plain:
        back = type(family.model).from_pretrained(tmp_path / "hf").float().eval()
    else:
        back = load_compressed(tmp_path / "hf")
    ids = _ids(3)
    torch.testing.assert_close(_out(back, ids), _out(as_stored(model), ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["tiny-qwen3", "tiny-phi3"])
def test_onnx_export_of_a_pruned_quantized_model_passes_its_check(arch, tmp_path):
    """head_dim != hidden / heads and fused projections, with fewer heads and MLP channels, as ONNX:
    onnxruntime's logits (MatMulNBits in fp32) are the compressed model's."""
    from autocompress.export.onnx import export_onnx
    from autocompress.export.verify import check_onnx

    lm = load_model(arch)
    a, b = lm.anatomy, lm.anatomy.blocks[0]
    blocks = {0: BlockChoice(keep_heads=b.heads_per_kv, keep_mlp_channels=b.mlp_dim // 2)}
    plan = Plan(model=ModelRef.of(a), default=LayerChoice(bits=4, group_size=32), blocks=blocks)
    model = apply_plan_to(lm.model, a, plan)
    exp = export_onnx(model, a, plan, tmp_path / "m.onnx")
    check = check_onnx(exp.path, model, a, exp.formats)
    assert check["passed"] and check["compared"] == "stored weights (fp32 compute)", check


# every knob family, one choice per group for the whole model: a small sensitivity table keeps
# eight trials on seven families fast
SPACE = """
name: families
description: formats, sparsity, low-rank, heads, MLP width and depth, one choice per group
granularity: model
linear:
  format: [dense, runtime]
  quant_method: [rtn]
  sparsity: [0.0, "2:4"]
  rank_ratio: [null, 0.5]
structure:
  keep_heads_ratio: [1.0, 0.5]
  keep_mlp_ratio: [1.0, 0.5]
  drop_blocks: [0, 1]
alignment: 8
baselines:
  uncompressed: {}
"""


def test_search_of_8_trials_runs_end_to_end(family, tmp_path):
    from autocompress.search import search

    space = tmp_path / "families.yaml"
    space.write_text(SPACE)
    # a journal file: SQLite's per-trial transactions cost more than these tiny trials
    result = search(
        model=family.anatomy.name,
        hw="a100",
        space=space,
        trials=8,
        out=tmp_path,
        study="f",
        storage=str(tmp_path / "f.log"),
        data=SEARCH_DATA,
        full_eval=0,
    )
    assert result.counts["evaluated"] == 8 and result.counts["failed"] == 0, result.counts
    assert result.pareto and all(c.metrics["kl"] >= 0 for c in result.pareto)
    for cand in result.pareto:
        cand.plan.validate(family.anatomy)
