"""Real shape changes on Hugging Face modules: drop whole blocks, shrink MLP width, remove attention heads.

Works on every layout ``autocompress.model.inspect`` discovers: separate q/k/v/o or a fused
``qkv`` ([q | k | v], GPT-2's ``Conv1D`` with its weight stored in×out, Phi-3's with GQA),
gate/up/down or a fused ``gate_up`` ([gate | up], Phi-3), fc1/fc2; norms on q / k (Qwen3's per
head stay, OLMo-2's over all heads' dims are sliced with the heads). Units are kept by importance (``prune.py``: weight × activation
when statistics are given, weight only otherwise), the highest kept, in their original order.
Attention heads go in whole KV groups, so grouped-query attention keeps working unchanged.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import nn

from autocompress.compress.prune import head_scores, kv_group_scores, mlp_channel_scores, top_indices
from autocompress.errors import PlanError
from autocompress.model.inspect import block_path, head_dim_of, layout_of, linear_roles, weight_of

if TYPE_CHECKING:
    from autocompress.calib import ActivationStats

MLP_IN_ROLES = ("gate", "up", "gate_up", "fc1")
MLP_OUT_ROLES = ("down", "fc2")


def dense_weight(module: nn.Module) -> torch.Tensor:
    """Give the weight of an nn.Linear or HF Conv1D as [out, in] (a view, not a copy)."""
    _, _, transposed = weight_of(module)
    return module.weight.t() if transposed else module.weight


def slice_linear(module: nn.Module, out_idx: torch.Tensor | None = None, in_idx: torch.Tensor | None = None) -> None:
    """Keep only the given output rows and/or input columns of a linear (in place, new parameters)."""
    w = dense_weight(module).detach()
    bias = module.bias.detach() if getattr(module, "bias", None) is not None else None
    if out_idx is not None:
        w = w.index_select(0, out_idx)
        bias = bias.index_select(0, out_idx) if bias is not None else None
    if in_idx is not None:
        w = w.index_select(1, in_idx)
    out_f, in_f = w.shape
    transposed = weight_of(module)[2]
    module.weight = nn.Parameter((w.t() if transposed else w).contiguous())
    if bias is not None:
        module.bias = nn.Parameter(bias.contiguous())
    if transposed:
        module.nf, module.nx = out_f, in_f
    else:
        module.out_features, module.in_features = out_f, in_f


def _input_sq_norm(stats: ActivationStats | None, name: str) -> torch.Tensor | None:
    if stats is None:
        return None
    norm = stats.input_sq_norms.get(name)
    if norm is None:
        raise PlanError(f"activation statistics have no input norms for {name!r}; recollect them for this model")
    return norm


def _block(model: nn.Module, block_index: int) -> tuple[str, nn.Module]:
    bpath = block_path(model)
    blocks = model.get_submodule(bpath)
    if not 0 <= block_index < len(blocks):
        raise PlanError(f"block {block_index} does not exist (model has blocks 0..{len(blocks) - 1})")
    return f"{bpath}.{block_index}", blocks[block_index]


def _rels(model: nn.Module, roles: tuple[str, ...]) -> list[str]:
    return [rel for rel, role in linear_roles(model).items() if role in roles]


def shrink_mlp(
    model: nn.Module, block_index: int, keep_channels: int, stats: ActivationStats | None = None
) -> torch.Tensor:
    """Keep the ``keep_channels`` most important MLP channels of one block; give their indices (ascending).

    Up/gate/fc1 lose output rows, down/fc2 loses the matching input columns.
    """
    prefix, block = _block(model, block_index)
    (down_rel,) = _rels(model, MLP_OUT_ROLES)
    down = block.get_submodule(down_rel)
    width = weight_of(down)[1]
    keep = top_indices(
        mlp_channel_scores(dense_weight(down), _input_sq_norm(stats, f"{prefix}.{down_rel}")), keep_channels
    )
    if keep.numel() == width:
        return keep
    for rel, role in linear_roles(model).items():
        if role == "gate_up":  # [gate | up]: the same channels of both halves
            slice_linear(block.get_submodule(rel), out_idx=torch.cat([keep, width + keep]))
        elif role in MLP_IN_ROLES:
            slice_linear(block.get_submodule(rel), out_idx=keep)
    slice_linear(down, in_idx=keep)
    mlp = block.get_submodule(down_rel.rsplit(".", 1)[0]) if "." in down_rel else block
    if isinstance(getattr(mlp, "intermediate_size", None), int):
        mlp.intermediate_size = keep.numel()
    return keep


def _dims(units: torch.Tensor, size: int) -> torch.Tensor:
    """Give the flat indices of the given heads (each ``size`` wide)."""
    return (units.unsqueeze(1) * size + torch.arange(size, device=units.device)).reshape(-1)


def shrink_heads(
    model: nn.Module, block_index: int, keep_heads: int, stats: ActivationStats | None = None
) -> torch.Tensor:
    """Keep ``keep_heads`` query heads of one block in whole KV groups; give the kept o-input dims (ascending).

    Groups are ranked by the summed score of their query heads; ``keep_heads`` must be a multiple
    of the query heads per KV head.
    """
    prefix, block = _block(model, block_index)
    layout = layout_of(model)
    head_dim = head_dim_of(model)
    (o_rel,) = layout.paths_of("o")
    o = block.get_submodule(o_rel)
    num_heads = weight_of(o)[1] // head_dim
    # KV heads from the projections' shapes (a config may name a count its family ignores)
    k_rels, (qkv_rel, *_) = layout.paths_of("k"), [*layout.paths_of("qkv"), None]
    if k_rels:
        kv_width = weight_of(block.get_submodule(k_rels[0]))[0]
    else:  # fused [q | k | v]
        kv_width = (weight_of(block.get_submodule(qkv_rel))[0] - num_heads * head_dim) // 2
    num_groups = max(1, kv_width // head_dim)
    per_kv = num_heads // num_groups
    if keep_heads % per_kv or not per_kv <= keep_heads <= num_heads:
        raise PlanError(
            f"block {block_index}: keep_heads must be a multiple of {per_kv} in {per_kv}..{num_heads}, got {keep_heads}"
        )
    scores = head_scores(dense_weight(o), num_heads, head_dim, _input_sq_norm(stats, f"{prefix}.{o_rel}"))
    groups = top_indices(kv_group_scores(scores, num_groups), keep_heads // per_kv)
    heads = _dims(groups, per_kv)
    q_dims, kv_dims = _dims(heads, head_dim), _dims(groups, head_dim)
    if heads.numel() == num_heads:
        return q_dims
    width = num_heads * head_dim
    for rel, role in layout.roles.items():
        lin = block.get_submodule(rel)
        if role == "q":
            slice_linear(lin, out_idx=q_dims)
        elif role in ("k", "v"):
            slice_linear(lin, out_idx=kv_dims)
        elif role == "qkv":  # fused [q | k | v] (GPT-2: no GQA; Phi-3: GQA)
            slice_linear(lin, out_idx=torch.cat([q_dims, width + kv_dims, width + kv_width + kv_dims]))
    slice_linear(o, in_idx=q_dims)
    for rel, which in layout.qk_norms.items():
        if which == "q":
            _slice_norm(block.get_submodule(rel), heads, q_dims, num_heads)
        else:
            _slice_norm(block.get_submodule(rel), groups, kv_dims, num_groups)
    attn = block.get_submodule(layout.attention) if layout.attention else block
    kept = heads.numel()
    for module in attn.modules():  # BERT keeps its head counts one level down (attention.self)
        _set_head_counts(module, kept, kept // per_kv, head_dim)
    return q_dims


def _slice_norm(norm: nn.Module, units: torch.Tensor, dims: torch.Tensor, total: int) -> None:
    """Keep a q / k norm's weights for the kept heads (``units`` of ``total``, flat ``dims``): one row
    per head ([heads, head_dim], Cohere) or one value per dim of every head (OLMo-2); a norm one
    head wide (Qwen3) is shared by every head and stays."""
    w = norm.weight.detach()
    head_dim = dims.numel() // units.numel()
    if w.dim() == 2 and w.shape[0] == total:
        idx = units
    elif w.dim() == 1 and w.numel() == total * head_dim and total > 1:
        idx = dims
    else:
        return
    norm.weight = nn.Parameter(w.index_select(0, idx).contiguous())
    if getattr(norm, "bias", None) is not None and norm.bias.shape == w.shape:
        norm.bias = nn.Parameter(norm.bias.detach().index_select(0, idx).contiguous())
    if isinstance(getattr(norm, "normalized_shape", None), tuple):
        norm.normalized_shape = tuple(norm.weight.shape[-len(norm.normalized_shape) :])


def _set_head_counts(attn: nn.Module, heads: int, kv_heads: int, head_dim: int) -> None:
    """Make the attention module compute with ``heads`` query and ``kv_heads`` KV heads. Families
    read these from module attributes (GPT-2, BERT, Phi-3's KV count) or from the config the module
    holds (Phi-3 splits its fused qkv by ``config.num_attention_heads``): the module gets a config of
    its own, so other blocks keep theirs."""
    for attr, value in (
        ("num_heads", heads),  # GPT-2
        ("num_attention_heads", heads),  # BERT
        ("split_size", heads * head_dim),  # GPT-2
        ("all_head_size", heads * head_dim),  # BERT
        ("num_key_value_heads", kv_heads),
    ):
        if isinstance(getattr(attn, attr, None), int):
            setattr(attn, attr, value)
    cfg = getattr(attn, "config", None)
    if cfg is not None and isinstance(getattr(cfg, "num_attention_heads", None), int):
        own = copy.copy(cfg)
        own.num_attention_heads = heads
        if isinstance(getattr(cfg, "num_key_value_heads", None), int):
            own.num_key_value_heads = kv_heads
        if getattr(cfg, "head_dim", None) is None:
            own.head_dim = head_dim  # hidden ÷ heads no longer gives it
        attn.config = own


def drop_blocks(model: nn.Module, indices: list[int] | tuple[int, ...]) -> nn.Module:
    """Remove whole blocks (indices in the current numbering) and renumber the rest; give the model.

    Attention ``layer_idx`` (the KV-cache slot), ``config.num_hidden_layers`` and
    ``config.layer_types`` follow, so forward and cached ``generate`` keep working.
    """
    bpath = block_path(model)
    blocks = model.get_submodule(bpath)
    n = len(blocks)
    drop = {int(i) for i in indices}
    bad = sorted(i for i in drop if not 0 <= i < n)
    if bad:
        raise PlanError(f"cannot drop blocks {bad}: model has blocks 0..{n - 1}")
    if len(drop) >= n:
        raise PlanError(f"cannot drop all {n} blocks; at least one must stay")
    if not drop:
        return model
    kept = [blk for i, blk in enumerate(blocks) if i not in drop]
    for new_index, blk in enumerate(kept):
        for sub in blk.modules():
            if isinstance(getattr(sub, "layer_idx", None), int):
                sub.layer_idx = new_index
    parent_path, _, attr = bpath.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, attr, nn.ModuleList(kept))
    cfg = model.config
    layer_types = getattr(cfg, "layer_types", None)
    if isinstance(layer_types, (list, tuple)) and len(layer_types) == n:
        cfg.layer_types = [t for i, t in enumerate(layer_types) if i not in drop]
    cfg.num_hidden_layers = len(kept)  # GPT-2 maps this to n_layer
    return model
