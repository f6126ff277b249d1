"""Export a compressed torch model to ONNX and quantize it with onnxruntime to match its plan.

Two graphs, both with dynamic batch and sequence axes; causal LMs return the last position's
logits only (what generation needs, and what the cost model prices):

- ``kv_cache=True`` (causal LMs; what ``autocompress export`` writes as ``model.onnx``): a decoder
  with a KV cache in the layout onnxruntime-genai and Optimum use. Inputs ``input_ids`` [batch,
  seq], ``attention_mask`` [batch, past + seq], ``position_ids`` [batch, seq] and, per kept block
  ``i``, ``past_key_values.{i}.key`` / ``.value`` [batch, kv_heads_i, past, head_dim]; outputs
  ``logits`` [batch, 1, vocab] and ``present.{i}.key`` / ``.value`` [batch, kv_heads_i, past + seq,
  head_dim]. The first call passes an empty cache (past = 0). Blocks whose heads were pruned have
  fewer ``kv_heads_i`` (``OnnxExport.cache`` lists them); dropped blocks are absent and the rest
  renumbered. Written by ``torch.onnx.export(dynamo=True)`` (opset 18) around a ``DynamicCache``.
- ``kv_cache=False``: ``forward(input_ids, attention_mask) -> logits`` without a cache (TorchScript
  exporter, opset 17): encoders, and the one-forward graphs the profile calibration times.

Both graphs are written by ``autocompress.export.onnx_graph``. GPT-2 ``Conv1D`` becomes
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
exactly is listed in ``OnnxExport.not_represented``.

The token embedding and output head stay fp32 unless the plan gives them a format. Then the head
is a ``MatMulNBits`` like any linear (the plan's codes), and the embedding lookup a
``GatherBlockQuantized`` (onnxruntime's contrib op; uint8 cells in MatMulNBits' layout) on the same
codes: a tied table is stored once, its packed codes shared by both nodes (a hidden size that is
not whole blocks, e.g. 576 in blocks of 128, is looked up padded and sliced back). Where the codes
cannot be held exactly (values off any grid), the lookup stays an fp32 ``Gather`` on the
dequantized table (the same values, fp32 size) and ``not_represented`` says so.
"""

from __future__ import annotations

import ast
import copy
import logging
import os
import tempfile
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch import nn

from autocompress.errors import AutocompressError
from autocompress.export.onnx_graph import conv1d_to_linear, write_decoder, write_forward
from autocompress.formats import FormatError, QuantizedTensor
from autocompress.formats import get as format_of
from autocompress.formats.integer import matmulnbits_blocks, parse_generic
from autocompress.model.anatomy import ModelAnatomy
from autocompress.plan import LayerChoice, Plan

OPSET = 17  # TorchScript exporter (graphs without a cache)
DECODER_OPSET = 18  # dynamo exporter (the KV-cache decoder)


@dataclass(frozen=True)
class OnnxExport:
    """What was written: the file, each linear's stored format, and what the runtime could not represent."""

    path: Path
    formats: dict[str, str]  # plan tensor name (linear, embedding / head) -> format stored in the ONNX file
    not_represented: tuple[str, ...] = field(default_factory=tuple)
    cache: tuple[tuple[int, int], ...] = ()  # (kv_heads, head_dim) of each kept block's cache; () without one

    @property
    def size_mb(self) -> float:
        return self.path.stat().st_size / 1e6


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


