import copy

import pytest
import torch

from autocompress.compress import VariantCache, apply_plan_to, prune_mask, rtn_quantize
from autocompress.errors import PlanError
from autocompress.model.inspect import block_path
from autocompress.model.loading import load_model, state_dict_hash
from autocompress.plan import BlockChoice, LayerChoice, ModelRef

from .conftest import hook_stats, plan_for

INT4 = LayerChoice(bits=4, group_size=32, symmetric=False)


def _full_plan(loaded):
    a = loaded.anatomy
    b1 = a.blocks[1]
    mlp_names = [s.name for s in b1.linears if s.role in ("up", "fc1", "down", "fc2")]
    return plan_for(
        loaded,
        default=LayerChoice(bits=8),
        layers={
            mlp_names[0]: LayerChoice(rank_ratio=0.5, bits=4, group_size=16, sparsity=0.25),
            mlp_names[-1]: LayerChoice(sparsity=0.5, sparsity_pattern="2:4", bits=4),
        },
        blocks={1: BlockChoice(keep_heads=b1.heads_per_kv * (b1.num_kv_heads - 1), keep_mlp_channels=b1.mlp_dim // 2)},
        drop_blocks=(0,),
    )


def test_full_plan_runs_on_every_architecture(any_model):
    stats = hook_stats(any_model)
    plan = _full_plan(any_model)
    model = apply_plan_to(any_model.model, any_model.anatomy, plan, stats)
    assert len(model.get_submodule(block_path(model))) == any_model.anatomy.num_blocks - 1
    ids = torch.randint(3, 250, (2, 8))
    model(ids)
    if any_model.anatomy.task == "causal-lm":
        assert model.generate(ids[:1], max_new_tokens=4, do_sample=False).shape == (1, 12)
    assert state_dict_hash(any_model.model) == any_model.anatomy.model_hash  # base untouched


def test_deterministic_with_and_without_cache(llama):
    stats = hook_stats(llama)
    plan = _full_plan(llama)
    cache = VariantCache()
    first = state_dict_hash(apply_plan_to(llama.model, llama.anatomy, plan, stats, cache=cache))
    hits = cache.info().hits
    assert state_dict_hash(apply_plan_to(llama.model, llama.anatomy, plan, stats, cache=cache)) == first
    assert cache.info().hits > hits
    assert state_dict_hash(apply_plan_to(llama.model, llama.anatomy, plan, stats)) == first  # no cache at all
    cache.clear()
    assert state_dict_hash(apply_plan_to(llama.model, llama.anatomy, plan, stats, cache=cache)) == first
    other = plan_for(llama, default=INT4)
    assert state_dict_hash(apply_plan_to(llama.model, llama.anatomy, other, stats, cache=cache)) != first


def test_cache_limit_zero_gives_same_weights(llama):
    plan = plan_for(llama, default=INT4)
    cache = VariantCache()
    ref = state_dict_hash(apply_plan_to(llama.model, llama.anatomy, plan, cache=cache))
    assert cache.info().bytes > 0
    cache.set_limit(0)
    assert cache.info().bytes == 0
    assert state_dict_hash(apply_plan_to(llama.model, llama.anatomy, plan, cache=cache)) == ref
    assert cache.info().entries == 0


def test_cache_stays_within_its_byte_bound(llama):
    """A bound smaller than one plan's variants: the cache never holds more bytes than it, and keeps the newest."""
    plan = plan_for(llama, default=INT4)
    one = llama.anatomy.linears[0]
    size = one.out_features * one.in_features * 4  # one float32 variant of the first linear
    cache = VariantCache(max_bytes=3 * size)
    apply_plan_to(llama.model, llama.anatomy, plan, cache=cache)
    info = cache.info()
    assert 0 < info.bytes <= 3 * size and 0 < info.entries < len(llama.anatomy.linears)
    last = llama.anatomy.linears[-1]
    assert any(key[2] == last.name for key in cache._items)  # the most recent variant is kept


def test_each_cache_belongs_to_its_model_not_to_the_model_hash(llama):
    """Weights edited in place keep the model's hash; a cache of their own gives their variants, not the old ones."""
    plan = plan_for(llama, default=INT4)
    name = llama.anatomy.linears[0].name
    old = VariantCache()
    before = apply_plan_to(llama.model, llama.anatomy, plan, cache=old).get_submodule(name).weight
    edited = copy.deepcopy(llama.model)
    with torch.no_grad():
        for p in edited.parameters():
            p.mul_(0.5)
    stale = apply_plan_to(edited, llama.anatomy, plan, cache=old).get_submodule(name).weight
    fresh = apply_plan_to(edited, llama.anatomy, plan, cache=VariantCache()).get_submodule(name).weight
    assert torch.equal(stale, before)  # a cache filled from other weights under the same hash: the old variants
    assert torch.allclose(fresh, 0.5 * before)  # the edited weights' own (RTN scales with the weights)


def test_base_untouched_unless_inplace(llama):
    plan = plan_for(llama, default=INT4, drop_blocks=(2,))
    base = copy.deepcopy(llama.model)
    out = apply_plan_to(base, llama.anatomy, plan)
    assert out is not base and state_dict_hash(base) == llama.anatomy.model_hash
    assert base.config.num_hidden_layers == 4
    same = apply_plan_to(base, llama.anatomy, plan, inplace=True)
    assert same is base and state_dict_hash(base) == state_dict_hash(out)


def test_layers_get_exactly_prune_then_quantize(llama):
    stats = hook_stats(llama)
    name = "model.layers.2.mlp.down_proj"
    choice = LayerChoice(bits=4, group_size=32, sparsity=0.5)
    model = apply_plan_to(llama.model, llama.anatomy, plan_for(llama, layers={name: choice}), stats)
    w = llama.model.get_submodule(name).weight
    mask = prune_mask(w, 0.5, "unstructured", "wanda", stats.input_sq_norms[name])
    assert torch.equal(model.get_submodule(name).weight, rtn_quantize(w * mask, 4, 32, True))
    assert ((model.get_submodule(name).weight == 0).sum(1) >= 64).all()
    untouched = "model.layers.2.mlp.up_proj"
    assert torch.equal(model.get_submodule(untouched).weight, llama.model.get_submodule(untouched).weight)


def test_shrunk_inputs_use_the_kept_statistics(llama):
    """Wanda on down_proj after channel pruning must score with the norms of the channels that stayed."""
    stats = hook_stats(llama)
    name = "model.layers.1.mlp.down_proj"
    plan = plan_for(
        llama,
        layers={name: LayerChoice(sparsity=0.5)},
        blocks={1: BlockChoice(keep_mlp_channels=64)},
    )
    model = apply_plan_to(llama.model, llama.anatomy, plan, stats)
    only_shrunk = apply_plan_to(llama.model, llama.anatomy, plan_for(llama, blocks=plan.blocks), stats)
    w = only_shrunk.get_submodule(name).weight
    kept_cols = [
        j
        for j in range(128)
        if any(torch.equal(w[:, i], llama.model.get_submodule(name).weight[:, j]) for i in range(64))
    ]
    mask = prune_mask(w, 0.5, "unstructured", "wanda", stats.input_sq_norms[name][kept_cols])
    assert torch.equal(model.get_submodule(name).weight, w * mask)


def test_block_indices_mean_the_original_numbering(llama):
    plan = plan_for(llama, blocks={2: BlockChoice(keep_mlp_channels=32)}, drop_blocks=(0, 1))
    model = apply_plan_to(llama.model, llama.anatomy, plan)
    assert [blk.mlp.up_proj.out_features for blk in model.model.layers] == [32, 128]


def test_lowrank_layer_becomes_two_linears(llama):
    name = "model.layers.0.mlp.up_proj"  # 64 -> 128, r* = 42.7
    plan = plan_for(llama, layers={name: LayerChoice(rank_ratio=0.75)})
    model = apply_plan_to(llama.model, llama.anatomy, plan)
    seq = model.get_submodule(name)
    assert isinstance(seq, torch.nn.Sequential) and seq[0].weight.shape == (32, 64) and seq[1].weight.shape == (128, 32)


def test_plan_errors(llama):
    gpt2 = load_model("tiny-gpt2")
    with pytest.raises(PlanError, match="made for model"):
        apply_plan_to(llama.model, llama.anatomy, plan_for(gpt2))
    a = llama.anatomy
    foreign = plan_for(llama).__class__(model=ModelRef(a.name, "0" * 64, a.architecture, a.num_blocks))
    with pytest.raises(PlanError, match="made for model"):
        apply_plan_to(llama.model, a, foreign)
    with pytest.raises(PlanError, match="Wanda"):
        apply_plan_to(llama.model, a, plan_for(llama, default=LayerChoice(sparsity=0.5)), None)
    # a Wanda layer inside a dropped block needs no statistics
    name = "model.layers.1.mlp.up_proj"
    apply_plan_to(llama.model, a, plan_for(llama, layers={name: LayerChoice(sparsity=0.5)}, drop_blocks=(1,)))


def test_output_error_follows_bits(llama):
    ids = torch.randint(3, 250, (2, 16), generator=torch.Generator().manual_seed(0))
    ref = llama.model(ids).logits

    def err(bits):
        model = apply_plan_to(llama.model, llama.anatomy, plan_for(llama, default=LayerChoice(bits=bits)))
        return ((model(ids).logits - ref).norm() / ref.norm()).item()

    assert err(16) == 0.0
    assert err(8) < 0.03 and err(8) < err(4) / 8


def test_impossible_layer_request_names_the_layer(llama):
    # 2:4 on down_proj whose inputs shrank to 30 channels (not divisible by 4)
    name = "model.layers.0.mlp.down_proj"
    plan = plan_for(
        llama,
        layers={name: LayerChoice(sparsity=0.5, sparsity_pattern="2:4", prune_method="magnitude")},
        blocks={0: BlockChoice(keep_mlp_channels=30)},
    )
    with pytest.raises(PlanError, match=name.replace(".", r"\.") + ".*divisible by 4"):
        apply_plan_to(llama.model, llama.anatomy, plan)


def _with_table(loaded, plan):
    """Give ``plan`` with the token embedding (tied to the head where the model ties them) quantized too."""
    from dataclasses import replace

    emb = {e.name: LayerChoice(format="Q8_0") for e in loaded.anatomy.embeddings}
    return replace(plan, layers={**plan.layers, **emb})


def test_share_base_gives_the_same_weights_and_shares_only_what_is_unchanged(any_model):
    stats = hook_stats(any_model)
    plan = _full_plan(any_model)
    if all(e.cols % 32 == 0 for e in any_model.anatomy.embeddings):
        plan = _with_table(any_model, plan)
    base_ptrs = {t.data_ptr() for t in [*any_model.model.parameters(), *any_model.model.buffers()]}
    full = apply_plan_to(any_model.model, any_model.anatomy, plan, stats)
    shared = apply_plan_to(any_model.model, any_model.anatomy, plan, stats, share_base=True)
    assert state_dict_hash(shared) == state_dict_hash(full)
    ids = torch.randint(3, 250, (2, 8))
    out_full, out_shared = full(ids), shared(ids)
    assert torch.equal(out_shared[0], out_full[0])
    assert state_dict_hash(any_model.model) == any_model.anatomy.model_hash  # base untouched
    written = {f"{s.name}.weight" for s in any_model.anatomy.linears if s.block not in plan.drop_blocks}
    n_shared = 0
    for name, t in shared.named_parameters():
        if name in written:
            assert t.data_ptr() not in base_ptrs, f"{name} was written but shares the base's memory"
        elif t.data_ptr() in base_ptrs:
            n_shared += 1
    assert n_shared > 0  # norms, biases, the unquantized rest: not copied
    if any(e.tied for e in any_model.anatomy.embeddings):
        head = shared.get_output_embeddings().weight
        assert head is shared.get_input_embeddings().weight and head.data_ptr() not in base_ptrs
