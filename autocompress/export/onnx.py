"""Export a compressed torch model to ONNX and quantize it with onnxruntime to match its plan.

The TorchScript exporter (``dynamo=False``, opset 17) writes ``forward(input_ids, attention_mask)
-> logits`` with dynamic batch and sequence axes; causal LMs return the last position's logits
only (what generation needs, and what the cost model prices). GPT-2 ``Conv1D`` becomes
``nn.Linear`` first, because ORT's weight-only quantizer handles ``MatMul`` and not ``Gemm``.

Each linear is then stored as close to its plan choice as onnxruntime CPU allows:

| plan bits | ONNX | note |
|---|---|---|
| 16 | fp32 ``MatMul`` | ORT CPU has no fast fp16 matmul |
| 8 (and 5–7) | dynamic int8 (``MatMulInteger``, QInt8 per output channel) | 5–7 bits are stored as 8 |
| 4 (and 2–3) | ``MatMulNBits`` 4-bit, the plan's group size and symmetry, int8 compute | 2–3 bit codes in 4-bit cells |

4-bit weights keep the plan's exact values: ``grid_codes`` recovers each block's integer codes and
step from the (already rounded) weights and writes them as MatMulNBits codes/scales/zero points;
onnxruntime's own quantizer would re-round them on its grid (symmetric: max|w|/8, codes -8..7),
adding a second rounding error. Weights not on a grid (e.g. calibration chains) use ORT's rounding.
Per-row grids are stored in 128-blocks, non-power-of-two groups that are multiples of 16 in
16-blocks: same values, more scales.

Sparsity is stored dense (no sparse kernel in ORT CPU); low-rank layers are two ``MatMul``; width
pruning and dropped blocks are simply smaller / fewer matmuls. Whatever could not be represented
exactly is listed in ``OnnxExport.not_represented``. The lm_head is left in fp32, as in the plan.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from autocompress.errors import AutocompressError
from autocompress.model.anatomy import ModelAnatomy
from autocompress.plan import LayerChoice, Plan

OPSET = 17


@dataclass(frozen=True)
class OnnxExport:
    """What was written: the file, each linear's stored format, and what the runtime could not represent."""

    path: Path
    formats: dict[str, str]  # plan linear name -> format stored in the ONNX file
    not_represented: tuple[str, ...] = field(default_factory=tuple)

    @property
    def size_mb(self) -> float:
        return self.path.stat().st_size / 1e6


class _LogitsOnly(nn.Module):
    def __init__(self, model: nn.Module, causal: bool) -> None:
        super().__init__()
        self.model = model
        self.causal = causal

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.causal:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1)
        else:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return out.logits


