"""GPTQ (Frantar et al. 2022): quantize one column at a time, pushing each column's rounding error
onto the columns not yet quantized through the inverse calibration Hessian.

One-shot: every layer's Hessian comes from the uncompressed model. The grid and the rounding rule
are RTN's (``quantize.fake_quantize``), each group's scale taken from the group's current
(error-updated) weights when the loop reaches it, so with a diagonal Hessian (no error feedback)
GPTQ returns exactly ``rtn_quantize``. With ``act_order`` columns go in order of decreasing
Hessian diagonal and the group grids are fixed up front from the original weights ("static
groups"), so the stored format stays plain grouped integers. With a keep-``mask`` (pruning before
quantization) pruned weights are quantized to exactly 0 and their removal error is compensated
too, as in SparseGPT.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from autocompress.compress.quantize import FULL_PRECISION_BITS, fake_quantize, grid_of
from autocompress.errors import PlanError

DAMP = 0.01  # fraction of the mean Hessian diagonal added to it (the GPTQ paper's default)
BLOCK = 128  # columns per lazy batch update


@dataclass(frozen=True)
class GPTQSettings:
    """How plans with quant_method gptq / gptq-imatrix are applied (an argument of ``apply_plan_to``, part of its
    cache keys; ``kwargs()`` are ``autocompress.formats.gptq_quantize``'s keywords).

    The default is what every plan is applied with. act-order measured on SmolLM2-135M, g128: ppl
    29.7 → 23.9 at 4-bit sym, 85.7 → 52.5 at 3-bit asym.
    """

    damp: float = DAMP
    act_order: bool = True

    def kwargs(self) -> dict[str, float | bool]:
        """Give the settings as keywords of ``formats.gptq_quantize`` (the grid's importance is
        the caller's: the Hessian's diagonal, see ``key``)."""
        return {"damp": self.damp, "act_order": self.act_order}

    def key(self) -> tuple:
        """Give what tells apart the weights these settings give (a cache key part)."""
        return tuple(sorted(self.kwargs().items()))


PLAN_SETTINGS = GPTQSettings()


def inverse_hessian_factor(hessian: torch.Tensor, damp: float = DAMP) -> tuple[torch.Tensor, torch.Tensor]:
    """Give (upper Cholesky factor of H⁻¹ in float32, the dead-input mask) for a damped Hessian."""
    H = hessian.double().clone()
    diag = H.diagonal()
    dead = diag <= 0
    diag[dead] = 1.0  # an input that is always 0: any weight is as good; no error flows through it
    diag.add_(damp * diag.mean())
    try:
        L = torch.linalg.cholesky(H)
    except RuntimeError:
        raise PlanError("the calibration Hessian is not positive definite even after dampening") from None
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).float(), dead


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int | None = None,
    symmetric: bool = True,
    *,
    mask: torch.Tensor | None = None,
    act_order: bool = False,
    damp: float = DAMP,
) -> torch.Tensor:
    """Give the GPTQ-quantized-then-dequantized fp32 weight [out, in] (``weight`` is not modified)."""
    if bits >= FULL_PRECISION_BITS:
        return weight
    in_f = weight.shape[1]
    if hessian.shape != (in_f, in_f):
        raise PlanError(f"Hessian has shape {tuple(hessian.shape)}, the weight has {in_f} inputs")
    W = weight.detach().float().clone()
    if mask is not None:
        W.masked_fill_(~mask, 0.0)
    gs = in_f if group_size is None else max(1, min(int(group_size), in_f))
    perm = None
    static: list[tuple[torch.Tensor, torch.Tensor | None]] | None = None
    if act_order:
        static = [_grid(W[:, s : s + gs], bits, symmetric) for s in range(0, in_f, gs)]
        perm = torch.argsort(-hessian.diagonal().double(), stable=True)
        W = W[:, perm].contiguous()
        mask = mask[:, perm] if mask is not None else None
        hessian = hessian[perm][:, perm]
    Hinv, _ = inverse_hessian_factor(hessian, damp)
    Q = torch.empty_like(W)
    grid = None
    for b0 in range(0, in_f, BLOCK):
        b1 = min(b0 + BLOCK, in_f)
        Wb, Hb = W[:, b0:b1], Hinv[b0:b1, b0:b1]
        Err = torch.empty_like(Wb)
        for j in range(b1 - b0):
            i = b0 + j
            col = int(perm[i]) if perm is not None else i
            if static is not None:
                grid = static[col // gs]
            elif col % gs == 0:
                grid = _grid(
                    W[:, col : col + gs], bits, symmetric, mask[:, col : col + gs] if mask is not None else None
                )
            scale, zero = grid
            w = Wb[:, j]
            q = fake_quantize(w.clone(), scale[:, 0, 0], None if zero is None else zero[:, 0, 0], bits)
            if mask is not None:
                q.masked_fill_(~mask[:, i], 0.0)
            Q[:, i] = q
            err = (w - q) / Hb[j, j]
            Wb[:, j:].sub_(err.unsqueeze(1) * Hb[j, j:].unsqueeze(0))
            Err[:, j] = err
        W[:, b1:].sub_(Err @ Hinv[b0:b1, b1:])
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return Q


def _grid(
    cols: torch.Tensor, bits: int, symmetric: bool, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Give (scale, zero) [out, 1, 1] of one group of columns, as RTN computes it (pruned entries count as 0)."""
    if mask is not None:
        cols = cols.masked_fill(~mask, 0.0)
    return grid_of(cols.unsqueeze(1), bits, symmetric)
