"""Write a compressed model as a GGUF file llama.cpp runs, every tensor in the plan's format.

The quantized tensors are the plan's exact codes and scales, packed by the format registry
(``Format.pack``): nothing is re-quantized, so llama.cpp computes with exactly the weights the
search evaluated. Everything else follows llama.cpp's own converter (``convert_hf_to_gguf.py``):

- tensor names ``token_embd``, ``blk.N.attn_q`` ... ``ffn_down``, ``output_norm``, ``output`` (only
  when the head is not tied); the q / k rows reordered per head as the converter does (llama.cpp's
  rope pairs neighbouring rows; the reorder moves whole rows, so packed rows move unchanged);
- norms in F32, dense linears and an unquantized embedding in the base model's storage dtype (BF16 /
  F16 / F32, as the HF export);
- dropped blocks are fewer layers. Blocks that keep different numbers of heads or MLP channels are
  written with the ``deci`` architecture, whose graph reads per-layer ``head_count``,
  ``head_count_kv`` and ``feed_forward_length`` arrays (llama.cpp's ``llama`` graph takes layer 0's
  values for every layer); uniform plans are plain ``llama`` files;
- the tokenizer's key-values come from the base GGUF for the bundled model, from llama.cpp's
  converter (``--vocab-only``) for other HF folders, and are written here for the byte tokenizer of
  the tiny test models.

Plans llama.cpp cannot run as they are (low-rank factors, unstructured / 2:4 sparsity, activation
rounding, formats that are not GGUF types, model families other than Llama/Mistral) are refused
with one line naming what is in the way (``gguf_blockers``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from torch import nn

from autocompress import formats
from autocompress.errors import AutocompressError
from autocompress.model.anatomy import ModelAnatomy
from autocompress.plan import Plan

MODEL_TYPES = ("llama", "mistral")  # HF families whose tensors llama.cpp's llama / deci graphs run unchanged
ROLE_NAMES = {
    "q": "attn_q",
    "k": "attn_k",
    "v": "attn_v",
    "o": "attn_output",
    "gate": "ffn_gate",
    "up": "ffn_up",
    "down": "ffn_down",
}
NORM_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
_STORAGE = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def dense_type(model: Any) -> str:
    """Give the GGUF type a plan's dense tensors are written in: the base model's storage dtype."""
    from autocompress.export.hf import storage_dtype

    return _STORAGE[storage_dtype(model)]


class GGUFExportError(AutocompressError):
    """A plan or model cannot be written as a GGUF file llama.cpp runs."""


def gguf_blockers(plan: Plan, model_type: str | None) -> list[str]:
    """Give what keeps this plan from being one GGUF file llama.cpp runs as evaluated (empty: nothing)."""
    out = []
    if model_type not in MODEL_TYPES:
        out.append(f"model type {model_type!r} (GGUF export covers {', '.join(MODEL_TYPES)})")
    for name, c in sorted(plan.layers.items()):
        if c.rank_ratio is not None:
            out.append(f"{name}: low-rank factors (llama.cpp has no factorized linear)")
        if c.pruned:
            out.append(f"{name}: {c.sparsity_pattern or 'unstructured'} sparsity (llama.cpp stores no sparse format)")
        if c.act_bits < 16:
            out.append(f"{name}: {c.act_bits}-bit activations (llama.cpp rounds activations its own way)")
        if c.quantized and c.fmt.gguf_type is None:
            out.append(f"{name}: format {c.format} is not a GGUF type")
    return out


def _rope_rows(rows: int, n_head: int) -> torch.Tensor:
    """Give the row order llama.cpp's converter writes q / k in (``LlamaModel.permute``): out = w[idx]."""
    idx = torch.arange(rows)
    return idx.reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(rows)


