"""Write a compressed model as a Hugging Face folder (safetensors) with its plan beside it.

What each technique becomes is in ``autocompress.export.techniques.TECHNIQUES``. In short:
quantized weights are stored dequantized in the dtype the base model was distributed in (bf16 for
the bundled SmolLM2 and most checkpoints; fp32 only for a base that was itself fp32): values on a
format's grid are rounded once more to that dtype, the packed exporters (ONNX; GGUF to come) hold
them exactly; sparsity as zeros, dropped
blocks and widths that are the same in every kept block go into the config (``num_hidden_layers``,
``intermediate_size`` / ``n_inner``, Llama ``num_attention_heads`` / ``num_key_value_heads`` /
``head_dim``), so plain ``transformers`` loads those folders. Low-rank factors and per-block widths
have no config field: such folders load with ``autocompress.export.load_compressed``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autocompress._io import atomic_dir
from autocompress.errors import AutocompressError
from autocompress.export.techniques import HEAD_SIZE_FROM_HIDDEN, TECHNIQUES, techniques_used
from autocompress.model.loading import state_dict_hash
from autocompress.plan import Plan

NEEDS_LOADER = "needs autocompress.export.load_compressed"


def plain_transformers_blockers(plan: Plan, model: nn.Module | None = None) -> list[str]:
    """Give why plain ``transformers`` cannot load this plan's export (empty when it can).

    Quantization, sparsity, dropped blocks and widths shared by every kept block keep every tensor
    in a shape a config describes; per-block widths and low-rank factors do not. A model with our
    own pooling head (the MiniLM topic classifier) would load in plain transformers with the CLS
    pooler instead, silently: that counts as a blocker too.
    """
    out = [t for t in techniques_used(plan) if NEEDS_LOADER in TECHNIQUES[t]["hf"]]
    pooling = getattr(getattr(model, "config", None), "autocompress_pooling", None)
    if pooling:
        out.append(f"{pooling}-pooling classifier (plain transformers would use the CLS pooler)")
    return out


def _kept_widths(plan: Plan, attr: str) -> set[int | None]:
    kept = [i for i in range(plan.model.num_blocks) if i not in plan.drop_blocks]
    return {getattr(plan.block_choice(i), attr) for i in kept}


def hf_config(model: nn.Module, plan: Plan) -> Any:
    """Give a copy of ``model.config`` describing the compressed shapes wherever a config field can."""
    cfg = copy.deepcopy(model.config)
    cfg.architectures = [type(model).__name__]
    mlp = _kept_widths(plan, "keep_mlp_channels")
    if len(mlp) == 1 and None not in mlp:
        attr = "n_inner" if cfg.model_type == "gpt2" else "intermediate_size"
        setattr(cfg, attr, mlp.pop())
    heads = _kept_widths(plan, "keep_heads")
    if len(heads) == 1 and None not in heads and plan.model.architecture not in HEAD_SIZE_FROM_HIDDEN:
        keep = heads.pop()
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        per_kv = cfg.num_attention_heads // (getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
        cfg.head_dim = head_dim
        cfg.num_attention_heads = keep
        cfg.num_key_value_heads = keep // per_kv
    return cfg


def shape_mismatches(model: nn.Module, config: Any) -> list[str]:
    """Give the tensors of ``model`` that a model built from ``config`` lacks or shapes differently."""
    with torch.device("meta"):
        skeleton = type(model)(config)
    want = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    out = [f"{k}: not in the config's model" for k in sorted(set(have) - set(want))]
    out += [f"{k}: missing" for k in sorted(set(want) - set(have))]
    out += [
        f"{k}: {have[k]} vs {want[k]} in the config's model"
        for k in sorted(set(have) & set(want))
        if have[k] != want[k]
    ]
    return out


def storage_dtype(model: nn.Module) -> torch.dtype:
    """Give the dtype the base model was distributed in (its config's; bf16 for the bundled model and
    for models built in memory): an export is never wider than the model it came from."""
    name = getattr(model.config, "autocompress_storage_dtype", None)
    return {"float16": torch.float16, "float32": torch.float32}.get(name, torch.bfloat16)


def write_hf(model: nn.Module, plan: Plan, folder: Path, tokenizer: object | None = None) -> dict[str, Any]:
    """Write the HF files into an existing ``folder``; give what was written (for ``autocompress.json``)."""
    cfg = hf_config(model, plan)
    mismatches = shape_mismatches(model, cfg)
    dtype = storage_dtype(model)
    stored = copy.deepcopy(model).to(dtype)  # the caller's model keeps its exact fp32 values
    stored.config.dtype = dtype
    stored.save_pretrained(str(folder), safe_serialization=True)
    cfg.dtype = dtype
    cfg.save_pretrained(str(folder))  # the compressed shapes, where a config field can say them
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(folder))
    plan.save(folder / "plan.yaml")
    blockers = plain_transformers_blockers(plan, model)
    if mismatches and not blockers:  # never claim loadable when the shapes say otherwise
        blockers = [f"tensor shapes the config cannot describe ({mismatches[0]})"]
    info = {
        "plan_hash": plan.hash(),
        "weight_hash": state_dict_hash(model),  # the plan's exact (fp32) weights, before the cast
        "dtype": str(dtype).removeprefix("torch."),
        "base_model": plan.model.name,
        "loadable_with_plain_transformers": not blockers,
        "not_loadable_because": blockers,
        "load_with": f"transformers.{type(model).__name__}.from_pretrained(dir)"
        if not blockers
        else "autocompress.export.load_compressed(dir)",
        "techniques": {t: TECHNIQUES[t]["hf"] for t in techniques_used(plan)},
    }
    (folder / "autocompress.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def export_hf(model: nn.Module, plan: Plan, out: str | Path, tokenizer: object | None = None) -> str:
    """Write ``model`` (safetensors), its tokenizer and ``plan.yaml`` into ``out``; give the weight hash.

    The folder appears only when complete (written under a temporary name, then renamed).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise AutocompressError(f"output path {out} exists and is not a folder")
    try:
        with atomic_dir(out) as tmp:
            info = write_hf(model, plan, tmp, tokenizer)
    except OSError as exc:
        raise AutocompressError(f"cannot write output folder {out}: {exc.strerror or exc}") from None
    return info["weight_hash"]
