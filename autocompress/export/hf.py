"""Write a compressed model as a Hugging Face folder (safetensors) with its plan beside it."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from autocompress._io import atomic_dir
from autocompress.errors import AutocompressError
from autocompress.model.loading import state_dict_hash
from autocompress.plan import Plan


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
            info = {"plan_hash": plan.hash(), "weight_hash": weight_hash, "base_model": plan.model.name}
            (tmp / "autocompress.json").write_text(json.dumps(info, indent=2) + "\n")
    except OSError as exc:
        raise AutocompressError(f"cannot write output folder {out}: {exc.strerror or exc}") from None
    return weight_hash