@dataclass(frozen=True)
class Tensor:
    """One GGUF tensor: its name, the model parameter it holds, the format it is stored in, and where
    the plan names it (``key``: the linear / table name that ``stored`` tensors are filed under)."""

    name: str
    source: str
    format: str
    key: str | None = None
    rows: torch.Tensor | None = None  # the row order written (q / k), None when unchanged

    @property
    def type(self) -> gguf.GGMLQuantizationType:
        return formats.get(self.format).gguf_type

    def data(self, model: nn.Module, stored: dict[str, formats.QuantizedTensor]) -> np.ndarray:
        """Give the bytes (or array) gguf-py writes: the stored codes packed, rows in GGUF order."""
        w = model.get_parameter(self.source).detach().float()
        if self.format == "F32" and w.dim() == 1:
            return w.numpy().copy()
        fmt = formats.get(self.format)
        q = stored.get(self.key) if self.key is not None else None
        if q is None and not fmt.is_float:
            raise GGUFExportError(f"{self.source}: no stored {self.format} tensor was recorded for it")
        packed = fmt.pack(q if q is not None else fmt.quantize(w))
        return packed if self.rows is None else packed[self.rows.numpy()]


@dataclass
class _Layout:
    kept: list[int]
    heads: list[int]
    kv_heads: list[int]
    ff: list[int]
    head_dim: int

    @property
    def uniform(self) -> bool:
        return len(set(self.heads)) == len(set(self.kv_heads)) == len(set(self.ff)) == 1


def _layout(model: nn.Module, anatomy: ModelAnatomy, plan: Plan) -> _Layout:
    kept = [b.index for b in anatomy.blocks if b.index not in plan.drop_blocks]
    head_dim = anatomy.blocks[0].head_dim
    heads, kv, ff = [], [], []
    layers = model.model.layers
    for j in range(len(kept)):
        attn, mlp = layers[j].self_attn, layers[j].mlp
        heads.append(attn.q_proj.weight.shape[0] // head_dim)
        kv.append(attn.k_proj.weight.shape[0] // head_dim)
        ff.append(mlp.gate_proj.weight.shape[0])
    return _Layout(kept, heads, kv, ff, head_dim)


def tensors(model: nn.Module, anatomy: ModelAnatomy, plan: Plan, dense: str) -> Iterator[Tensor]:
    """Give the GGUF tensors of the compressed ``model`` (``plan`` applied), in file order; tensors the
    plan leaves dense are stored in ``dense`` (F32 / F16 / BF16)."""
    lay = _layout(model, anatomy, plan)
    by_block = {b.index: b for b in anatomy.blocks}

    def table(site_name: str, gguf_name: str) -> Tensor:
        choice = plan.embedding_choice(site_name)
        fmt = choice.format if choice.quantized else dense
        return Tensor(gguf_name, f"{site_name}.weight", fmt, site_name)

    embed = next(e for e in anatomy.embeddings if e.role == "embed")
    yield table(embed.name, "token_embd.weight")
    for j, i in enumerate(lay.kept):
        for site in by_block[i].linears:
            choice = plan.choice_for(site.name)
            fmt = choice.format if choice.quantized else dense
            rows = None
            if site.role in ("q", "k"):
                out_f = model.get_submodule(site.name.replace(f".{i}.", f".{j}.", 1)).weight.shape[0]
                rows = _rope_rows(out_f, lay.heads[j] if site.role == "q" else lay.kv_heads[j])
            source = site.name.replace(f".{i}.", f".{j}.", 1) + ".weight"
            yield Tensor(f"blk.{j}.{ROLE_NAMES[site.role]}.weight", source, fmt, site.name, rows)
        for hf_norm, g in NORM_NAMES.items():
            yield Tensor(f"blk.{j}.{g}.weight", f"model.layers.{j}.{hf_norm}.weight", "F32")
    yield Tensor("output_norm.weight", "model.norm.weight", "F32")
    head = next((e for e in anatomy.embeddings if e.role == "head" and not e.tied), None)
    if head is not None:
        yield table(head.name, "output.weight")


# --- key-values ------------------------------------------------------------------------------


def _rope_theta(cfg: Any) -> float:
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    kind = params.get("rope_type", "default") if isinstance(params, dict) else "default"
    if kind not in ("default", None):
        raise GGUFExportError(f"rope scaling {kind!r} is not written to GGUF here (only plain rope)")
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta or getattr(cfg, "rope_theta", None) or 10000.0)


def _hparams(w: gguf.GGUFWriter, arch: str, cfg: Any, anatomy: ModelAnatomy, lay: _Layout, name: str) -> None:
    def per_layer(values: list[int]) -> int | list[int]:
        return values if arch == "deci" else values[0]

    K = gguf.Keys.LLM
    A = gguf.Keys.Attention
    w.add_string(gguf.Keys.General.NAME, name)
    w.add_uint32(gguf.Keys.General.QUANTIZATION_VERSION, gguf.GGML_QUANT_VERSION)
    w.add_uint32(K.CONTEXT_LENGTH.format(arch=arch), int(anatomy.max_positions))
    w.add_uint32(K.EMBEDDING_LENGTH.format(arch=arch), int(anatomy.hidden_size))
    w.add_uint32(K.BLOCK_COUNT.format(arch=arch), len(lay.kept))
    w.add_uint32(K.VOCAB_SIZE.format(arch=arch), int(anatomy.vocab_size))
    for key, values in ((K.FEED_FORWARD_LENGTH, lay.ff), (A.HEAD_COUNT, lay.heads), (A.HEAD_COUNT_KV, lay.kv_heads)):
        v = per_layer(values)
        if isinstance(v, list):
            w.add_array(key.format(arch=arch), v)
        else:
            w.add_uint32(key.format(arch=arch), v)
    w.add_uint32(A.KEY_LENGTH.format(arch=arch), lay.head_dim)
    w.add_uint32(A.VALUE_LENGTH.format(arch=arch), lay.head_dim)
    w.add_uint32(gguf.Keys.Rope.DIMENSION_COUNT.format(arch=arch), lay.head_dim)
    w.add_float32(gguf.Keys.Rope.FREQ_BASE.format(arch=arch), _rope_theta(cfg))
    w.add_float32(A.LAYERNORM_RMS_EPS.format(arch=arch), float(cfg.rms_norm_eps))


# GPT-2's byte-to-unicode table: byte-level BPE vocabularies spell each byte as one printable character.
def _bytes_to_unicode() -> list[str]:
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = list(bs), 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs, strict=True))
    return [chr(table[b]) for b in range(256)]


