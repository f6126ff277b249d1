import copy

import pytest
import torch

from autocompress.compress import dense_weight, drop_blocks, shrink_heads, shrink_mlp
from autocompress.errors import PlanError
from autocompress.model.inspect import block_path

from .conftest import hook_stats


def _ids(n=10):
    return torch.randint(3, 250, (2, n), generator=torch.Generator().manual_seed(7))


def _out(model, ids):
    out = model(ids)
    return out.logits


def _site(loaded, block, roles):
    return [s for s in loaded.anatomy.blocks[block].linears if s.role in roles]


def test_removing_dead_mlp_channels_keeps_outputs(any_model):
    """Channels whose down/fc2 column is zero contribute nothing: removing exactly them changes nothing."""
    model = copy.deepcopy(any_model.model)
    (down,) = _site(any_model, 0, ("down", "fc2"))
    dense_weight(model.get_submodule(down.name))[:, 1::2] = 0.0  # every odd channel is dead
    ids = _ids()
    ref = _out(model, ids)
    kept = shrink_mlp(model, 0, down.in_features // 2)
    assert kept.tolist() == list(range(0, down.in_features, 2))
    for site in any_model.anatomy.blocks[0].linears:
        w = dense_weight(model.get_submodule(site.name))
        if site.role in ("gate", "up", "fc1"):
            assert w.shape == (down.in_features // 2, site.in_features)
        if site.role in ("down", "fc2"):
            assert w.shape == (site.out_features, down.in_features // 2)
    assert torch.allclose(_out(model, ids), ref, atol=1e-5)


def test_removing_dead_heads_keeps_outputs(any_model):
    blk = any_model.anatomy.blocks[0]
    model = copy.deepcopy(any_model.model)
    (o,) = _site(any_model, 0, ("o",))
    group_width = blk.heads_per_kv * blk.head_dim
    dense_weight(model.get_submodule(o.name))[:, :group_width] = 0.0  # first KV group is dead
    ids = _ids()
    ref = _out(model, ids)
    keep = blk.num_heads - blk.heads_per_kv
    dims = shrink_heads(model, 0, keep)
    assert dims.tolist() == list(range(group_width, blk.num_heads * blk.head_dim))
    assert dense_weight(model.get_submodule(o.name)).shape == (any_model.anatomy.hidden_size, keep * blk.head_dim)
    assert torch.allclose(_out(model, ids), ref, atol=1e-5)


def test_gqa_head_pruning_keeps_whole_groups(llama):
    blk = llama.anatomy.blocks[1]
    assert blk.heads_per_kv == 2 and blk.num_kv_heads == 2
    model = copy.deepcopy(llama.model)
    attn = model.model.layers[1].self_attn
    hd = blk.head_dim
    dense_weight(attn.o_proj)[:, 2 * hd :] *= 10.0  # group 1 (query heads 2, 3) matters most
    q, k = attn.q_proj.weight.clone(), attn.k_proj.weight.clone()
    shrink_heads(model, 1, 2)
    assert torch.equal(attn.q_proj.weight, q[2 * hd :]) and torch.equal(attn.k_proj.weight, k[hd:])
    assert attn.v_proj.weight.shape == (hd, 64) and attn.o_proj.weight.shape == (64, 2 * hd)
    model(_ids())
    with pytest.raises(PlanError, match="multiple of 2"):
        shrink_heads(copy.deepcopy(llama.model), 0, 3)


def test_stats_change_which_channels_are_kept(llama):
    stats = hook_stats(llama)
    down = "model.layers.0.mlp.down_proj"
    stats.input_sq_norms[down] = torch.ones(128)
    stats.input_sq_norms[down][100:] = 1e8  # channels 100.. carry huge activations
    kept = shrink_mlp(copy.deepcopy(llama.model), 0, 28, stats)
    assert kept.tolist() == list(range(100, 128))


@pytest.mark.parametrize("arch_fixture", ["tiny-llama", "tiny-gpt2"])
def test_drop_blocks_then_forward_and_cached_generate(arch_fixture):
    from autocompress.model.loading import load_model

    loaded = load_model(arch_fixture)
    model = copy.deepcopy(loaded.model)
    n = loaded.anatomy.num_blocks
    drop_blocks(model, [0, n - 2])
    blocks = model.get_submodule(block_path(model))
    assert len(blocks) == n - 2 and model.config.num_hidden_layers == n - 2
    idxs = [m.layer_idx for b in blocks for m in b.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    assert sorted(set(idxs)) == list(range(n - 2))
    ids = _ids(6)
    assert model(ids).logits.shape == (2, 6, loaded.anatomy.vocab_size)
    cached = model.generate(ids[:1], max_new_tokens=6, do_sample=False, use_cache=True)
    uncached = model.generate(ids[:1], max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)  # a wrong cache slot (layer_idx) would break this
    assert len(loaded.model.get_submodule(block_path(loaded.model))) == n


def test_drop_blocks_on_bert_and_errors():
    from autocompress.model.loading import load_model

    loaded = load_model("tiny-bert")
    model = copy.deepcopy(loaded.model)
    drop_blocks(model, [1])
    assert model(_ids()).logits.shape == (2, 4)
    with pytest.raises(PlanError, match="at least one"):
        drop_blocks(model, [0])
    with pytest.raises(PlanError, match=r"blocks 0\.\.0"):
        drop_blocks(model, [3])