def _module_path(node: object) -> str | None:
    """Give the module path (in the exported model) of the torch module an ONNX node comes from, or None.

    The dynamo exporter records each node's module scopes in its metadata; the TorchScript exporter
    names nodes ``/<module path>/<Op>``. Both graphs wrap the model as the attribute ``model``."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            scopes = ast.literal_eval(prop.value)
            return scopes[-2].removeprefix("model.") if len(scopes) >= 2 else None
    if node.name.startswith("/") and node.name.count("/") >= 2:
        return node.name.strip("/").rsplit("/", 1)[0].replace("/", ".").removeprefix("model.")
    return None


def _weight_matmuls(model_proto: object) -> dict[str, str]:
    """Give MatMul node name -> module path for every MatMul whose B input is a stored weight."""
    inits = {i.name for i in model_proto.graph.initializer}
    out = {}
    for node in model_proto.graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits:
            path = _module_path(node)
            if path is not None:
                out[node.name] = path
    return out


def export_onnx(
    model: nn.Module,
    anatomy: ModelAnatomy,
    plan: Plan,
    path: str | Path,
    *,
    quantize: bool = True,
    opset: int | None = None,
    stored: dict[str, QuantizedTensor] | None = None,
    kv_cache: bool = False,
) -> OnnxExport:
    """Write ``model`` (``plan`` already applied to it) as ONNX at ``path``, quantized to match the plan.

    ``kv_cache``: the decoder with ``past_key_values`` inputs and ``present`` outputs (causal LMs), else
    one forward without a cache. ``stored`` (plan tensor name -> the tensor as its format stores it)
    gives MatMulNBits the codes and scales themselves; tensors without one (or whose weights no longer
    equal it) are read off the weights.
    """
    import onnx

    causal = anatomy.task != "encoder"
    if kv_cache and not causal:
        raise AutocompressError(f"ONNX export: a KV cache needs a causal LM; {anatomy.name} is an encoder")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    work = conv1d_to_linear(copy.deepcopy(model)).eval()
    head_path = _head_path(work)
    shapes: tuple[tuple[int, int], ...] = ()
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.stem}.") as tmp:
        raw = Path(tmp) / "model.onnx"
        if kv_cache:
            shapes = write_decoder(work, raw, opset or DECODER_OPSET)
        else:
            write_forward(work, causal, raw, opset or OPSET)
        proto = onnx.load(str(raw))
        formats, lost = _plan_formats(anatomy, plan)
        if quantize:
            proto = _quantize(proto, anatomy, plan, formats, Path(tmp), stored or {}, head_path, lost)
        else:
            formats = dict.fromkeys(formats, "fp32")
        for node in proto.graph.node:  # the exporter's provenance: module scopes, stack traces with local paths
            del node.metadata_props[:]
            node.doc_string = ""
        tmp_out = Path(tmp) / "out.onnx"
        onnx.save(proto, str(tmp_out))
        os.replace(tmp_out, path)
    return OnnxExport(path=path, formats=formats, not_represented=tuple(lost), cache=shapes)


def _head_path(model: nn.Module) -> str | None:
    """Give the module path of the output head (``lm_head``), or None (encoders)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return next((name for name, mod in model.named_modules() if head is not None and mod is head), None)


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
    for emb in anatomy.embeddings:
        choice = plan.embedding_choice(emb.name)
        if choice.quantized:
            fmt, why = target_format(choice)
            formats[emb.name] = fmt
            for w in why:
                lost[w].append(emb.name)
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
    head_path: str | None,
    lost: list[str],
) -> object:
    path_of = _renamed(anatomy, plan)
    by_path = {path_of[name]: name for name in formats if name in path_of}
    tables = {e.name: e for e in anatomy.embeddings if formats.get(e.name, "fp32") != "fp32"}
    head_name = next((e.name for e in tables.values() if e.role == "head" or e.tied), None)
    head_node = _head_matmul(proto, head_path) if head_name is not None and head_path is not None else None
    groups: dict[str, list[str]] = defaultdict(list)  # format -> MatMul node names
    tensors: dict[str, QuantizedTensor] = {}  # MatMul node name -> its stored tensor
    found = set()
    for node, module_path in _weight_matmuls(proto).items():
        name = _owner(module_path, by_path)
        if name is None:  # the lm_head (quantized below when the plan says so), attention constants
            continue
        found.add(name)
        groups[formats[name]].append(node)
        if name in stored and module_path == path_of[name]:  # not a low-rank factor
            tensors[node] = stored[name]
    if head_node is not None:
        found.add(head_name)
        groups[formats[head_name]].append(head_node)
        if head_name in stored:
            tensors[head_node] = stored[head_name]
    elif head_name is not None:
        lost.append(f"{head_name}: the output head's MatMul was not found; it stays fp32")
    missing = [n for n in formats if formats[n] != "fp32" and n not in found and n not in tables]
    if missing:
        raise AutocompressError(f"ONNX export: found no MatMul for {missing[0]} (exporter naming changed?)")
    proto = quantize_groups(proto, groups, tmp, tensors)
    for emb in tables.values():
        if emb.role == "embed":
            note = _quantized_lookup(proto, emb.name, formats[emb.name], stored.get(emb.name), emb.tied)
            if note:
                lost.append(f"{emb.name}: {note}")
    return proto