def _byte_vocab(w: gguf.GGUFWriter, tok: Any) -> None:
    """Write the tiny models' byte tokenizer (ids 3..258 = bytes 0..255) as a byte-level BPE vocabulary."""
    specials = ["<pad>", "<s>", "</s>"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([*specials, *_bytes_to_unicode()])
    w.add_token_types([gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * 256)
    w.add_token_merges(["<s> </s>"])  # llama.cpp requires a merges list; this pair never occurs in text
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_add_bos_token(False)


def _copy_tokenizer(w: gguf.GGUFWriter, source: Path) -> None:
    """Copy every ``tokenizer.*`` key-value of a GGUF file."""
    reader = gguf.GGUFReader(source)
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, field.contents(), vtype, sub_type=field.types[-1])
        else:
            w.add_key_value(key, field.contents(), vtype)


@dataclass(frozen=True)
class Vocab:
    """Where a GGUF file's tokenizer comes from: a GGUF file's ``tokenizer.*`` keys, or the byte tokenizer."""

    gguf_file: Path | None = None
    byte_tokenizer: Any = None

    def write(self, w: gguf.GGUFWriter) -> None:
        if self.gguf_file is not None:
            _copy_tokenizer(w, self.gguf_file)
        else:
            _byte_vocab(w, self.byte_tokenizer)


def vocab_from_converter(hf_folder: Path, work: Path, log: Callable[[str], None] | None = None) -> Vocab:
    """Give the vocabulary llama.cpp's own converter writes for an HF folder (``--vocab-only``)."""
    from autocompress.runtime import llamacpp

    tools = llamacpp.require()
    if tools.source is None or not (tools.source / "convert_hf_to_gguf.py").is_file():
        raise GGUFExportError(
            f"llama.cpp's converter is not beside {tools.bin}; it is needed for this model's tokenizer "
            "(rebuild with `autocompress llamacpp build --force`)"
        )
    out = work / "vocab.gguf"
    cmd = [sys.executable, str(tools.source / "convert_hf_to_gguf.py"), "--vocab-only", "--outfile", str(out)]
    if log:
        log(f"writing the tokenizer with llama.cpp's converter from {hf_folder}")
    proc = subprocess.run([*cmd, str(hf_folder)], capture_output=True, text=True, cwd=tools.source)
    if proc.returncode != 0 or not out.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise GGUFExportError(f"llama.cpp's converter could not write the tokenizer of {hf_folder}: {tail[0]}")
    return Vocab(gguf_file=out)


def write_gguf(
    model: nn.Module,
    anatomy: ModelAnatomy,
    plan: Plan,
    stored: dict[str, formats.QuantizedTensor],
    path: Path,
    vocab: Vocab,
    dense: str,
) -> dict[str, Any]:
    """Write ``path`` (a GGUF file); give what was written (architecture, per-type tensor counts, bytes)."""
    blockers = gguf_blockers(plan, getattr(model.config, "model_type", None))
    if blockers:
        raise GGUFExportError(f"plan {plan.hash()[:12]} cannot be written as GGUF: {'; '.join(blockers[:3])}")
    lay = _layout(model, anatomy, plan)
    arch = "llama" if lay.uniform else "deci"
    w = gguf.GGUFWriter(str(path), arch)
    _hparams(w, arch, model.config, anatomy, lay, f"{anatomy.name} (autocompress plan {plan.hash()[:12]})")
    vocab.write(w)
    types: dict[str, int] = {}
    nbytes = 0
    for t in tensors(model, anatomy, plan, dense):
        data = t.data(model, stored)
        w.add_tensor(t.name, data, raw_dtype=t.type)
        types[t.type.name] = types.get(t.type.name, 0) + 1
        nbytes += data.nbytes
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"architecture": arch, "tensor_types": types, "tensor_bytes": nbytes, "file_bytes": path.stat().st_size}


