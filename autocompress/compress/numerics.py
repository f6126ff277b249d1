"""Runtime numerics: what a deployment runtime does to activations that our simulated model does not.

Our compressed model rounds weights onto the plan's grid and computes in fp32. A runtime's fast
quantized kernels may also round the *activations* entering those layers, which changes the
model's outputs — on SmolLM2 more than the 8-bit weight rounding itself (``bench/onnx_rounding.py``).
A hardware profile names its runtime's numerics (``HardwareProfile.numerics``); the search evaluates
plans with that rounding emulated, so the quality it reports is (closer to) the deployed one:

- ``exact``: no activation rounding (weight-only kernels computing in fp16/fp32: TensorRT-LLM,
  MLC, torchao weight-only, ...). Nothing is emulated.
- ``onnxruntime-cpu``: what ``autocompress export`` deploys to. ``MatMulNBits`` at accuracy level 4
  rounds its input to int8 per block of the weight's K blocks (symmetric: codes round(x · 127 /
  max|x|), half to even, times max|x| / 127 — MLAS's QuantizeARow); dynamic int8 (W8A8 layers)
  rounds the whole input tensor onto a uint8 grid with a zero point. The plan's own per-token
  rounding of a8 layers is exported as fp32 ops and runs first, as here. Each layer alone matches onnxruntime to float rounding, and the tiny test
  models do end to end. On SmolLM2 rounding-boundary flips compound over 30 blocks, so single
  positions drift, but the quality loss is reproduced (``bench/onnx_rounding.py``, KL to the base
  model, deployed / emulated / unemulated: 8-bit 0.0066 / 0.0065 / 0.0025, W8A8 0.51 / 0.53 / 0.033,
  4-bit 0.55 / 0.57 / 0.54).
- ``llama.cpp-cpu``: llama.cpp's CPU backend (the vendored llama.cpp 0c1e57098bba, x86 with AVX2 /
  AVX-512; ``ggml/src/ggml-cpu``). Before a matmul with a weight of type T it converts the input to
  T's ``vec_dot_type`` (``type_traits_cpu`` in ``ggml-cpu.c``; the llamafile sgemm, repack and AMX
  paths convert the same way): Q8_0 for Q4_0 / Q5_0 / Q8_0 / IQ4_NL (``quantize_row_q8_0``, x86:
  blocks of 32, codes round-half-even(x · (127 / max|x|)), scale stored as fp16(max|x| / 127)); Q8_1
  for Q4_1 / Q5_1 (the same codes and scale, plus a block sum in fp16 for the weight's offset term,
  which is not emulated); Q8_K for the K-quants (``quantize_row_q8_K_ref``: blocks of 256, codes
  round-half-even(x · 127 / max|x|), scale 1 / (127 / max|x|) in fp32); fp16 / bf16 for F16 / BF16
  weights, fp32 untouched. That covers every block linear and the output head (the token embedding's
  table when tied). Attention reads K and V from llama.cpp's default F16 cache: rounded to fp16 too
  (``KV_CACHE``); the prompt's flash attention otherwise computes in fp32. Not emulated: F16 weights
  on AMX machines (llama.cpp's AMX buffer keeps their input in fp32).
  llama.cpp's CUDA backend rounds otherwise: MMQ / MMVQ quantize every quantized type's input to q8_1
  in blocks of 32 (K-quants included) with roundf(x / d), ties away from zero, and F16 / BF16 weights
  run through cuBLAS in fp16. That is not emulated (no CUDA build here to check it against), so the
  CUDA llama.cpp profiles (Jetsons, T4) keep ``exact`` rather than borrow the CPU rounding, whose
  256-blocks would overstate the K-quants' activation error there.

Emulation is forward pre-hooks only: the weights — and so ``apply``'s bit-identical output — are
untouched, and ``emulated`` removes the hooks again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autocompress.model.anatomy import ModelAnatomy
from autocompress.plan import Plan

NUMERICS = ("exact", "onnxruntime-cpu", "llama.cpp-cpu")
VERSION = 4  # bump when an emulation changes: it keys cached evaluations
INT8_MAX = 127

# ggml-cpu.c type_traits_cpu[type].vec_dot_type: what llama.cpp's CPU kernels convert a matmul's input to
VEC_DOT_TYPE = {
    **dict.fromkeys(("Q4_0", "Q5_0", "Q8_0", "IQ4_NL", "MXFP4"), "Q8_0"),
    **dict.fromkeys(("Q4_1", "Q5_1"), "Q8_1"),
    **dict.fromkeys(("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS", "IQ3_S", "IQ2_S", "TQ1_0", "TQ2_0"), "Q8_K"),
    "F16": "F16",
    "BF16": "BF16",
    "F32": "F32",
}


def numerics_tag(numerics: str) -> str:
    """Give the suffix that keys cached results evaluated under ``numerics`` ("" for exact)."""
    return "" if numerics == "exact" else f"-{numerics}-v{VERSION}"


def round_per_block(x: torch.Tensor, block: int) -> torch.Tensor:
    """Give ``x`` rounded to int8 per block of ``block`` along its last dim (symmetric, max|x| / 127)."""
    k = x.shape[-1]
    pad = (-k) % block
    xp = torch.nn.functional.pad(x, (0, pad)) if pad else x
    g = xp.reshape(*xp.shape[:-1], -1, block)
    amax = g.detach().abs().amax(-1, keepdim=True)
    inverse = torch.where(amax > 0, INT8_MAX / amax, torch.zeros_like(amax))  # as MLAS: multiply, then round
    out = (torch.round(g * inverse) * (amax / INT8_MAX)).reshape(xp.shape)
    return out[..., :k] if pad else out


def round_per_tensor_uint8(x: torch.Tensor) -> torch.Tensor:
    """Give ``x`` rounded as onnxruntime's DynamicQuantizeLinear does: one uint8 grid with a zero point."""
    lo = torch.clamp(x.detach().amin(), max=0.0)
    hi = torch.clamp(x.detach().amax(), min=0.0)
    scale = (hi - lo) / 255
    if scale <= 0:
        return x
    zero = torch.clamp(torch.round(-lo / scale), 0, 255)
    return (torch.clamp(torch.round(x / scale) + zero, 0, 255) - zero) * scale


