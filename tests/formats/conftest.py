"""Test tensors for the format tests: Gaussian weights with an outlier and an all-zero block."""

from __future__ import annotations

import torch


def weight(out: int, in_f: int, seed: int = 0) -> torch.Tensor:
    """Give a Gaussian [out, in] weight (std 0.02) with one large outlier and one all-zero 256-block."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, in_f, generator=g) * 0.02
    w[0, 5] = 0.5
    w[min(1, out - 1), : min(256, in_f)] = 0.0
    return w


def skewed_importance(in_f: int, seed: int = 1) -> torch.Tensor:
    """Give an imatrix-like Σx² per input: a few inputs matter 100x more than the rest."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(in_f, generator=g) ** 8 * 100 + 0.01