# --- reading back ---------------------------------------------------------------------------


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    """Give every tensor of a GGUF file dequantized by the ``gguf`` package (float32, [rows, cols])."""
    reader = gguf.GGUFReader(path)
    out = {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        out[t.name] = np.asarray(values, dtype=np.float32).reshape([int(x) for x in reversed(t.shape)])
    return out


def read_back_mismatches(path: Path, model: nn.Module, anatomy: ModelAnatomy, plan: Plan, dense: str) -> list[str]:
    """Give the tensors whose values in ``path`` (dequantized by the ``gguf`` package) differ from the
    compressed model's (dense ones compared after rounding to ``dense``); empty when all equal."""
    read = read_tensors(path)
    bad = []
    expected = {t.name: t for t in tensors(model, anatomy, plan, dense)}
    if set(read) != set(expected):
        return [f"tensor names differ: {sorted(set(read) ^ set(expected))[:5]}"]
    for name, t in expected.items():
        want = model.get_parameter(t.source).detach().float()
        if t.format in ("BF16", "F16"):  # a dense tensor rounded to the file's dtype (idempotent on F16 plans)
            want = formats.get(t.format).dequantize(formats.get(t.format).quantize(want))
        got = torch.from_numpy(read[name].copy())
        if t.rows is not None:  # undo the rope row order
            got = got[torch.argsort(t.rows)]
        if got.shape != want.shape or not torch.equal(got, want.reshape(got.shape)):
            diff = (got - want).abs().max().item() if got.shape == want.shape else float("nan")
            bad.append(f"{name} ({t.type.name}): max |diff| {diff:.3g}")
    return bad


# --- one plan to one file ------------------------------------------------------------------


def vocab_for(wb: Any, work: Path, log: Callable[[str], None] | None = None) -> Vocab:
    """Give the tokenizer source of a workbench's model: the byte tokenizer, the GGUF the folder was
    converted from (the bundled model), or llama.cpp's converter run on the HF folder."""
    from autocompress.model.loading import default_gguf_path
    from autocompress.model.tokenizer import ByteTokenizer

    if isinstance(wb.lm.tokenizer, ByteTokenizer):
        return Vocab(byte_tokenizer=wb.lm.tokenizer)
    source = Path(wb.lm.source) if wb.lm.source else None
    marker = source / "autocompress-source.json" if source else None
    if marker is not None and marker.is_file():
        gguf_name = json.loads(marker.read_text()).get("gguf")
        base = default_gguf_path()
        if gguf_name == base.name:
            return Vocab(gguf_file=base)
    if source is None or not source.is_dir():
        raise GGUFExportError(f"model {wb.lm.anatomy.name} has no HF folder to take a tokenizer from")
    return vocab_from_converter(source, work, log)


def export_gguf(
    wb: Any,
    plan: Plan,
    path: str | Path,
    *,
    dense: str | None = None,
    applied: tuple[nn.Module, dict[str, formats.QuantizedTensor]] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write ``plan`` applied to the workbench's model as the GGUF file ``path`` and check it by
    reading it back with the ``gguf`` package (every tensor must equal the plan's weights); give the
    record (architecture, tensor types, bytes, the check). The file appears only when complete.

    Tensors the plan leaves dense are stored in ``dense`` (default: the base model's storage dtype,
    as the HF export; ``"F32"`` keeps them exact, as llama-quantize's input wants). ``applied``: the
    model and stored tensors of an earlier ``wb.apply(plan, stored=...)`` (not applied again)."""
    path = Path(path)
    if plan.recovery is not None:
        raise GGUFExportError("a plan with recovery (distillation) moves weights off their format's grid: no GGUF")
    blockers = gguf_blockers(plan, getattr(wb.lm.model.config, "model_type", None))
    if blockers:
        raise GGUFExportError(f"plan {plan.hash()[:12]} cannot be written as GGUF: {'; '.join(blockers[:3])}")
    model, stored = applied if applied is not None else wb.apply_with_codes(plan)
    dense = dense or dense_type(wb.lm.model)
    if dense not in _STORAGE.values():
        raise GGUFExportError(f"dense tensors are stored as F32, F16 or BF16, not {dense!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
        tmp_file = Path(tmp) / path.name
        info = write_gguf(model, wb.lm.anatomy, plan, stored, tmp_file, vocab_for(wb, Path(tmp), log), dense)
        bad = read_back_mismatches(tmp_file, model, wb.lm.anatomy, plan, dense)
        if bad:
            raise GGUFExportError(f"GGUF read-back differs from the plan's weights: {'; '.join(bad[:3])}")
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp_file, 0o666 & ~mask)
        os.replace(tmp_file, path)
    return {**info, "read_back_equal": True, "dense_dtype": dense, "plan_hash": plan.hash()}


# --- llama.cpp's own verdict -----------------------------------------------------------------

PPL_CTX = 256  # llama-perplexity chunk length for the export check (the research runs' setting)
PPL_CHUNKS = 16  # chunks scored: 16 x 128 predicted tokens
PROMPT = "The capital of France is"


def check_with_llamacpp(
    path: Path, model: nn.Module, text: str, *, ctx: int = PPL_CTX, chunks: int = PPL_CHUNKS, threads: int = 2
) -> dict[str, Any]:
    """Give llama.cpp's verdict on a GGUF file: it loads and generates, and its perplexity on ``text``
    beside our model's on the same tokens (llama.cpp's own tokenization) scored the same way.

    The two perplexities differ by llama.cpp's arithmetic: its CPU kernels round each activation
    block to 8 bits before a quantized dot product (Q8_0 / Q8_K), and accumulate in another order.
    """
    from autocompress.evaluate.metrics import chunked_perplexity
    from autocompress.runtime import llamacpp

    with tempfile.TemporaryDirectory(prefix="autocompress-gguf-") as tmp:
        text_file = Path(tmp) / "held-out.txt"
        text_file.write_text(text)
        out = llamacpp.generate(path, PROMPT, tokens=16)
        ids = llamacpp.tokenize(path, text_file)
        n = min(chunks, len(ids) // ctx - 1)  # one chunk spare: see llamacpp.perplexity
        if n < 1:
            raise GGUFExportError(f"the held-out text gives {len(ids)} tokens, fewer than two {ctx}-token chunks")
        ppl_llama = llamacpp.perplexity(path, text_file, ctx=ctx, chunks=n, threads=threads)
    reader = gguf.GGUFReader(path)
    add_bos = reader.fields.get("tokenizer.ggml.add_bos_token")
    bos = reader.fields.get("tokenizer.ggml.bos_token_id")
    bos_id = int(bos.contents()) if bos is not None and add_bos is not None and add_bos.contents() else None
    if bos_id is not None:  # llama-perplexity tokenizes with the vocabulary's BOS in front
        ids = [bos_id, *ids]
    model.eval()
    ppl_ours = chunked_perplexity(model, torch.tensor(ids[: n * ctx]), ctx, bos_id)
    return {
        "generates": bool(out.strip()),
        "generated": out.strip()[-200:],
        "ppl_llamacpp": ppl_llama,
        "ppl_ours": ppl_ours,
        "ppl_rel_diff": ppl_llama / ppl_ours - 1,
        "ppl_tokens": n * (ctx - 1 - ctx // 2),
        "ctx": ctx,
    }
