"""Round-to-nearest (RTN) weight quantization, simulated: the result is the dequantized fp32 weight.

Grids (chosen so every grid holds 0 exactly, so pruned zeros survive quantization, and so the
grid is what int4/int8 runtimes store: an integer code, an fp16 scale and, if asymmetric, an
integer zero point, as in GPTQ/AWQ checkpoints and onnxruntime ``MatMulNBits``):

- symmetric: scale = max|w| / (2^(b-1) - 1), codes -(2^(b-1) - 1) .. 2^(b-1) - 1 (the "restricted"
  range: one level unused, but the grid is symmetric and -max|w| is exact).
- asymmetric: the range [min(w, 0), max(w, 0)] is split into 2^b - 1 steps, the zero point is the
  integer code of 0 (rounded), codes 0 .. 2^b - 1.

Both give a max error of scale/2 per group. Groups run along the input dimension; when the input
size is not a multiple of the group size the last group is partial (576 = 4×128 + 64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FULL_PRECISION_BITS = 16


def rtn_scales(weight: torch.Tensor, bits: int, group_size: int | None, symmetric: bool) -> torch.Tensor:
    """Give the per-group scale [out, num_groups] that ``rtn_quantize`` uses (for error bounds and storage)."""
    groups, _ = _grouped(weight.float(), group_size)
    return _scale_zero(groups, bits, symmetric)[0].squeeze(-1)


def rtn_quantize(
    weight: torch.Tensor, bits: int, group_size: int | None = None, symmetric: bool = True
) -> torch.Tensor:
    """Give the RTN-quantized-then-dequantized fp32 weight [out, in]; bits 16 gives ``weight`` itself.

    ``group_size`` None means one scale per output row; a group size above the input size is
    clamped to it. All-zero groups stay zero (no NaN).
    """
    if bits >= FULL_PRECISION_BITS:
        return weight
    if weight.dim() != 2:
        raise ValueError(f"rtn_quantize expects a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    if not 1 <= bits < FULL_PRECISION_BITS:
        raise ValueError(f"bits must be in 1..15 for quantization, got {bits}")
    groups, in_features = _grouped(weight.float(), group_size)
    scale, zero = _scale_zero(groups, bits, symmetric)
    deq = fake_quantize(groups, scale, zero, bits).reshape(weight.shape[0], -1)
    return deq if deq.shape[1] == in_features else deq[:, :in_features].contiguous()


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Give x rounded onto the grid (scale, zero point; ``zero`` None = symmetric), dequantized.

    The one rounding rule shared by RTN and GPTQ, so GPTQ without error feedback is RTN bit for bit.
    """
    # in-place chain on one fresh tensor: this runs on every weight of the model, once per new choice
    codes = torch.div(x, scale).round_()
    if zero is None:
        qmax = 2 ** (bits - 1) - 1
        return codes.clamp_(-qmax, qmax).mul_(scale)
    return codes.add_(zero).clamp_(0, 2**bits - 1).sub_(zero).mul_(scale)


def grid_of(groups: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Give (scale, zero point or None) over the last dim of ``groups`` [..., group], keepdim."""
    return _scale_zero(groups, bits, symmetric)


def _grouped(w: torch.Tensor, group_size: int | None) -> tuple[torch.Tensor, int]:
    """Give w as [out, num_groups, group] (zero-padded: zeros never change a group's grid) and the in size."""
    out_features, in_features = w.shape
    gs = in_features if group_size is None else max(1, min(int(group_size), in_features))
    pad = (-in_features) % gs
    if pad:
        w = F.pad(w, (0, pad))
    return w.reshape(out_features, -1, gs), in_features


def _scale_zero(groups: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    if symmetric:
        scale = groups.abs().amax(dim=-1, keepdim=True) / (2 ** (bits - 1) - 1)
        zero = None
    else:
        lo = groups.amin(dim=-1, keepdim=True).clamp(max=0.0)
        hi = groups.amax(dim=-1, keepdim=True).clamp(min=0.0)
        scale = (hi - lo) / (2**bits - 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero group: any scale keeps it zero
    if not symmetric:
        zero = torch.round(-lo / scale)
    return scale, zero
