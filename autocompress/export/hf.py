"""Write a compressed model as a Hugging Face folder (safetensors) with its plan beside it."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from autocompress._io import atomic_dir
from autocompress.errors import AutocompressError
from autocompress.model.loading import state_dict_hash
from autocompress.plan import Plan


def plain_transformers_blockers(plan: Plan) -> list[str]:
    """Give why plain ``transformers`` cannot load this plan's export (empty when it can).

    Quantization, sparsity and dropped blocks keep every tensor in the shape the config
    describes; per-block head/MLP widths and low-rank factors do not.
    """
    reasons = []
    if any(b.keep_heads is not None or b.keep_mlp_channels is not None for b in plan.blocks.values()):
        reasons.append("per-block attention heads / MLP widths")
    if plan.default.rank_ratio is not None or any(c.rank_ratio is not None for c in plan.layers.values()):
        reasons.append("low-rank factors (<layer>.0 / <layer>.1)")
    return reasons


def export_hf(model: nn.Module, plan: Plan, out: str | Path, tokenizer: object | None = None) -> str:
    """Write ``model`` (safetensors), its tokenizer and ``plan.yaml`` into ``out``; give the weight hash.

    The folder appears only when complete (written under a temporary name, then renamed).
    Quantized weights are stored dequantized (fp32 on the plan's integer grid); low-rank layers
    are two linears (``<name>.0`` / ``<name>.1``); structural changes are real smaller shapes.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise AutocompressError(f"output path {out} exists and is not a folder")
    weight_hash = state_dict_hash(model)
    try:
        with atomic_dir(out) as tmp:
            model.save_pretrained(str(tmp), safe_serialization=True)
            if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
                tokenizer.save_pretrained(str(tmp))
            plan.save(tmp / "plan.yaml")
            blockers = plain_transformers_blockers(plan)
            info = {
                "plan_hash": plan.hash(),
                "weight_hash": weight_hash,
                "base_model": plan.model.name,
                "loadable_with_plain_transformers": not blockers,
                "not_loadable_because": blockers,
            }
            (tmp / "autocompress.json").write_text(json.dumps(info, indent=2) + "\n")
    except OSError as exc:
        raise AutocompressError(f"cannot write output folder {out}: {exc.strerror or exc}") from None
    return weight_hash