def _divide(numerator: float, t: torch.Tensor) -> torch.Tensor:
    """Give numerator / t correctly rounded, as C's float division (``number / tensor`` in torch
    multiplies by the reciprocal: two roundings)."""
    return torch.full_like(t, numerator) / t


def round_q8_0(x: torch.Tensor) -> torch.Tensor:
    """Give ``x`` as llama.cpp's x86 ``quantize_row_q8_0`` leaves it (Q8_0 / Q8_1 activations): per block of
    32 along the last dim, codes round-half-even(x · (127 / max|x|)) times the fp16-stored max|x| / 127."""
    g = x.reshape(*x.shape[:-1], -1, 32)
    amax = g.detach().abs().amax(-1, keepdim=True)
    inverse = torch.where(amax > 0, _divide(INT8_MAX, amax), torch.zeros_like(amax))
    scale = (amax / INT8_MAX).to(torch.float16).to(x.dtype)
    return (torch.round(g * inverse) * scale).reshape(x.shape)


def round_q8_k(x: torch.Tensor) -> torch.Tensor:
    """Give ``x`` as llama.cpp's ``quantize_row_q8_K_ref`` leaves it (K-quant activations): per block of 256
    along the last dim, codes round-half-even(x · (127 / max|x|)) times 1 / (127 / max|x|), all in fp32.
    (llama.cpp divides by the signed extreme and flips the codes' sign; the values are the same.)"""
    g = x.reshape(*x.shape[:-1], -1, 256)
    amax = g.detach().abs().amax(-1, keepdim=True)
    iscale = torch.where(amax > 0, _divide(INT8_MAX, amax), torch.zeros_like(amax))
    scale = torch.where(amax > 0, _divide(1, iscale), torch.zeros_like(iscale))
    return (torch.round(g * iscale).clamp(max=INT8_MAX) * scale).reshape(x.shape)


def round_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Give ``x`` rounded to ``dtype`` (round to nearest even) and back: llama.cpp's F16 / BF16 conversions."""
    return x.to(dtype).to(x.dtype)


ROUND_AS = {
    "Q8_0": round_q8_0,
    "Q8_1": round_q8_0,  # the same codes and scale; only the weight-offset term differs (fp16 block sum)
    "Q8_K": round_q8_k,
    "F16": lambda x: round_to(x, torch.float16),
    "BF16": lambda x: round_to(x, torch.bfloat16),
}


def _hook(round_fn, *args: int):
    def hook(_module: nn.Module, inputs: tuple) -> tuple:
        return (round_fn(inputs[0], *args), *inputs[1:])

    return hook


def attach(model: nn.Module, anatomy: ModelAnatomy, plan: Plan, numerics: str) -> list[Any]:
    """Make ``model`` (``plan`` applied to it) compute as ``numerics``' runtime does; give the hook handles."""
    if numerics not in NUMERICS:
        raise ValueError(f"numerics must be one of {list(NUMERICS)}, got {numerics!r}")
    if numerics == "exact":
        return []
    if numerics == "llama.cpp-cpu":
        return attach_llamacpp(model, anatomy, plan, kv_cache=KV_CACHE)
    from autocompress.export.onnx import _renamed, nbits_layout, target_format

    handles = []
    path_of = _renamed(anatomy, plan)
    for site in anatomy.linears:
        if site.name not in path_of:  # a dropped block
            continue
        fmt, _ = target_format(plan.choice_for(site.name))
        if fmt == "fp32":
            continue
        owner = model.get_submodule(path_of[site.name])
        for mod in [m for m in owner.modules() if isinstance(m, nn.Linear)]:  # low-rank: both factors
            if fmt == "int8-dynamic":
                handles.append(mod.register_forward_pre_hook(_hook(round_per_tensor_uint8)))
            else:
                handles.append(mod.register_forward_pre_hook(_hook(round_per_block, nbits_layout(fmt)[1])))
    return handles