def _head_matmul(proto: object, head_path: str) -> str | None:
    """Give the output head's MatMul node with its weight made a plain [hidden, vocab] initializer (the
    exporter may feed it through a Transpose of the tied embedding table), or None if there is none."""
    from onnx import numpy_helper

    inits = {i.name: i for i in proto.graph.initializer}
    producers = {o: n for n in proto.graph.node for o in n.output}
    for node in proto.graph.node:
        if node.op_type != "MatMul" or _module_path(node) != head_path:
            continue
        if node.input[1] in inits:
            return node.name
        src = producers.get(node.input[1])
        if src is None or src.op_type != "Transpose" or src.input[0] not in inits:
            return None
        table = numpy_helper.to_array(inits[src.input[0]])
        weight = numpy_helper.from_array(np.ascontiguousarray(table.T), f"{src.input[0]}.head_t")
        proto.graph.initializer.append(weight)
        node.input[1] = weight.name
        if not any(src.output[0] in n.input for n in proto.graph.node):
            proto.graph.node.remove(src)
        return node.name
    return None


def _exact_blocks(
    fp32weight: np.ndarray, bits: int, block: int, symmetric: bool, q: QuantizedTensor | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Give MatMulNBits' (packed codes [N, k_blocks, block·bits/8], scales [N, k_blocks], packed zero
    points) holding the weight [K, N] exactly: from its stored tensor ``q`` when it has one, else from the
    grid its values lie on; None when neither holds them (then only a re-rounding could)."""
    got = None if q is None else _registry_blocks(q, bits, block, fp32weight)
    if got is not None:
        return got
    rows, cols = fp32weight.shape
    k_blocks = (rows + block - 1) // block
    padded = np.pad(fp32weight, ((0, k_blocks * block - rows), (0, 0)))
    got = grid_codes(padded.T.reshape(cols, k_blocks, block), symmetric, bits)
    if got is None:
        return None
    codes, scales, zero = got
    if bits == 4:  # two codes (and two zero points) per byte, low nibble first
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
        zero = np.pad(zero, ((0, 0), (0, k_blocks % 2)))
        zero = zero[:, 0::2] | (zero[:, 1::2] << 4)
    return codes.astype(np.uint8), scales.astype(fp32weight.dtype), zero.astype(np.uint8)


def _quantized_lookup(proto: object, embed_path: str, fmt: str, q: QuantizedTensor | None, tied: bool) -> str:
    """Replace the embedding's fp32 ``Gather`` by a ``GatherBlockQuantized`` on the plan's codes (shared
    with the head's MatMulNBits when tied); give what could not be done ("" when done)."""
    import onnx
    from onnx import helper, numpy_helper

    if fmt == "int8-dynamic":
        return "lookup kept as an fp32 Gather (W8A8 has no quantized lookup)"
    bits, block, symmetric = nbits_layout(fmt)
    inits = {i.name: i for i in proto.graph.initializer}
    gather = next(
        (
            n
            for n in proto.graph.node
            if n.op_type == "Gather" and n.input[0] in inits and _module_path(n) == embed_path
        ),
        None,
    )
    if gather is None:
        return "no Gather found for the lookup: kept fp32"
    table = numpy_helper.to_array(inits[gather.input[0]])
    rows, hidden = table.shape
    blocks = -(-hidden // block)
    head = next((n for n in proto.graph.node if n.op_type == "MatMulNBits" and tied and _shares(n, inits, table)), None)
    new_inits, inputs, views = [], [], []
    prefix = f"{embed_path}.gbq"
    if head is not None:  # the head's codes and scales, viewed as [vocab, hidden·bits/8] and [vocab, blocks]
        shape_of = {"data": [rows, -1], "scales": [rows, -1], "zero": [rows, -1]}
        srcs = {"data": head.input[1], "scales": head.input[2]}
        if len(head.input) > 3 and head.input[3]:
            srcs["zero"] = head.input[3]
        for key, src in srcs.items():
            shape = numpy_helper.from_array(np.array(shape_of[key], np.int64), f"{prefix}.{key}_shape")
            new_inits.append(shape)
            views.append(helper.make_node("Reshape", [src, shape.name], [f"{prefix}.{key}"]))
            inputs.append(f"{prefix}.{key}")
        zero = None if "zero" in srcs else _default_zero(rows, blocks, bits)
    else:
        got = _exact_blocks(table.T, bits, block, symmetric, q)
        if got is None:
            return f"lookup kept as an fp32 Gather (values not on a {bits}-bit grid of blocks of {block})"
        codes, scales, zero_packed = got
        new_inits += [
            numpy_helper.from_array(codes.reshape(rows, -1), f"{prefix}.data"),
            numpy_helper.from_array(scales.reshape(rows, -1).astype(np.float32), f"{prefix}.scales"),
        ]
        inputs = [f"{prefix}.data", f"{prefix}.scales"]
        zero = _default_zero(rows, blocks, bits) if symmetric else zero_packed.reshape(rows, -1)
    if zero is not None:
        new_inits.append(numpy_helper.from_array(zero, f"{prefix}.zero"))
        inputs.append(f"{prefix}.zero")
    padded = hidden % block != 0  # the codes fill whole blocks: the lookup gives padded rows, cut back after
    out = f"{prefix}.padded" if padded else gather.output[0]
    lookup = helper.make_node(
        "GatherBlockQuantized",
        [inputs[0], gather.input[1], *inputs[1:]],
        [out],
        name=f"{prefix}.lookup",
        domain="com.microsoft",
        gather_axis=0,
        quantize_axis=1,
        block_size=block,
        bits=bits,
    )
    nodes = list(proto.graph.node)
    at = nodes.index(gather)
    if padded:
        cut = [
            numpy_helper.from_array(np.array([v], np.int64), f"{prefix}.{k}")
            for k, v in (("start", 0), ("end", hidden), ("axis", -1))
        ]
        new_inits += cut
        views.append(lookup)
        lookup = helper.make_node("Slice", [out, *(c.name for c in cut)], [gather.output[0]], name=f"{prefix}.cut")
    nodes[at : at + 1] = [*views, lookup]
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    proto.graph.initializer.extend(new_inits)
    if not any(gather.input[0] in n.input for n in proto.graph.node):  # the fp32 table has no user left
        proto.graph.initializer.remove(inits[gather.input[0]])
    if not any(d.domain == "com.microsoft" for d in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return ""


def _shares(node: object, inits: dict[str, object], table: np.ndarray) -> bool:
    """True when a MatMulNBits node holds the [vocab, hidden] table (the tied head)."""
    attrs = {a.name: a.i for a in node.attribute}
    return attrs.get("N") == table.shape[0] and attrs.get("K") == table.shape[1]


def _default_zero(rows: int, blocks: int, bits: int) -> np.ndarray:
    """Give the zero points of a symmetric table (2^(bits-1), MatMulNBits' default), packed as GatherBlockQuantized reads them."""
    zero = np.full((rows, blocks), 2 ** (bits - 1), np.uint8)
    if bits == 4:
        zero = np.pad(zero, ((0, 0), (0, blocks % 2)))
        zero = zero[:, 0::2] | (zero[:, 1::2] << 4)
    return zero


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
        got = _exact_blocks(fp32weight, cfg.bits, cfg.block_size, cfg.is_symmetric, stored())
        return fallback(fp32weight) if got is None else got

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
