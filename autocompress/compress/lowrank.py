"""Low-rank factorization by plain SVD: W [out, in] ≈ B [out, r] @ A [r, in], as two plain nn.Linear layers.

The SVD is computed in float64 (stored in float32) and the singular vectors get a fixed sign (the largest-magnitude
entry of each left vector is positive), so factors are reproducible bit for bit on one machine
and do not depend on the LAPACK's sign choice. sqrt(S) goes to both factors, which keeps their
ranges balanced for later quantization.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


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


def svd_factorize(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Give (A [rank, in], B [out, rank]) with W ≈ B @ A (Eckart–Young optimal in Frobenius norm)."""
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
    """Give the two-linear replacement of a layer with weight [out, in] at the given rank."""
    A, B = svd_factorize(weight, rank)
    return factorized_module(A, B, bias)
