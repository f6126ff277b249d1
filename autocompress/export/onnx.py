"""Export a compressed torch model to ONNX and quantize it with onnxruntime to match its plan.

The TorchScript exporter (``dynamo=False``, opset 17) writes ``forward(input_ids, attention_mask)
-> logits`` with dynamic batch and sequence axes; causal LMs return the last position's logits
only (what generation needs, and what the cost model prices). GPT-2 ``Conv1D`` becomes
``nn.Linear`` first, because ORT's weight-only quantizer handles ``MatMul`` and not ``Gemm``.

Each linear is then stored as close to its plan choice as onnxruntime CPU allows:

| plan bits | ONNX | note |
|---|---|---|
| 16 | fp32 ``MatMul`` | ORT CPU has no fast fp16 matmul |
| 8 with ``act_bits`` 8 (W8A8) | dynamic int8 (``MatMulInteger``, QInt8 per output channel) | activations rounded per tensor at run time |
| 8 (and 5–7) weight-only | ``MatMulNBits`` 8-bit, the plan's group size and symmetry, int8 compute | 5–7 bit codes in 8-bit cells |
| 4 (and 2–3) | ``MatMulNBits`` 4-bit, the plan's group size and symmetry, int8 compute | 2–3 bit codes in 4-bit cells |

``MatMulNBits`` weights keep the plan's exact values. Given the tensors as their format stores them
(``stored``: ``Workbench.apply(plan, stored=...)`` / ``apply_plan_to(..., stored=...)``), a linear on a
generic integer grid is written from its codes and scales through the format registry
(``formats.integer.matmulnbits_blocks``, the layout ``IntegerFormat.pack`` writes); otherwise
``grid_codes`` recovers each block's integer codes and step from the (already rounded) weights.
onnxruntime's own quantizer would re-round them on its grid (symmetric 4-bit: max|w|/8, codes
-8..7), adding a second rounding error. Weights on no grid (e.g. calibration chains) use ORT's
rounding. Per-row grids are stored in blocks (``ROW_BLOCK``), non-power-of-two groups that
are multiples of 16 in 16-blocks: same values, more scales. Accuracy level 4 (int8 compute) rounds
each block of activations to int8 at run time, which the plan does not (3x faster decode than fp32
compute here); ``verify.check_onnx`` checks the stored weights apart from that rounding and
``verify.runtime_rounding`` measures its cost on held-out text.

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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from autocompress.errors import AutocompressError
from autocompress.formats import FormatError, QuantizedTensor
from autocompress.formats import get as format_of
from autocompress.formats.integer import matmulnbits_blocks, parse_generic
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
        if choice.act_bits < 16:
            lost.append(f"a{choice.act_bits} activation rounding of a 16-bit layer not stored (fp32 MatMul)")
        return "fp32", lost
    if choice.bits == 8 and choice.act_bits == 8:  # W8A8: ORT's int8 x int8 GEMM
        lost.append("W8A8 activations also rounded per tensor at run time (after the plan's per-token rounding)")
        if choice.group_size is not None:
            lost.append(f"W8A8 group size {choice.group_size} stored per output channel")
        return "int8-dynamic", lost
    width = 8 if choice.bits > 4 else 4
    fmt = choice.fmt
    if fmt is not None and parse_generic(fmt.name) is None:  # GGUF / MLC blocks: scales, mins, levels of their own
        lost.append(
            f"{fmt.name} is not a generic integer grid: its values are kept only where they lie on the "
            f"MatMulNBits {width}-bit grid (else onnxruntime re-rounds them)"
        )
    if choice.act_bits < 16:
        lost.append(f"a{choice.act_bits} activations of {choice.bits}-bit weights rounded per block at run time")
    if choice.bits != width:
        lost.append(
            f"{choice.bits}-bit stored as {width}-bit (same values when on the plan's grid; {width}-bit size and speed)"
        )
    sym = "sym" if choice.symmetric else "asym"
    if choice.group_size is None:
        return f"int{width}-row-{sym}", lost
    g = choice.group_size
    if g % 16 == 0 and g & (g - 1):  # e.g. 48: 16-blocks hold the same values, with more scales
        block = g & -g
        lost.append(f"group size {g} stored in blocks of {block} (same values, more scales)")
    else:
        block = max(16, 1 << (g - 1).bit_length())
        if block != g:
            lost.append(f"group size {g} stored as {block} (MatMulNBits needs a power of two >= 16)")
    return f"int{width}-g{block}-{sym}", lost


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
    stored: dict[str, QuantizedTensor] | None = None,
) -> OnnxExport:
    """Write ``model`` (``plan`` already applied to it) as ONNX at ``path``, quantized to match the plan.

    ``stored`` (plan linear name -> the tensor as its format stores it) gives MatMulNBits the codes and
    scales themselves; linears without one (or whose weights no longer equal it) are read off the weights.
    """
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
            proto = _quantize(proto, anatomy, plan, formats, Path(tmp), stored or {})
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


def _quantize(
    proto: object,
    anatomy: ModelAnatomy,
    plan: Plan,
    formats: dict[str, str],
    tmp: Path,
    stored: dict[str, QuantizedTensor],
) -> object:
    path_of = _renamed(anatomy, plan)
    by_path = {path_of[name]: name for name in formats}
    groups: dict[str, list[str]] = defaultdict(list)  # format -> MatMul node names
    tensors: dict[str, QuantizedTensor] = {}  # MatMul node name -> its stored tensor
    found = set()
    for node, module_path in _weight_matmuls(proto).items():
        name = _owner(module_path, by_path)
        if name is None:  # the lm_head (not in the plan) stays dense
            continue
        found.add(name)
        groups[formats[name]].append(node)
        if name in stored and module_path == path_of[name]:  # not a low-rank factor
            tensors[node] = stored[name]
    missing = [n for n in formats if formats[n] != "fp32" and n not in found]
    if missing:
        raise AutocompressError(f"ONNX export: found no MatMul for {missing[0]} (exporter naming changed?)")
    return quantize_groups(proto, groups, tmp, tensors)


# Per-row grids are stored in blocks (exact: every block holds row-grid values). The block is also
# the span over which accuracy level 4 rounds activations to int8: on SmolLM2, 8-bit rows in 32-blocks
# deviate less per position from our model than in 128-blocks (KL 0.0037 vs 0.0054) at the same file
# size (a 576-wide row pads to 640 in 128-blocks); bench/onnx_rounding.py. 4-bit rows keep 128.
ROW_BLOCK = {4: 128, 8: 32}


def nbits_layout(fmt: str) -> tuple[int, int, bool]:
    """Give (bits, block size, symmetric) of a MatMulNBits format ``int<4|8>-<row|g<block>>-<sym|asym>``."""
    width, block, sym = fmt.split("-")
    bits = int(width.removeprefix("int"))
    return bits, ROW_BLOCK[bits] if block == "row" else int(block[1:]), sym == "sym"


GRID_TOL = 1e-3  # |w / step - round(w / step)| below this counts as "on the grid"


def grid_codes(blocks: np.ndarray, symmetric: bool, bits: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Recover ``bits``-bit (4 or 8) codes of weights that already lie on a per-block integer grid.

    ``blocks`` [N, k_blocks, block] holds values that our quantizer (RTN or GPTQ) left on a grid
    ``(q - z) * step`` per block, with at most ``bits`` bits of codes. Give (codes uint8 [N,
    k_blocks, block], steps float32 [N, k_blocks], zero points uint8 [N, k_blocks]) that reproduce
    them exactly in MatMulNBits' dequantization ``(code - zero) * scale``, or None when some block
    is not on such a grid (then onnxruntime's own rounding is used). onnxruntime recomputes the
    scale from each block's range (symmetric 4-bit: max|w| / 8 on codes -8..7), which re-rounds
    values already rounded by the plan.
    """
    shape = blocks.shape
    w = np.asarray(blocks, dtype=np.float64).reshape(-1, shape[-1])  # one row per block
    top = 2**bits - 1
    if symmetric:
        extent, levels = np.abs(w).max(-1), range(2 ** (bits - 1) - 1, 0, -1)
    else:
        extent, levels = w.max(-1) - w.min(-1), range(top, 0, -1)
    step = np.ones(len(w))
    rel = np.zeros(w.shape)
    todo = np.flatnonzero(extent > 0)  # blocks still without a grid (all-zero blocks keep step 1, codes 0)
    for k in levels:  # finest grid first; most blocks use their full code range and stop at once
        if not todo.size:
            break
        cand = extent[todo] / k
        r = w[todo] / cand[:, None]
        q = np.round(r)
        ok = (np.abs(r - q) < GRID_TOL).all(-1) & ((q.max(-1) - q.min(-1)) <= top)
        step[todo[ok]] = cand[ok]
        rel[todo[ok]] = q[ok]
        todo = todo[~ok]
    if todo.size:
        return None
    if symmetric:
        zero = np.full(len(w), float(2 ** (bits - 1)))
    else:
        zero = np.minimum(np.clip(-rel.min(-1), 0, top), top - rel.max(-1))
    codes = rel + zero[:, None]
    if codes.min() < 0 or codes.max() > top:
        return None
    return (
        codes.reshape(shape).astype(np.uint8),
        step.reshape(shape[:-1]).astype(np.float32),
        zero.reshape(shape[:-1]).astype(np.uint8),
    )


