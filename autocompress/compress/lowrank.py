"""Low-rank factorization W [out, in] ≈ B [out, r] @ A [r, in], as two plain nn.Linear layers.

Three ways to choose the factors (``LayerChoice.lowrank_method``):

- ``svd``: plain truncated SVD of W (best in ‖W − BA‖_F, blind to the inputs);
- ``asvd`` (Yuan et al. 2023): SVD of W·diag(s), s_j = rms(x_j)^0.5 from the input norms, then
  A ← A·diag(1/s): input channels that carry more signal are kept more faithfully;
- ``svd-llm`` (Wang et al. 2024): SVD of W·L with L the Cholesky factor of the (damped) calibration
  Hessian XXᵀ, then A ← A·L⁻¹. This truncation is optimal for the output error ‖WX − BAX‖_F.

All three are stored as an ``SVD`` whose ``Vh`` already carries the inverse scaling, so any rank
is a slice of one cached decomposition.

The SVD is computed in float64 (stored in float32) and the singular vectors get a fixed sign (the largest-magnitude
entry of each left vector is positive), so factors are reproducible bit for bit on one machine
and do not depend on the LAPACK's sign choice. sqrt(S) goes to both factors, which keeps their
ranges balanced for later quantization.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from autocompress.errors import PlanError


@dataclass(frozen=True)
class SVD:
    """A thin SVD W = U diag(S) Vh (computed in float64, kept in float32), with the sign convention above."""

    U: torch.Tensor  # [out, k]
    S: torch.Tensor  # [k], descending
    Vh: torch.Tensor  # [k, in]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.U, self.S, self.Vh))


def svd_of(weight: torch.Tensor) -> SVD:
    """Give the thin SVD of an [out, in] weight with deterministic signs."""
    U, S, Vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    pivot = U.abs().argmax(dim=0)
    sign = torch.sign(U.gather(0, pivot.unsqueeze(0)).squeeze(0))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    # kept in float32: half the cache memory, and factors built from a cached SVD equal fresh ones bit for bit
    return SVD((U * sign).float(), S.float(), (Vh * sign.unsqueeze(1)).float())


def factors_from_svd(svd: SVD, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Give fp32 (A [rank, in], B [out, rank]) with B @ A the best rank-``rank`` approximation."""
    rank = max(1, min(int(rank), svd.S.numel()))
    root = svd.S[:rank].sqrt()
    A = (root.unsqueeze(1) * svd.Vh[:rank]).contiguous()
    B = (svd.U[:, :rank] * root).contiguous()
    return A, B


ASVD_ALPHA = 0.5
WHITEN_DAMP = 0.01  # fraction of the mean Hessian diagonal added before the Cholesky factorization


def asvd_of(weight: torch.Tensor, input_sq_norm: torch.Tensor) -> SVD:
    """Give the activation-scaled SVD of an [out, in] weight (``Vh`` holds the 1/s unscaling)."""
    s = input_sq_norm.double().clamp(min=0.0).sqrt()
    s = (s / s.mean().clamp(min=1e-30)).clamp(min=1e-6).pow(ASVD_ALPHA)
    svd = svd_of(weight.detach().double() * s.unsqueeze(0))
    return SVD(svd.U, svd.S, (svd.Vh.double() / s.unsqueeze(0)).float())


def whitened_svd_of(weight: torch.Tensor, hessian: torch.Tensor, damp: float = WHITEN_DAMP) -> SVD:
    """Give the SVD-LLM decomposition: SVD of W·L (H = L·Lᵀ damped), ``Vh`` holding L⁻¹."""
    H = hessian.double().clone()
    diag = H.diagonal()
    diag[diag <= 0] = 1.0
    diag.add_(damp * diag.mean())
    L = torch.linalg.cholesky(H)
    svd = svd_of(weight.detach().double() @ L)
    # Vh·L⁻¹ by a triangular solve: X·L = Vh  ⇔  Lᵀ·Xᵀ = Vhᵀ
    vh = torch.linalg.solve_triangular(L.t(), svd.Vh.double().t(), upper=True).t()
    return SVD(svd.U, svd.S, vh.float().contiguous())


def break_even_rank(out_features: int, in_features: int) -> float:
    """Give r* = m·n/(m+n): at a higher rank the two factors hold more numbers than the dense layer."""
    return out_features * in_features / (out_features + in_features)


def check_rank(out_features: int, in_features: int, rank: int) -> None:
    """Raise ``PlanError`` for a rank above break-even (the factorization would cost more than W)."""
    r_star = break_even_rank(out_features, in_features)
    if rank > r_star:
        raise PlanError(
            f"rank {rank} is above the break-even rank r* = {r_star:.1f} of a {out_features}×{in_features} layer: "
            "two factors would store more than the dense weight; use a rank ≤ r* (rank_ratio ≤ 1)"
        )


def svd_factorize(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Give (A [rank, in], B [out, rank]) with W ≈ B @ A (Eckart–Young optimal); ranks above r* are refused."""
    check_rank(*weight.shape, rank)
    return factors_from_svd(svd_of(weight), rank)


def factorized_module(A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None) -> nn.Sequential:
    """Give nn.Sequential(Linear(in, r, bias=False), Linear(r, out)) holding the factors (plain torch state)."""
    rank, in_features = A.shape
    # built on "meta" so no random init is wasted; every parameter is then set from the factors
    first = nn.Linear(in_features, rank, bias=False, device="meta")
    second = nn.Linear(rank, B.shape[0], bias=bias is not None, device="meta")
    first.weight = nn.Parameter(A)
    second.weight = nn.Parameter(B)
    if bias is not None:
        second.bias = nn.Parameter(bias.detach().clone().to(B.dtype))
    return nn.Sequential(first, second)


def factorized_linear(weight: torch.Tensor, bias: torch.Tensor | None, rank: int) -> nn.Sequential:
    """Give the two-linear replacement of a layer with weight [out, in] at the given rank (≤ r*)."""
    A, B = svd_factorize(weight, rank)
    return factorized_module(A, B, bias)