def conv1d_to_linear(model: nn.Module) -> nn.Module:
    """Replace every HF GPT-2 ``Conv1D`` (weight in x out) by an equivalent ``nn.Linear``, in place."""
    from transformers.pytorch_utils import Conv1D

    for name, mod in list(model.named_modules()):
        if isinstance(mod, Conv1D):
            in_f, out_f = mod.weight.shape
            lin = nn.Linear(in_f, out_f, bias=mod.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(mod.weight.t())
                if mod.bias is not None:
                    lin.bias.copy_(mod.bias)
            model.set_submodule(name, lin)
    return model


def target_format(choice: LayerChoice) -> tuple[str, list[str]]:
    """Give the ORT CPU format for a plan choice and what of the choice it cannot represent."""
    lost: list[str] = []
    if choice.sparsity > 0:
        lost.append(f"{choice.sparsity_pattern} sparsity {choice.sparsity:g} stored dense (no ORT CPU sparse kernel)")
    if choice.bits >= 16:
        return "fp32", lost
    if choice.bits > 4:
        if choice.bits != 8:
            lost.append(f"{choice.bits}-bit stored as int8")
        if choice.group_size is not None:
            lost.append(f"int8 group size {choice.group_size} stored per output channel")
        return "int8-dynamic", lost
    if choice.bits != 4:
        lost.append(f"{choice.bits}-bit stored as 4-bit (same values when on the plan's grid; 4-bit size and speed)")
    sym = "sym" if choice.symmetric else "asym"
    if choice.group_size is None:
        return f"int4-row-{sym}", lost
    g = choice.group_size
    if g % 16 == 0 and g & (g - 1):  # e.g. 48: 16-blocks hold the same values, with more scales
        block = g & -g
        lost.append(f"group size {g} stored in blocks of {block} (same values, more scales)")
    else:
        block = max(16, 1 << (g - 1).bit_length())
        if block != g:
            lost.append(f"group size {g} stored as {block} (MatMulNBits needs a power of two >= 16)")
    return f"int4-g{block}-{sym}", lost


def _renamed(anatomy: ModelAnatomy, plan: Plan) -> dict[str, str]:
    """Give plan linear name -> module path in the compressed model (dropped blocks renumber the rest)."""
    dropped = set(plan.drop_blocks)
    kept = [b for b in anatomy.blocks if b.index not in dropped]
    out = {}
    for new_index, b in enumerate(kept):
        base, _, _ = b.prefix.rpartition(".")
        new_prefix = f"{base}.{new_index}"
        for s in b.linears:
            out[s.name] = new_prefix + s.name[len(b.prefix) :]
    return out


def _weight_matmuls(model_proto: object) -> dict[str, str]:
    """Give MatMul node name -> module path for every MatMul whose B input is a stored weight."""
    inits = {i.name for i in model_proto.graph.initializer}
    out = {}
    for node in model_proto.graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits and node.name.endswith("/MatMul"):
            path = node.name.strip("/").rsplit("/", 1)[0].replace("/", ".")
            out[node.name] = path.removeprefix("model.")  # the _LogitsOnly wrapper's attribute
    return out


def export_onnx(
    model: nn.Module,
    anatomy: ModelAnatomy,
    plan: Plan,
    path: str | Path,
    *,
    quantize: bool = True,
    opset: int = OPSET,
) -> OnnxExport:
    """Write ``model`` (``plan`` already applied to it) as ONNX at ``path``, quantized to match the plan."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    work = conv1d_to_linear(copy.deepcopy(model)).eval()
    wrapper = _LogitsOnly(work, causal=anatomy.task != "encoder")
    ids = torch.ones((2, 8), dtype=torch.long)
    axes = {0: "batch", 1: "seq"}
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.stem}.") as tmp:
        raw = Path(tmp) / "model.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about HF's shape-dependent Python branches
            torch.onnx.export(
                wrapper,
                (ids, torch.ones_like(ids)),
                str(raw),
                dynamo=False,
                opset_version=opset,
                input_names=["input_ids", "attention_mask"],
                output_names=["logits"],
                dynamic_axes={"input_ids": axes, "attention_mask": axes, "logits": {0: "batch"}},
            )
        proto = onnx.load(str(raw))
        formats, lost = _plan_formats(anatomy, plan)
        if quantize:
            proto = _quantize(proto, anatomy, plan, formats, Path(tmp))
        else:
            formats = dict.fromkeys(formats, "fp32")
        tmp_out = Path(tmp) / "out.onnx"
        onnx.save(proto, str(tmp_out))
        os.replace(tmp_out, path)
    return OnnxExport(path=path, formats=formats, not_represented=tuple(lost))


def _plan_formats(anatomy: ModelAnatomy, plan: Plan) -> tuple[dict[str, str], list[str]]:
    formats: dict[str, str] = {}
    lost: dict[str, list[str]] = defaultdict(list)
    dropped = set(plan.drop_blocks)
    for site in anatomy.linears:
        if site.block in dropped:
            continue
        fmt, why = target_format(plan.choice_for(site.name))
        formats[site.name] = fmt
        for w in why:
            lost[w].append(site.name)
    notes = [f"{w}: {len(names)} linear(s), e.g. {names[0]}" for w, names in lost.items()]
    return formats, notes


def _owner(module_path: str, by_path: dict[str, str]) -> str | None:
    """Give the plan linear that owns a module path (low-rank factors sit below it: ``<path>.<path>.0``)."""
    parts = module_path.split(".")
    for end in range(len(parts), 0, -1):
        name = by_path.get(".".join(parts[:end]))
        if name is not None:
            return name
    return None


def _quantize(proto: object, anatomy: ModelAnatomy, plan: Plan, formats: dict[str, str], tmp: Path) -> object:
    path_of = _renamed(anatomy, plan)
    by_path = {path_of[name]: name for name in formats}
    groups: dict[str, list[str]] = defaultdict(list)  # format -> MatMul node names
    found = set()
    for node, module_path in _weight_matmuls(proto).items():
        name = _owner(module_path, by_path)
        if name is None:  # the lm_head (not in the plan) stays dense
            continue
        found.add(name)
        groups[formats[name]].append(node)
    missing = [n for n in formats if formats[n] != "fp32" and n not in found]
    if missing:
        raise AutocompressError(f"ONNX export: found no MatMul for {missing[0]} (exporter naming changed?)")
    return quantize_groups(proto, groups, tmp)


GRID_TOL = 1e-3  # |w / step - round(w / step)| below this counts as "on the grid"


def grid_codes(blocks: np.ndarray, symmetric: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Recover 4-bit codes of weights that already lie on a per-block integer grid.

    ``blocks`` [N, k_blocks, block] holds values that our quantizer (RTN or GPTQ, at 2-4 bits) left
    on a grid ``(q - z) * step`` per block. Give (codes uint8 [N, k_blocks, block], steps float32
    [N, k_blocks], zero points uint8 [N, k_blocks]) that reproduce them exactly in MatMulNBits'
    dequantization ``(code - zero) * scale``, or None when some block is not on such a grid (then
    onnxruntime's own rounding is used). onnxruntime recomputes the scale from each block's range
    (symmetric: max|w| / 8 on codes -8..7), which re-rounds values already rounded by the plan.
    """
    w = blocks.astype(np.float64)
    if symmetric:
        extent, levels = np.abs(w).max(-1), range(7, 0, -1)
    else:
        extent, levels = w.max(-1) - w.min(-1), range(15, 0, -1)
    flat = extent <= 0
    step = np.zeros_like(extent)
    rel = np.zeros_like(w)
    done = flat.copy()
    step[flat] = 1.0
    for k in levels:
        cand = np.where(flat, 1.0, extent / k)
        r = w / cand[..., None]
        ok = ~done & (np.abs(r - np.round(r)) < GRID_TOL).all(-1)
        if symmetric:
            ok &= (np.abs(np.round(r)) <= 7).all(-1)
        else:
            ok &= (np.round(r).max(-1) - np.round(r).min(-1)) <= 15
        step = np.where(ok, cand, step)
        rel = np.where(ok[..., None], np.round(r), rel)
        done |= ok
    if not done.all():
        return None
    if symmetric:
        zero = np.full(step.shape, 8.0)
    else:
        zero = np.clip(-rel.min(-1), 0, 15)
        zero = np.minimum(zero, 15 - rel.max(-1))
    codes = rel + zero[..., None]
    if codes.min() < 0 or codes.max() > 15:
        return None
    return codes.astype(np.uint8), step.astype(np.float32), zero.astype(np.uint8)


def _grid_block_quant(node_quantizer: object):
    """Give a ``qbits_block_quant`` for onnxruntime's 4-bit quantizer that keeps the plan's grid when it can."""
    fallback = node_quantizer.qbits_block_quant
    cfg = node_quantizer.config

    def block_quant(fp32weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rows, cols = fp32weight.shape
        bs = cfg.block_size
        k_blocks = (rows + bs - 1) // bs
        padded = np.pad(fp32weight, ((0, k_blocks * bs - rows), (0, 0)))
        got = grid_codes(padded.T.reshape(cols, k_blocks, bs), cfg.is_symmetric)
        if got is None:
            return fallback(fp32weight)
        codes, scales, zero = got
        packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
        zero = np.pad(zero, ((0, 0), (0, k_blocks % 2)))
        zp = (zero[:, 0::2] | (zero[:, 1::2] << 4)).astype(np.uint8)
        return packed, scales.astype(fp32weight.dtype), zp

    return block_quant


def quantize_groups(proto: object, groups: dict[str, list[str]], tmp: Path) -> object:
    """Give ``proto`` with each group of MatMul nodes quantized to its format (``int8-dynamic``,
    ``int4-g<block>-<sym|asym>``, ``int4-row-<sym|asym>``; ``fp32`` is left alone)."""
    logging.disable(logging.WARNING)  # the quantizers log every node and nag about pre-processing
    try:
        return _run_quantizers(proto, groups, Path(tmp))
    finally:
        logging.disable(logging.NOTSET)


def _run_quantizers(proto: object, groups: dict[str, list[str]], tmp: Path) -> object:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    for fmt, nodes in sorted(groups.items()):
        if not fmt.startswith("int4"):
            continue
        _, block, sym = fmt.split("-")
        # nodes_to_include is OR-ed with the op type inside ORT: exclude every other MatMul instead
        keep = set(nodes)
        others = [n.name for n in proto.graph.node if n.op_type == "MatMul" and n.name not in keep]
        q = MatMulNBitsQuantizer(
            proto,
            bits=4,
            block_size=128 if block == "row" else int(block[1:]),
            is_symmetric=sym == "sym",
            accuracy_level=4,
            nodes_to_exclude=others,  # per-row grids go in 128-blocks (exact: every block holds row-grid values)
        )
        q.node_quantizer.qbits_block_quant = _grid_block_quant(q.node_quantizer)
        q.process()
        proto = q.model.model
    if groups.get("int8-dynamic"):
        src, dst = tmp / "pre_int8.onnx", tmp / "int8.onnx"
        onnx.save(proto, str(src))
        quantize_dynamic(
            str(src),
            str(dst),
            op_types_to_quantize=["MatMul"],
            nodes_to_quantize=groups["int8-dynamic"],
            per_channel=True,
            weight_type=QuantType.QInt8,
            extra_options={"MatMulConstBOnly": True},
        )
        proto = onnx.load(str(dst))
    return proto
