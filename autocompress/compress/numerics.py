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

Emulation is forward pre-hooks only: the weights — and so ``apply``'s bit-identical output — are
untouched, and ``emulated`` removes the hooks again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from autocompress.model.anatomy import ModelAnatomy
from autocompress.plan import Plan

NUMERICS = ("exact", "onnxruntime-cpu")
VERSION = 2  # bump when an emulation changes: it keys cached evaluations
INT8_MAX = 127


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


@contextlib.contextmanager
def emulated(model: nn.Module, anatomy: ModelAnatomy, plan: Plan, numerics: str) -> Iterator[nn.Module]:
    """Run the body with ``model`` (``plan`` applied to it) computing as ``numerics``' runtime does."""
    handles = attach(model, anatomy, plan, numerics)
    try:
        yield model
    finally:
        for h in handles:
            h.remove()
