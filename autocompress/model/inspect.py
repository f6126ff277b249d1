"""Read a model's structure: find its blocks and linears and build a ``ModelAnatomy``.

Nothing here lists model types. The blocks are the ``ModuleList`` with ``num_hidden_layers``
entries; in a block, each linear's role (q, k, v, o, fused qkv, gate, up, down, fused gate_up,
fc1, fc2) comes from its path, matched against ``ROLE_HINTS`` (the names transformers' decoder
and encoder families use); head counts and ``head_dim`` come from the config and are checked
against the projections' shapes. A layout whose roles cannot be found is refused with one line
naming the block and the linears it holds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from torch import nn

from autocompress.errors import ModelLoadError
from autocompress.model.anatomy import BlockInfo, EmbeddingSite, LinearSite, ModelAnatomy

# (pattern on a linear's path inside its block, role). First match wins; paths are anchored so that
# GPT-2's ``attn.c_proj`` (o) and ``mlp.c_proj`` (fc2), or BERT's ``attention.output.dense`` (o) and
# ``output.dense`` (fc2), get different roles. Fused linears stack their parts along the output:
# qkv = [q | k | v] (Phi-3, GPT-2), gate_up = [gate | up] (Phi-3).
ROLE_HINTS: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(p), role)
    for p, role in (
        (r"(?:^|\.)(?:q_proj|query)$", "q"),
        (r"(?:^|\.)(?:k_proj|key)$", "k"),
        (r"(?:^|\.)(?:v_proj|value)$", "v"),
        (r"(?:^|\.)(?:qkv_proj|c_attn)$", "qkv"),
        (r"(?:^|\.)(?:o_proj|out_proj)$|(?:^|\.)attn\.c_proj$|(?:^|\.)(?:self_attn|attention\.output)\.dense$", "o"),
        (r"(?:^|\.)gate_up_proj$", "gate_up"),
        (r"(?:^|\.)gate_proj$", "gate"),
        (r"(?:^|\.)up_proj$", "up"),
        (r"(?:^|\.)down_proj$", "down"),
        (r"(?:^|\.)(?:fc1|c_fc|fc_in)$|^intermediate\.dense$", "fc1"),
        (r"(?:^|\.)(?:fc2|fc_out)$|(?:^|\.)mlp\.c_proj$|^output\.dense$", "fc2"),
    )
)
# the alternatives a block must offer: attention inputs, attention output, MLP input(s), MLP output
_REQUIRED = (
    ("attention q/k/v (q_proj, k_proj, v_proj or a fused qkv_proj)", ({"q", "k", "v"}, {"qkv"})),
    ("attention output (o_proj)", ({"o"},)),
    # up_proj alone: an MLP without a gate (Nemotron, Arcee, Apertus), as fc1
    ("MLP input (gate_proj + up_proj, a fused gate_up_proj, up_proj or fc1)", ({"up"}, {"gate_up"}, {"fc1"})),
    ("MLP output (down_proj or fc2)", ({"down"}, {"fc2"})),
)
_QK_NORM = re.compile(r"(?:^|\.)(q|k|query|key)_?(?:norm|layernorm|ln)$")


def is_linear(module: nn.Module) -> bool:
    """Tell whether a module is a dense linear (nn.Linear, or HF GPT-2's ``Conv1D``)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _is_linear_unit(module: nn.Module) -> bool:
    """Tell whether a module stands for one linear: a linear, or the two-linear ``nn.Sequential`` a
    low-rank plan puts in its place (so a compressed model's roles are found as the base's)."""
    if is_linear(module):
        return True
    return isinstance(module, nn.Sequential) and len(module) == 2 and all(is_linear(m) for m in module)


def weight_of(module: nn.Module) -> tuple[int, int, bool]:
    """Give (out_features, in_features, transposed) of an nn.Linear or HF Conv1D."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features, False
    if type(module).__name__ == "Conv1D":  # HF GPT-2: weight stored in×out
        in_f, out_f = module.weight.shape
        return out_f, in_f, True
    raise ModelLoadError(f"expected a linear layer, found {type(module).__name__}")


def architecture_of(model: nn.Module) -> str:
    """Give the model's family as its config names it (``model_type``: "llama", "qwen3", "phi3"...)."""
    mtype = getattr(getattr(model, "config", None), "model_type", None)
    return str(mtype) if mtype else type(model).__name__.lower()


def _num_layers(model: nn.Module) -> int:
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if not isinstance(n, int) or n < 1:
        raise ModelLoadError(
            f"{type(model).__name__}: its config names no num_hidden_layers, so no blocks can be found"
        )
    return n


def block_path(model: nn.Module) -> str:
    """Give the dotted path of the block ``ModuleList``: the one with ``num_hidden_layers`` entries
    that holds linears (the shortest path when several do)."""
    n = _num_layers(model)
    lists = [(p, m) for p, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    found = [p for p, m in lists if len(m) == n and any(is_linear(x) for x in m[0].modules())]
    if found:
        return min(found, key=lambda p: (p.count("."), p))
    seen = ", ".join(f"{p} ({len(m)})" for p, m in lists[:6]) or "none"
    raise ModelLoadError(
        f"cannot find the transformer blocks of {type(model).__name__}: no ModuleList of {n} blocks "
        f"(config num_hidden_layers) holds linears; ModuleLists seen: {seen}"
    )


def _roles_in(block: nn.Module, where: str) -> dict[str, str]:
    """Give {relative path: role} of the linears in one block; raise naming what is missing or doubled."""
    roles: dict[str, str] = {}
    seen: list[str] = []
    for rel, mod in block.named_modules():
        if not rel or not _is_linear_unit(mod) or any(rel.startswith(f"{s}.") for s in seen):
            continue
        seen.append(rel)
        role = next((r for pat, r in ROLE_HINTS if pat.search(rel)), None)
        if role is None:
            continue
        twin = next((p for p, r in roles.items() if r == role), None)
        if twin is not None:
            raise ModelLoadError(
                f"block {where}: two linears take the role {role!r} ({twin}, {rel}); blocks with several "
                "attention or MLP paths (mixture-of-experts, hybrid attention/state-space) are not supported"
            )
        roles[rel] = role
    have = set(roles.values())
    experts = next((rel for rel, _ in block.named_modules() if rel.rsplit(".", 1)[-1] == "experts"), None)
    for what, options in _REQUIRED:
        if not any(opt <= have for opt in options):
            moe = f" ({experts}: mixture-of-experts blocks are not supported)" if experts else ""
            raise ModelLoadError(f"block {where}: no {what} found{moe}; linears seen: {', '.join(seen) or 'none'}")
    return roles


@dataclass(frozen=True)
class Layout:
    """Where a model keeps its blocks, and the role of each linear inside a block."""

    block_path: str
    roles: dict[str, str]  # relative path in a block -> role
    attention: str  # relative path of the attention module (the o projection's parent)
    qk_norms: dict[str, str]  # relative path of a norm on the q / k projections -> "q" | "k"

    def paths_of(self, *roles: str) -> list[str]:
        return [rel for rel, r in self.roles.items() if r in roles]


def layout_of(model: nn.Module) -> Layout:
    """Give the blocks' path and the roles of the linears in them (found in block 0, checked in the rest)."""
    bpath = block_path(model)
    blocks = model.get_submodule(bpath)
    roles = _roles_in(blocks[0], f"{bpath}.0")
    for i, blk in enumerate(blocks):
        for rel in roles:
            try:
                ok = _is_linear_unit(blk.get_submodule(rel))
            except AttributeError:
                ok = False
            if not ok:
                linears = ", ".join(r for r, m in blk.named_modules() if r and is_linear(m))
                raise ModelLoadError(f"block {bpath}.{i}: no linear {rel} as in block 0; linears seen: {linears}")
    o_rel = next(rel for rel, r in roles.items() if r == "o")
    attention = _attention_path(o_rel)
    qk = {}
    for rel, mod in blocks[0].named_modules():
        m = _QK_NORM.search(rel)
        if m and rel.startswith(f"{attention}.") and getattr(mod, "weight", None) is not None and not is_linear(mod):
            qk[rel] = m.group(1)[0]
    return Layout(bpath, roles, attention, qk)


def _attention_path(o_rel: str) -> str:
    """Give the attention module's path from its output projection's (BERT's ``attention.output.dense``
    sits one level deeper than the module holding ``self`` and ``output``)."""
    parent = o_rel.rsplit(".", 1)[0] if "." in o_rel else ""
    return parent.removesuffix(".output") if parent.endswith("attention.output") else parent


def linear_roles(model: nn.Module) -> dict[str, str]:
    """Give {path inside a block: role} for the block linears a plan may set."""
    return layout_of(model).roles


def head_dim_of(model: nn.Module) -> int:
    """Give the width of one attention head: the config's ``head_dim`` (which may differ from
    hidden ÷ heads), else the one block 0's attention module computes with, else hidden ÷ heads."""
    cfg = model.config
    if isinstance(getattr(cfg, "head_dim", None), int):
        return cfg.head_dim
    layout = layout_of(model)
    block = model.get_submodule(layout.block_path)[0]
    attn = block.get_submodule(layout.attention) if layout.attention else block
    for module in attn.modules():  # HF names it head_dim, BERT attention_head_size
        for attr in ("head_dim", "attention_head_size"):
            if isinstance(getattr(module, attr, None), int) and getattr(module, attr) > 0:
                return getattr(module, attr)
    return cfg.hidden_size // cfg.num_attention_heads


def embedding_sites(model: nn.Module, tied: bool) -> tuple[EmbeddingSite, ...]:
    """Give the token embedding and, when untied, the output head as plan tensors (by module name)."""
    names = {id(m): n for n, m in model.named_modules()}
    sites = []
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if isinstance(emb, nn.Embedding) and id(emb) in names:
        sites.append(EmbeddingSite(names[id(emb)], "embed", emb.num_embeddings, emb.embedding_dim, tied))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not tied and isinstance(head, nn.Linear) and id(head) in names:
        sites.append(EmbeddingSite(names[id(head)], "head", head.out_features, head.in_features))
    return tuple(sites)


def _is_tied(model: nn.Module) -> bool:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if emb is None or head is None:
        return False
    return head.weight is emb.weight or bool(getattr(model.config, "tie_word_embeddings", False))


def _is_causal(model: nn.Module, attention: nn.Module) -> bool:
    flags = [m.is_causal for m in attention.modules() if isinstance(getattr(m, "is_causal", None), bool)]
    if flags:
        return any(flags)
    can = getattr(model, "can_generate", None)
    return bool(can()) if callable(can) else True


def _block_heads(where: str, sites: list[LinearSite], head_dim: int, cfg_heads: int, cfg_kv: int) -> tuple[int, int]:
    """Give (query heads, KV heads) of one block from its projections' shapes and the config's head_dim."""
    by_role = {s.role: s for s in sites}
    o_in = by_role["o"].in_features
    if o_in % head_dim:
        raise ModelLoadError(f"block {where}: o projection input {o_in} is not a whole number of {head_dim}-wide heads")
    heads = o_in // head_dim
    # separate k, or the fused [q | k | v] less the q part, halved
    kv_width = by_role["k"].out_features if "k" in by_role else (by_role["qkv"].out_features - o_in) // 2
    kv = kv_width // head_dim if kv_width % head_dim == 0 else 0
    if kv < 1 or heads % kv:
        raise ModelLoadError(
            f"block {where}: key/value width {kv_width} is not a whole number of KV heads "
            f"(head_dim {head_dim}, config heads {cfg_heads}, KV heads {cfg_kv})"
        )
    return heads, kv


def _parts(role: str, heads: int, kv: int, head_dim: int, mlp_dim: int) -> tuple[tuple[str, int], ...]:
    if role == "qkv":
        return (("q", heads * head_dim), ("k", kv * head_dim), ("v", kv * head_dim))
    if role == "gate_up":
        return (("gate", mlp_dim), ("up", mlp_dim))
    return ()


def _norms(block: nn.Module) -> tuple[str, ...]:
    return tuple(
        rel for rel, m in block.named_modules() if rel and "norm" in type(m).__name__.lower() and not is_linear(m)
    )


def _qk_norm_kind(block: nn.Module, layout: Layout, head_dim: int) -> str:
    """Give how q / k are normalised inside attention: "per-head" (one head_dim-wide norm shared by
    all heads), "per-projection" (over every head's dims: head pruning slices it), or ""."""
    if not layout.qk_norms:
        return ""
    widths = {block.get_submodule(rel).weight.numel() for rel in layout.qk_norms}
    return "per-head" if widths == {head_dim} else "per-projection"


def _sliding_window(cfg: Any, index: int) -> int | None:
    window = getattr(cfg, "sliding_window", None)
    if not isinstance(window, int) or window <= 0:
        return None
    types = getattr(cfg, "layer_types", None)
    if isinstance(types, (list, tuple)) and len(types) > index:
        return window if "sliding" in str(types[index]) else None
    return window if getattr(cfg, "use_sliding_window", True) else None


def _embedding_scale(model: nn.Module) -> float:
    """Give the factor the token embeddings are multiplied by: Gemma's scaled embedding module
    (sqrt(hidden)), Granite's ``embedding_multiplier``, else 1."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    scale = getattr(emb, "scalar_embed_scale", None)
    if isinstance(scale, (int, float)):
        return float(scale)
    return float(getattr(model.config, "embedding_multiplier", None) or 1.0)


def anatomy_of(model: nn.Module, name: str, model_hash: str) -> ModelAnatomy:
    """Build the anatomy of an (uncompressed) model from its module tree and config."""
    cfg = model.config
    layout = layout_of(model)
    bpath = layout.block_path
    blocks_mod = model.get_submodule(bpath)
    cfg_heads = cfg.num_attention_heads
    cfg_kv = getattr(cfg, "num_key_value_heads", None) or cfg_heads
    hidden = cfg.hidden_size
    head_dim = head_dim_of(model)
    blocks = []
    linear_params = 0
    for i, blk in enumerate(blocks_mod):
        where = f"{bpath}.{i}"
        sites = []
        for rel, role in layout.roles.items():
            out_f, in_f, transposed = weight_of(blk.get_submodule(rel))
            sites.append(LinearSite(f"{where}.{rel}", i, role, in_f, out_f, transposed))
            linear_params += in_f * out_f
        mlp_dim = next(s.in_features for s in sites if s.role in ("down", "fc2"))
        heads, kv = _block_heads(where, sites, head_dim, cfg_heads, cfg_kv)
        sites = [
            LinearSite(s.name, s.block, s.role, s.in_features, s.out_features, s.transposed, parts)
            if (parts := _parts(s.role, heads, kv, head_dim, mlp_dim))
            else s
            for s in sites
        ]
        for s in sites:
            if s.parts and sum(w for _, w in s.parts) != s.out_features:
                raise ModelLoadError(
                    f"block {where}: fused {s.name.rsplit('.', 1)[-1]} has {s.out_features} outputs, "
                    f"its parts {dict(s.parts)} add up to {sum(w for _, w in s.parts)}"
                )
        blocks.append(
            BlockInfo(
                i,
                where,
                tuple(sites),
                heads,
                kv,
                head_dim,
                mlp_dim,
                norms=_norms(blk),
                qk_norm=_qk_norm_kind(blk, layout, head_dim),
                sliding_window=_sliding_window(cfg, i),
            )
        )
    seen: set[int] = set()
    total = 0
    for p in model.parameters():  # parameters() already skips tied duplicates; guard anyway
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    causal = _is_causal(model, blocks_mod[0].get_submodule(layout.attention) if layout.attention else blocks_mod[0])
    tied = _is_tied(model) if causal else False
    return ModelAnatomy(
        embeddings=embedding_sites(model, tied),
        name=name,
        model_hash=model_hash,
        architecture=architecture_of(model),
        task="causal-lm" if causal else "encoder",
        hidden_size=hidden,
        vocab_size=cfg.vocab_size,
        max_positions=getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", 1024),
        blocks=tuple(blocks),
        other_params=total - linear_params,
        tied_embeddings=tied,
        embedding_scale=_embedding_scale(model),
    )