def _registry_blocks(
    q: QuantizedTensor, bits: int, block: int, fp32weight: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Give MatMulNBits' (codes, scales, zero points) of a stored tensor, or None if it cannot hold
    them or its values are not the weight [K, N] being quantized (e.g. changed after apply)."""
    rows, cols = fp32weight.shape
    if tuple(q.shape) != (cols, rows):
        return None
    try:
        codes, scales, zero = matmulnbits_blocks(q, bits, block)
    except FormatError:
        return None
    if not np.array_equal(format_of(q.format).dequantize(q).numpy().T, fp32weight):
        return None
    if zero is None:  # symmetric: MatMulNBits gets no zero points
        zero = np.zeros((cols, -(-scales.shape[1] * bits // 8)), dtype=np.uint8)
    return codes, scales.astype(fp32weight.dtype), zero


def _grid_block_quant(node_quantizer: object, stored: Callable[[], QuantizedTensor | None]):
    """Give a ``qbits_block_quant`` for onnxruntime's 4/8-bit quantizer that keeps the plan's grid when it
    can: the stored tensor of the node being quantized (``stored()``), else the grid read off the weights."""
    fallback = node_quantizer.qbits_block_quant
    cfg = node_quantizer.config

    def block_quant(fp32weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        q = stored()
        got = None if q is None else _registry_blocks(q, cfg.bits, cfg.block_size, fp32weight)
        if got is not None:
            return got
        rows, cols = fp32weight.shape
        bs = cfg.block_size
        k_blocks = (rows + bs - 1) // bs
        padded = np.pad(fp32weight, ((0, k_blocks * bs - rows), (0, 0)))
        got = grid_codes(padded.T.reshape(cols, k_blocks, bs), cfg.is_symmetric, cfg.bits)
        if got is None:
            return fallback(fp32weight)
        codes, scales, zero = got
        if cfg.bits == 4:  # two codes (and two zero points) per byte, low nibble first
            codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
            zero = np.pad(zero, ((0, 0), (0, k_blocks % 2)))
            zero = zero[:, 0::2] | (zero[:, 1::2] << 4)
        return codes.astype(np.uint8), scales.astype(fp32weight.dtype), zero.astype(np.uint8)

    return block_quant


def quantize_groups(
    proto: object, groups: dict[str, list[str]], tmp: Path, tensors: dict[str, QuantizedTensor] | None = None
) -> object:
    """Give ``proto`` with each group of MatMul nodes quantized to its format (``int8-dynamic``,
    ``int<4|8>-g<block>-<sym|asym>``, ``int<4|8>-row-<sym|asym>``; ``fp32`` is left alone).

    ``tensors`` (MatMul node name -> stored tensor) gives MatMulNBits nodes their codes and scales."""
    logging.disable(logging.WARNING)  # the quantizers log every node and nag about pre-processing
    try:
        return _run_quantizers(proto, groups, Path(tmp), tensors or {})
    finally:
        logging.disable(logging.NOTSET)


def _run_quantizers(
    proto: object, groups: dict[str, list[str]], tmp: Path, tensors: dict[str, QuantizedTensor]
) -> object:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    for fmt, nodes in sorted(groups.items()):
        if fmt in ("fp32", "int8-dynamic"):
            continue
        bits, block_size, symmetric = nbits_layout(fmt)
        # nodes_to_include is OR-ed with the op type inside ORT: exclude every other MatMul instead
        keep = set(nodes)
        others = [n.name for n in proto.graph.node if n.op_type == "MatMul" and n.name not in keep]
        q = MatMulNBitsQuantizer(
            proto,
            bits=bits,
            block_size=block_size,
            is_symmetric=symmetric,
            accuracy_level=4,
            nodes_to_exclude=others,
        )
        nq, current = q.node_quantizer, [""]
        quantize_node = nq.quantize

        def tracked(node, graph_stack, quantize_node=quantize_node, current=current):
            current[0] = node.name  # qbits_block_quant sees only the weight: remember whose it is
            return quantize_node(node, graph_stack)

        nq.quantize = tracked
        nq.qbits_block_quant = _grid_block_quant(nq, lambda current=current: tensors.get(current[0]))
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
