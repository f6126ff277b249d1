"""Read a model's structure: find its blocks and linears and build a ``ModelAnatomy``."""

from __future__ import annotations

from torch import nn

from autocompress.errors import ModelLoadError
from autocompress.model.anatomy import BlockInfo, EmbeddingSite, LinearSite, ModelAnatomy

LLAMA_FAMILY = ("llama", "qwen2", "mistral", "gemma", "gemma2", "smollm3", "qwen3")  # laid out as Llama is

# (block-list paths tried in order, {relative linear path: role}) per architecture
_LAYOUTS: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {
    "llama": (
        ("model.layers", "layers"),
        {
            "self_attn.q_proj": "q",
            "self_attn.k_proj": "k",
            "self_attn.v_proj": "v",
            "self_attn.o_proj": "o",
            "mlp.gate_proj": "gate",
            "mlp.up_proj": "up",
            "mlp.down_proj": "down",
        },
    ),
    "gpt2": (
        ("transformer.h", "h"),
        {"attn.c_attn": "qkv", "attn.c_proj": "o", "mlp.c_fc": "fc1", "mlp.c_proj": "fc2"},
    ),
    "bert": (
        ("bert.encoder.layer", "encoder.layer"),
        {
            "attention.self.query": "q",
            "attention.self.key": "k",
            "attention.self.value": "v",
            "attention.output.dense": "o",
            "intermediate.dense": "fc1",
            "output.dense": "fc2",
        },
    ),
}


def architecture_of(model: nn.Module) -> str:
    """Give the layout family ("llama", "gpt2" or "bert") of a transformers model."""
    mtype = getattr(getattr(model, "config", None), "model_type", None)
    if mtype in LLAMA_FAMILY:
        return "llama"
    if mtype in ("gpt2", "bert"):
        return mtype
    raise ModelLoadError(f"unsupported architecture {mtype!r}")


def block_path(model: nn.Module) -> str:
    """Give the dotted path of the block ``ModuleList``."""
    paths, _ = _LAYOUTS[architecture_of(model)]
    for p in paths:
        try:
            mod = model.get_submodule(p)
        except AttributeError:
            continue
        if isinstance(mod, nn.ModuleList):
            return p
    raise ModelLoadError(f"cannot find the transformer blocks of {type(model).__name__}")


def linear_roles(model: nn.Module) -> dict[str, str]:
    return _LAYOUTS[architecture_of(model)][1]


def weight_of(module: nn.Module) -> tuple[int, int, bool]:
    """Give (out_features, in_features, transposed) of an nn.Linear or HF Conv1D."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features, False
    if type(module).__name__ == "Conv1D":  # HF GPT-2: weight stored in×out
        in_f, out_f = module.weight.shape
        return out_f, in_f, True
    raise ModelLoadError(f"expected a linear layer, found {type(module).__name__}")


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


def anatomy_of(model: nn.Module, name: str, model_hash: str) -> ModelAnatomy:
    """Build the anatomy of an (uncompressed) model."""
    arch = architecture_of(model)
    cfg = model.config
    bpath = block_path(model)
    roles = linear_roles(model)
    blocks_mod = model.get_submodule(bpath)
    num_heads = cfg.num_attention_heads
    num_kv = getattr(cfg, "num_key_value_heads", None) or num_heads
    hidden = cfg.hidden_size
    head_dim = getattr(cfg, "head_dim", None) or hidden // num_heads
    blocks = []
    linear_params = 0
    for i, blk in enumerate(blocks_mod):
        sites = []
        for rel, role in roles.items():
            out_f, in_f, transposed = weight_of(blk.get_submodule(rel))
            sites.append(LinearSite(f"{bpath}.{i}.{rel}", i, role, in_f, out_f, transposed))
            linear_params += in_f * out_f
        mlp_dim = next(s.out_features for s in sites if s.role in ("up", "fc1"))
        blocks.append(BlockInfo(i, f"{bpath}.{i}", tuple(sites), num_heads, num_kv, head_dim, mlp_dim))
    seen: set[int] = set()
    total = 0
    for p in model.parameters():  # parameters() already skips tied duplicates; guard anyway
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    task = "encoder" if arch == "bert" else "causal-lm"
    tied = bool(getattr(cfg, "tie_word_embeddings", False)) if task == "causal-lm" else False
    return ModelAnatomy(
        embeddings=embedding_sites(model, tied),
        name=name,
        model_hash=model_hash,
        architecture=arch,
        task=task,
        hidden_size=hidden,
        vocab_size=cfg.vocab_size,
        max_positions=getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", 1024),
        blocks=tuple(blocks),
        other_params=total - linear_params,
        tied_embeddings=tied,
    )
