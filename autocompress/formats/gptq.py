"""GPTQ (Frantar et al. 2022) on a format's own grid: the codes a runtime stores, error-compensated.

The grid (every scale, min and sub-block scale the format stores) is fitted first, from the original
weights (pruned entries as 0), by the format's reference quantizer, and then held fixed; only the
codes are chosen by GPTQ, column by column, pushing each column's rounding error onto the columns
not yet quantized through the upper Cholesky factor of the damped inverse Hessian, with lazy batch
updates of ``block`` columns. With ``act_order`` the columns go in order of decreasing Hessian
diagonal; the grid stays indexed by original column, so the stored tensor is the plain format.
With a keep-``mask`` (pruning before quantization), a pruned weight takes the level nearest 0, which
is exactly 0 on every grid that holds 0 (Q4_0, Q5_0, Q8_0, Q3_K, Q6_K, the symmetric and asymmetric
generic grids, MLC); on grids without an exact 0 (IQ4_NL's levels are ±1·d and -10·d around 0; the
affine Q4_1/Q5_1/K-quants with a min generally) it is the nearest representable value, and its
removal error is compensated like any other rounding error.
"""

from __future__ import annotations

import torch

from autocompress.formats.base import Format, FormatError, QuantizedTensor, as_weight


def _inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Give the upper Cholesky factor of the damped H⁻¹ (float32); dead inputs get a unit diagonal."""
    H = hessian.double().clone()
    diag = H.diagonal()
    diag[diag <= 0] = 1.0
    diag.add_(damp * diag.mean())
    try:
        L = torch.linalg.cholesky(H)
    except RuntimeError:
        raise FormatError("the calibration Hessian is not positive definite even after dampening") from None
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).float()


def gptq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor,
    fmt: Format,
    *,
    importance: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    act_order: bool = True,
    damp: float = 0.01,
    block: int = 128,
) -> QuantizedTensor:
    """Give w [out, in] stored in ``fmt`` with GPTQ-chosen codes on the format's reference grid."""
    W = as_weight(w).clone()
    out, in_f = W.shape
    if mask is not None:
        W.masked_fill_(~mask.bool(), 0.0)
    if fmt.is_float:
        return fmt.quantize(W)
    if hessian.shape != (in_f, in_f):
        raise FormatError(f"Hessian has shape {tuple(hessian.shape)}, the weight has {in_f} inputs")
    grid = fmt.fit_grid(W, importance)
    perm = torch.argsort(-hessian.diagonal().double(), stable=True) if act_order else torch.arange(in_f)
    H = hessian[perm][:, perm]
    Hinv = _inverse_hessian_factor(H, damp)
    W = W[:, perm].contiguous()
    keep = None if mask is None else mask.bool()[:, perm]
    codes = torch.empty(out, in_f, dtype=torch.long)
    zeros = torch.zeros(out, 1)
    for b0 in range(0, in_f, block):
        b1 = min(b0 + block, in_f)
        Wb = W[:, b0:b1]
        Hb = Hinv[b0:b1, b0:b1]
        Err = torch.empty_like(Wb)
        for j in range(b1 - b0):
            col = int(perm[b0 + j])
            idx, q = grid.round(Wb[:, j : j + 1], col)
            if keep is not None and not bool(keep[:, b0 + j].all()):
                zi, zq = grid.round(zeros, col)
                drop = ~keep[:, b0 + j : b0 + j + 1]
                idx, q = torch.where(drop, zi, idx), torch.where(drop, zq, q)
            codes[:, col] = idx[:, 0]
            err = (Wb[:, j] - q[:, 0]) / Hb[j, j]
            Wb[:, j:].sub_(err.unsqueeze(1) * Hb[j, j:].unsqueeze(0))
            Err[:, j] = err
        W[:, b1:].sub_(Err @ Hinv[b0:b1, b1:])
    return fmt.from_codes(grid, codes)