# emulate llama.cpp's F16 KV cache too (V exactly; K rounded before rope, llama.cpp rounds after it: the
# same size of error). On a bf16-exact tiny model it takes a third off our gap to llama.cpp's
# log-probabilities, as much as the matmul rounding (tests/compress/test_numerics.py).
KV_CACHE = True


def gguf_type(choice: Any, dense: str) -> str | None:
    """Give the GGUF type a plan choice is stored as (``dense``: the base's BF16 / F16 / F32 for an
    unquantized tensor), or None for a format llama.cpp does not run."""
    fmt = choice.fmt
    if fmt is None:
        return dense
    return None if fmt.gguf_type is None else fmt.gguf_type.name


def _output_hook(round_fn):
    def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return round_fn(output)

    return hook


def attach_llamacpp(
    model: nn.Module, anatomy: ModelAnatomy, plan: Plan, *, head: bool = True, kv_cache: bool = False
) -> list[Any]:
    """Round every matmul input of ``model`` (``plan`` applied) as llama.cpp's CPU kernels do; give the
    hook handles. ``head``: the output head too; ``kv_cache``: also K and V to fp16 (llama.cpp's F16
    cache; rounded here before rope, so only close for K)."""
    from autocompress.export.hf import storage_dtype
    from autocompress.export.onnx import _renamed

    dense = {torch.float16: "F16", torch.float32: "F32"}.get(storage_dtype(model), "BF16")
    handles = []

    def round_input(mod: nn.Module, stored: str | None) -> None:
        round_fn = ROUND_AS.get(VEC_DOT_TYPE.get(stored or "F32", "F32"))
        if round_fn is not None:
            handles.append(mod.register_forward_pre_hook(_hook(round_fn)))

    path_of = _renamed(anatomy, plan)
    for site in anatomy.linears:
        if site.name not in path_of:  # a dropped block
            continue
        owner = model.get_submodule(path_of[site.name])
        stored = gguf_type(plan.choice_for(site.name), dense)
        for mod in [m for m in owner.modules() if isinstance(m, nn.Linear)]:
            round_input(mod, stored)
            if kv_cache and site.role in ("k", "v"):
                handles.append(mod.register_forward_hook(_output_hook(ROUND_AS["F16"])))
    out_head = model.get_output_embeddings()
    if head and out_head is not None:
        # an untied head has its own entry; a tied one is the embedding's table (and choice)
        site = next((e for e in anatomy.embeddings if e.role == "head"), None)
        site = site or next((e for e in anatomy.embeddings if e.role == "embed" and e.tied), None)
        if site is not None:
            round_input(out_head, gguf_type(plan.embedding_choice(site.name), dense))
    return handles


def llamacpp_logprobs(path: Path, text_file: Path, *, ctx: int, chunks: int, threads: int = 2) -> tuple[Any, Any]:
    """Give what the emulation is checked against: the tokens llama-perplexity scored on a GGUF file
    ([chunks, ctx] int32) and its log-probabilities of every vocabulary entry at the scored positions
    ([chunks, ctx - 1 - ctx // 2, vocab] float32), read from its ``--kl-divergence-base`` file
    (perplexity.cpp: "_logits_", n_ctx, n_vocab, n_chunk, the tokens, then per position a float scale and
    minimum and one uint16 code per entry: log p = minimum + scale * code, steps of at most 16 / 65535)."""
    import numpy as np

    from autocompress.runtime import llamacpp

    out = Path(path).with_suffix(".kld")
    args = ["-m", path, "-f", text_file, "-c", ctx, "-b", ctx, "-t", threads, "--chunks", chunks]
    llamacpp.require().run("llama-perplexity", [*args, "--kl-divergence-base", out])
    raw = np.fromfile(out, dtype=np.uint8)
    out.unlink()
    if raw[:8].tobytes() != b"_logits_":
        raise llamacpp.LlamaCppError(f"{out.name} is not a llama-perplexity logits file")
    n_ctx, n_vocab, n_chunk = (int(v) for v in raw[8:20].view(np.int32))
    end = 20 + 4 * n_ctx * n_chunk
    tokens = raw[20:end].view(np.int32).reshape(n_chunk, n_ctx)
    nv = 2 * ((n_vocab + 1) // 2) + 4
    body = raw[end:].view(np.uint16).reshape(n_chunk, n_ctx - 1 - n_ctx // 2, nv)
    head = body[..., :4].copy().view(np.float32)  # scale, minimum
    return tokens, head[..., 1:2] + head[..., 0:1] * body[..., 4 : 4 + n_vocab].astype(np.float32)


@contextlib.contextmanager
def emulated(model: nn.Module, anatomy: ModelAnatomy, plan: Plan, numerics: str) -> Iterator[nn.Module]:
    """Run the body with ``model`` (``plan`` applied to it) computing as ``numerics``' runtime does."""
    handles = attach(model, anatomy, plan, numerics)
    try:
        yield model
    finally:
        for h in handles:
            h.remove()
