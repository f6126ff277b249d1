"""Load an HF export whose shapes no config can describe (low-rank factors, per-block widths).

``load_compressed(dir)`` reads a compressed-tensors folder with transformers (asymmetric ones too);
for the others it builds the model class named in ``config.json``, re-shapes it as the
``plan.yaml`` beside it says (the same structural functions the compression used, so attention
attributes follow), turns the plan's low-rank layers into two linears of the stored rank, loads
the safetensors strictly and re-adds activation fake-quantization hooks. It works for every export,
plain-loadable or not, and needs no base model, data or calibration.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from autocompress.errors import ModelLoadError
from autocompress.plan import Plan


def _stored_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ModelLoadError(f"{folder} holds no model.safetensors (not an autocompress HF export)")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(folder / f)))
    return out


def _renumbered(plan: Plan) -> dict[int, int]:
    """Give original block index -> index after the plan's dropped blocks are gone."""
    kept = [i for i in range(plan.model.num_blocks) if i not in plan.drop_blocks]
    return {old: new for new, old in enumerate(kept)}


def load_compressed(folder: str | Path) -> nn.Module:
    """Give the compressed model stored in an autocompress HF export folder (eval mode, fp32)."""
    import transformers

    from autocompress.compress.apply import _fake_quant_input
    from autocompress.compress.lowrank import factorized_module
    from autocompress.compress.structure import shrink_heads, shrink_mlp
    from autocompress.model.inspect import block_path, linear_roles

    folder = Path(folder)
    if not (folder / "plan.yaml").is_file() or not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder} is not an autocompress export (needs config.json and plan.yaml)")
    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{folder}/config.json cannot be read: {exc.__class__.__name__}") from None
    if (raw.get("quantization_config") or {}).get("quant_method") == "compressed-tensors":  # transformers reads it
        from autocompress.export.compressed_tensors import asymmetric_loading

        named = getattr(transformers, (raw.get("architectures") or [""])[0], None)
        with asymmetric_loading():
            model = (named or transformers.AutoModelForCausalLM).from_pretrained(str(folder), dtype=torch.float32)
        return model.eval()
    plan = Plan.load(folder / "plan.yaml")
    config = transformers.AutoConfig.from_pretrained(str(folder))
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise ModelLoadError(f"{folder}/config.json names no transformers model class ({arch!r})")
    torch.manual_seed(0)  # the skeleton's values are all overwritten; keep its construction deterministic
    model = cls(config).float()  # the stored bf16 / fp16 values, read back exactly in fp32
    renum = _renumbered(plan)
    for old, new in renum.items():
        bc = plan.block_choice(old)
        if bc.keep_heads is not None:
            shrink_heads(model, new, bc.keep_heads)  # shapes only: the stored weights replace these values
        if bc.keep_mlp_channels is not None:
            shrink_mlp(model, new, bc.keep_mlp_channels)
    stored = {k: v.float() if v.is_floating_point() else v for k, v in _stored_tensors(folder).items()}
    bpath = block_path(model)
    for old, new in renum.items():
        for rel in linear_roles(model):
            name, path = f"{bpath}.{old}.{rel}", f"{bpath}.{new}.{rel}"
            choice = plan.choice_for(name)
            if choice.rank_ratio is not None:
                first, second = stored.get(f"{path}.0.weight"), stored.get(f"{path}.1.weight")
                if first is None or second is None:
                    raise ModelLoadError(f"{folder}: plan says {name} is low-rank, but {path}.0/.1 are not stored")
                bias = stored.get(f"{path}.1.bias")
                model.set_submodule(path, factorized_module(torch.zeros_like(first), torch.zeros_like(second), bias))
            if choice.act_bits < 16:
                model.get_submodule(path).register_forward_pre_hook(_fake_quant_input)
    missing, unexpected = model.load_state_dict(stored, strict=False)
    tied = {k for k in missing if _is_tied(model, k)}
    if unexpected or set(missing) - tied:
        bad = sorted(unexpected) or sorted(set(missing) - tied)
        raise ModelLoadError(f"{folder}: stored tensors do not match the plan's shapes (e.g. {bad[0]})")
    if tied:
        model.tie_weights()
    return model.eval()


def _is_tied(model: nn.Module, key: str) -> bool:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    keys = tied.keys() if isinstance(tied, dict) else tied
    return any(key == k or key.endswith(k) for k in keys)
