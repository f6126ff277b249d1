"""Write a compressed model as a compressed-tensors checkpoint: the HF folder vLLM loads packed.

The folder is an ordinary HF model folder whose ``config.json`` carries a compressed-tensors
``quantization_config`` (the layout llm-compressor writes): every quantized linear is stored
``pack-quantized`` (``weight_packed`` int32 words, ``weight_scale`` in the model's dtype,
``weight_shape``), one ``config_groups`` entry per format of the plan (int4 groups, int8 per channel,
any 2..8-bit integer grid, mixed per layer), every linear the plan leaves dense listed in ``ignore``
and stored dense. Dropped blocks and widths shared by every kept block go into the config as in the
dense HF export (``autocompress.export.hf``).

The codes are the plan's own (the format registry's ``QuantizedTensor`` recorded while the plan was
applied), packed by compressed-tensors' ``pack_to_int32``: nothing is re-quantized, GPTQ codes stay
GPTQ codes. The scales are stored in the model's dtype (bf16 for the bundled model), as the runtimes
compute with them, so every value differs from the plan's by the scale's rounding (at most 2^-8
relative in bf16; none for an fp32 base). Asymmetric grids are written with their zero points
packed along the rows (``weight_zero_point``, as vLLM reads them); plain ``transformers`` cannot
load those (compressed-tensors 0.20 builds the empty model with the unpacked zero-point shape:
llm-compressor #1618), so they load inside ``asymmetric_loading()``, which fixes that shape.

Plans it cannot write as evaluated are refused before anything is written
(``compressed_tensors_blockers``): formats that are not integer grids (GGUF types, MLC), groups that
do not divide a row (compressed-tensors' dequantizer needs whole groups: SmolLM2's 576-wide rows take
no group of 128), activation rounding, low-rank factors, per-block widths, a quantized embedding or
head, recovered plans.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autocompress import formats
from autocompress._io import atomic_dir
from autocompress.errors import AutocompressError
from autocompress.export.hf import hf_config, plain_transformers_blockers, shape_mismatches, storage_dtype
from autocompress.formats.integer import IntegerFormat
from autocompress.model.anatomy import LinearSite, ModelAnatomy
from autocompress.model.loading import state_dict_hash
from autocompress.plan import Plan

FORMAT = "pack-quantized"
VLLM_BITS = (4, 8)  # what every vLLM's WNA16 scheme takes (recent ones: 2..8 symmetric; zero points 4 / 8 only)
SIZE_MARGIN = 0.02  # the folder's tensor bytes are within this fraction of the predicted weight bytes


class CompressedTensorsExportError(AutocompressError):
    """A plan or model cannot be written as a compressed-tensors checkpoint."""


def _kept_sites(plan: Plan, anatomy: ModelAnatomy) -> list[LinearSite]:
    return [s for s in anatomy.linears if s.block not in plan.drop_blocks]


def _shape_after(site: Any, plan: Plan, blocks: dict[int, Any]) -> tuple[int, int]:
    """Give a linear's [out, in] once the plan's head / MLP widths are applied."""
    bc = plan.block_choice(site.block)
    return site.shape_after(*blocks[site.block].fractions(bc.keep_heads, bc.keep_mlp_channels))


def _format_problem(fmt: formats.Format) -> str | None:
    if not isinstance(fmt, IntegerFormat):
        return "not an integer grid (compressed-tensors stores int{2..8} groups / per channel)"
    return None


def compressed_tensors_blockers(plan: Plan, anatomy: ModelAnatomy, model: nn.Module | None = None) -> list[str]:
    """Give what keeps this plan from being one compressed-tensors folder that loads as evaluated
    (empty: nothing); each entry names a format or knob and how many tensors have it."""
    out: list[str] = []
    if plan.recovery is not None:
        out.append("recovery (distillation) moves weights off their format's grid")
    out += plain_transformers_blockers(plan, model)
    problems: Counter[str] = Counter()
    blocks = {b.index: b for b in anatomy.blocks}
    for site in _kept_sites(plan, anatomy):
        c = plan.choice_for(site.name)
        if c.rank_ratio is not None:
            continue  # named once above, by plain_transformers_blockers
        if c.act_bits < 16:
            problems[f"{c.act_bits}-bit activations (W8A8 is not written here)"] += 1
        if c.quantized and site.transposed:
            problems["quantized Conv1D (GPT-2) linears (compressed-tensors quantizes nn.Linear only)"] += 1
        elif c.quantized:
            why = _format_problem(c.fmt)
            in_f = _shape_after(site, plan, blocks)[1]
            if why:
                problems[f"format {c.format}: {why}"] += 1
            elif c.fmt.group_size is not None and in_f % c.fmt.group_size:
                problems[
                    f"{c.format} on {in_f}-wide rows (compressed-tensors needs rows a multiple of the group size)"
                ] += 1
    for emb in anatomy.embeddings:
        c = plan.embedding_choice(emb.name)
        if c.quantized:
            problems[f"{emb.role} table in {c.format} (transformers cannot load a packed embedding or tied head)"] += 1
    out += [f"{what} ({n} tensor{'s' if n > 1 else ''})" for what, n in problems.items()]
    return out


def _quant_args(fmt: formats.Format) -> dict[str, Any]:
    args = {"num_bits": fmt.bits, "type": "int", "symmetric": fmt.symmetric, "dynamic": False}
    if fmt.group_size is None:
        return {**args, "strategy": "channel"}
    return {**args, "strategy": "group", "group_size": int(fmt.group_size)}


def quantization_config(groups: dict[str, list[str]], ignore: list[str]) -> dict[str, Any]:
    """Give the ``quantization_config`` entry of config.json: one scheme per format (targets: the
    exact module names), dense linears in ``ignore`` (vLLM refuses a linear that no entry names)."""
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    schemes = {
        name: QuantizationScheme(
            targets=targets, weights=QuantizationArgs(**_quant_args(formats.get(name))), format=FORMAT
        )
        for name, targets in sorted(groups.items())
    }
    cfg = QuantizationConfig(config_groups=schemes, format=FORMAT, quantization_status="compressed", ignore=ignore)
    return {
        "version": compressed_tensors.__version__,
        "quant_method": "compressed-tensors",
        "sparsity_config": {},
        "transform_config": {},
        **cfg.model_dump(exclude=["quant_method"]),
    }


def _signed(levels: torch.Tensor, fmt: formats.Format) -> torch.Tensor:
    """Give level indices as compressed-tensors' signed integers: symmetric grids' level 2^(b-1) - 1 is
    0; asymmetric codes and zero points are shifted by 2^(b-1), so (code - zero) is unchanged."""
    shift = 2 ** (fmt.bits - 1) - (1 if fmt.symmetric else 0)
    return (levels.long() - shift).to(torch.int8)


def packed_tensors(q: formats.QuantizedTensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Give one quantized linear's stored tensors (suffixes ``weight_packed``, ``weight_scale``,
    ``weight_shape``, and ``weight_zero_point`` packed along the rows for asymmetric grids, as vLLM reads it)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    fmt = formats.get(q.format)
    out = {
        "weight_packed": pack_to_int32(_signed(q.codes, fmt), fmt.bits).contiguous(),
        "weight_scale": q.params["scale"].to(dtype).contiguous(),
        "weight_shape": torch.tensor(q.shape, dtype=torch.int64),
    }
    if not fmt.symmetric:
        out["weight_zero_point"] = pack_to_int32(_signed(q.params["zero"], fmt), fmt.bits, packed_dim=0).contiguous()
    return out


@contextlib.contextmanager
def asymmetric_loading() -> Iterator[None]:
    """Within this block, ``from_pretrained`` loads asymmetric pack-quantized layers (compressed-tensors
    0.20 gives the empty model an unpacked zero point, [out, groups] int8, where the file holds it
    packed along the rows, [ceil(out * bits / 32), groups] int32: llm-compressor #1618). Symmetric
    folders need no patch; vLLM reads the packed zero points itself."""
    from compressed_tensors.compressors.pack_quantized.base import PACK_ZP_STRATS, PackedQuantizationCompressor

    original = PackedQuantizationCompressor.__dict__["compress"]

    def compress(cls: Any, state_dict: Any, scheme: Any) -> Any:
        out = original.__func__(cls, state_dict, scheme)
        w, zp = scheme.weights, out.get("weight_zero_point")
        if zp is not None and zp.device.type == "meta" and not w.symmetric and w.strategy in PACK_ZP_STRATS:
            rows = math.ceil(zp.shape[0] * w.num_bits / 32)
            out["weight_zero_point"] = torch.empty((rows, *zp.shape[1:]), dtype=torch.int32, device="meta")
        return out

    PackedQuantizationCompressor.compress = classmethod(compress)
    try:
        yield
    finally:
        PackedQuantizationCompressor.compress = original


def _renamed(name: str, block: int, new: int) -> str:
    return name.replace(f".{block}.", f".{new}.", 1)


def _tied_keys(model: nn.Module) -> set[str]:
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return set(tied.keys() if isinstance(tied, dict) else tied)


def predicted_weight_bytes(model: nn.Module, anatomy: ModelAnatomy, plan: Plan) -> int:
    """Give the bytes the format registry says the plan's weights take: each quantized linear
    ``fmt.bytes(shape)``, every other tensor at the base dtype's width (tied tables once)."""
    width = torch.finfo(storage_dtype(model)).bits // 8
    quantized = {}
    kept = [b for b in range(plan.model.num_blocks) if b not in plan.drop_blocks]
    for site in _kept_sites(plan, anatomy):
        c = plan.choice_for(site.name)
        if c.quantized:
            quantized[f"{_renamed(site.name, site.block, kept.index(site.block))}.weight"] = c.fmt
    total, tied = 0, _tied_keys(model)
    for key, t in model.state_dict().items():
        if key in tied:
            continue
        fmt = quantized.get(key)
        total += fmt.bytes(tuple(t.shape)) if fmt is not None else t.numel() * width
    return total


def vllm_notes(plan: Plan, anatomy: ModelAnatomy) -> list[str]:
    """Give what vLLM will not run as written, or runs without the saving the plan was priced with (from
    vLLM's documented kernel limits, not run here; the folder still loads in transformers)."""
    notes: Counter[str] = Counter()
    by_block: dict[int, dict[str, str | None]] = {}
    for site in _kept_sites(plan, anatomy):
        c = plan.choice_for(site.name)
        by_block.setdefault(site.block, {})[site.role] = c.format
        if c.pruned:
            notes[f"{c.sparsity_pattern} sparsity: stored as zeros in dense layouts (no sparse kernel, no saving)"] += 1
        if not c.quantized:
            continue
        fmt = c.fmt
        if fmt.bits not in VLLM_BITS and not fmt.symmetric:
            notes[f"{fmt.name}: vLLM's zero-point types are 4- and 8-bit only"] += 1
        elif fmt.bits not in VLLM_BITS:
            notes[f"{fmt.name}: {fmt.bits}-bit weights need a recent vLLM (older ones take 4 or 8 bits)"] += 1
    for fused in (("q", "k", "v"), ("gate", "up")):
        mixed = [b for b, roles in by_block.items() if len({roles.get(r) for r in fused if r in roles}) > 1]
        if mixed:
            notes[f"{'/'.join(fused)} in different formats in block(s) {mixed}: vLLM fuses them and needs one"] += 1
    return [f"{what} ({n} tensor{'s' if n > 1 else ''})" if n > 1 else what for what, n in notes.items()]


def write_compressed_tensors(
    model: nn.Module,
    anatomy: ModelAnatomy,
    plan: Plan,
    stored: dict[str, formats.QuantizedTensor],
    folder: Path,
    tokenizer: object | None = None,
) -> dict[str, Any]:
    """Write the checkpoint into an existing ``folder``; give what was written (``autocompress.json``)."""
    from safetensors.torch import save_file

    blockers = compressed_tensors_blockers(plan, anatomy, model)
    if blockers:
        raise CompressedTensorsExportError(
            f"plan {plan.hash()[:12]} cannot be written as compressed-tensors: {'; '.join(blockers[:3])}"
        )
    cfg = hf_config(model, plan)
    mismatches = shape_mismatches(model, cfg)
    if mismatches:
        raise CompressedTensorsExportError(f"tensor shapes the config cannot describe ({mismatches[0]})")
    dtype = storage_dtype(model)
    tied = _tied_keys(model)
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items() if k not in tied}
    kept = [b for b in range(plan.model.num_blocks) if b not in plan.drop_blocks]
    groups: dict[str, list[str]] = {}
    ignore: list[str] = []
    for site in _kept_sites(plan, anatomy):
        path = _renamed(site.name, site.block, kept.index(site.block))
        c = plan.choice_for(site.name)
        if not c.quantized:
            ignore.append(path)
            continue
        q = stored.get(site.name)
        if q is None or q.format != c.format:
            raise CompressedTensorsExportError(f"{site.name}: no stored {c.format} tensor was recorded for it")
        weight = state.pop(f"{path}.weight")
        if not torch.equal(c.fmt.dequantize(q), model.get_parameter(f"{path}.weight").detach().float().cpu()):
            raise CompressedTensorsExportError(f"{site.name}: the stored codes are not the model's weights")
        del weight
        state.update({f"{path}.{k}": v for k, v in packed_tensors(q, dtype).items()})
        groups.setdefault(c.format, []).append(path)
    ignore += [e.name for e in anatomy.embeddings if e.role == "head" and not e.tied] or ["lm_head"]
    cfg.dtype = dtype
    cfg.save_pretrained(str(folder))
    config_file = folder / "config.json"
    data = json.loads(config_file.read_text())
    if groups:  # a plan that quantizes nothing is a plain HF folder
        data["quantization_config"] = quantization_config(groups, ignore)
        config_file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(folder))
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(folder))
    plan.save(folder / "plan.yaml")
    asym = sorted(name for name in groups if not formats.get(name).symmetric)
    load = f"transformers.{type(model).__name__}.from_pretrained(dir) with compressed-tensors installed"
    if asym:
        load = f"with autocompress.export.compressed_tensors.asymmetric_loading(): {load}"
    tensor_bytes = sum(t.numel() * t.element_size() for t in state.values())
    predicted = predicted_weight_bytes(model, anatomy, plan)
    info = {
        "format": f"compressed-tensors {FORMAT}",
        "plan_hash": plan.hash(),
        "weight_hash": state_dict_hash(model),  # the plan's exact (fp32) weights
        "dtype": str(dtype).removeprefix("torch."),
        "base_model": plan.model.name,
        "schemes": {name: len(targets) for name, targets in sorted(groups.items())},
        "dense_linears": len(ignore),
        "tensor_bytes": tensor_bytes,
        "file_bytes": (folder / "model.safetensors").stat().st_size,
        "predicted_weight_bytes": predicted,
        "scales": f"stored in {str(dtype).removeprefix('torch.')} (the runtime's dtype); the codes are the plan's",
        "vllm_notes": vllm_notes(plan, anatomy),
        "loadable_with_plain_transformers": not asym,
        "load_with": load,
    }
    if asym:
        info["not_loadable_because"] = [
            f"asymmetric zero points ({', '.join(asym)}): compressed-tensors builds them unpacked (llm-compressor #1618)"
        ]
    (folder / "autocompress.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def export_compressed_tensors(
    wb: Any,
    plan: Plan,
    out: str | Path,
    *,
    applied: tuple[nn.Module, dict[str, formats.QuantizedTensor]] | None = None,
) -> dict[str, Any]:
    """Write ``plan`` applied to the workbench's model as a compressed-tensors folder ``out``; give
    its record. Refused (nothing written) when ``compressed_tensors_blockers`` names anything; the
    folder appears only when complete. ``applied``: the model and stored tensors of an earlier
    ``wb.apply(plan, stored=...)`` (not applied again)."""
    out = Path(out)
    anatomy = wb.lm.anatomy
    blockers = compressed_tensors_blockers(plan, anatomy, wb.lm.model)
    if blockers:
        raise CompressedTensorsExportError(
            f"plan {plan.hash()[:12]} cannot be written as compressed-tensors: {'; '.join(blockers[:3])}"
        )
    if out.exists() and not out.is_dir():
        raise CompressedTensorsExportError(f"output path {out} exists and is not a folder")
    model, stored = applied if applied is not None else wb.apply_with_codes(plan)
    try:
        with atomic_dir(out) as tmp:
            info = write_compressed_tensors(model, anatomy, plan, stored, tmp, wb.lm.tokenizer)
    except OSError as exc:
        raise CompressedTensorsExportError(f"cannot write output folder {out}: {exc.strerror or exc}") from None
    return info


SUBFOLDER = "compressed-tensors"  # inside each trial folder of `autocompress export`


def trial_record(
    model: nn.Module, wb: Any, plan: Plan, stored: dict[str, formats.QuantizedTensor] | None, folder: Path
) -> dict[str, Any]:
    """Write ``folder/compressed-tensors/`` for one exported trial; give its record, or why it was
    not written (a plan the format cannot hold, on a ``--pareto`` export)."""
    blockers = compressed_tensors_blockers(plan, wb.lm.anatomy, wb.lm.model)
    if blockers or stored is None:
        return {"written": False, "not_written_because": blockers or ["the plan's stored tensors were not recorded"]}
    (folder / SUBFOLDER).mkdir()
    info = write_compressed_tensors(model, wb.lm.anatomy, plan, stored, folder / SUBFOLDER, wb.lm.tokenizer)
    return {"written": True, "folder": SUBFOLDER, **info}
