"""One contract every weight technique must meet: declared shape, deterministic, inputs untouched,
near-exact at its gentlest level, and an output error that grows as the level gets harsher."""

from __future__ import annotations

import pytest
import torch

from autocompress.compress import compress_weight, gptq_quantize, prune_mask, rtn_quantize, svd_factorize
from autocompress.compress.apply import decompose
from autocompress.compress.lowrank import factors_from_svd
from autocompress.plan import LayerChoice


def _rtn(symmetric):
    return lambda w, norm, h, level: rtn_quantize(w, level, 32, symmetric)


def _gptq(symmetric, act_order=False):
    return lambda w, norm, h, level: gptq_quantize(w, h, level, 32, symmetric, act_order=act_order)


def _prune(method, pattern="unstructured"):
    return lambda w, norm, h, level: w * prune_mask(w, level, pattern, method, norm)


def _lowrank(method):
    def fn(w, norm, h, rank):
        A, B = factors_from_svd(decompose(w, method, norm, h), rank)
        return B @ A

    return fn


def _choice(**kw):
    return lambda w, norm, h, level: _dense(compress_weight(w, LayerChoice(**kw, **level), norm, hessian=h))


def _dense(result):
    return result[0] if len(result) == 1 else result[1] @ result[0]


# name -> (technique(weight, input_sq_norm, hessian, level) -> approximation [out, in], gentlest, harsh, bound)
TECHNIQUES = {
    "rtn-sym": (_rtn(True), 8, 3, 0.01),
    "rtn-asym": (_rtn(False), 8, 3, 0.01),
    "gptq-sym": (_gptq(True), 8, 3, 0.01),
    "gptq-asym": (_gptq(False), 8, 3, 0.01),
    "gptq-act-order": (_gptq(True, act_order=True), 8, 3, 0.01),
    "magnitude": (_prune("magnitude"), 0.0, 0.6, 0.0),
    "wanda": (_prune("wanda"), 0.0, 0.6, 0.0),
    "wanda-2:4-then-int8": (_choice(sparsity=0.5, sparsity_pattern="2:4"), {"bits": 8}, {"bits": 3}, 0.7),
    "wanda-2:4-then-gptq": (
        _choice(sparsity=0.5, sparsity_pattern="2:4", quant_method="gptq"),
        {"bits": 8},
        {"bits": 3},
        0.7,
    ),
    "svd": (_lowrank("svd"), 32, 8, 0.01),
    "asvd": (_lowrank("asvd"), 32, 8, 0.01),
    "svd-llm": (_lowrank("svd-llm"), 32, 8, 0.01),
    "plan-lowrank-svd-llm": (_choice(lowrank_method="svd-llm"), {"rank_ratio": 1.0}, {"rank_ratio": 0.25}, 0.05),
    "plan-all-rtn": (_choice(sparsity=0.2, group_size=16), {"bits": 8}, {"bits": 2}, 0.5),
    "plan-all-gptq": (_choice(sparsity=0.2, group_size=16, quant_method="gptq"), {"bits": 8}, {"bits": 2}, 0.5),
    "plan-lowrank-gptq": (
        _choice(rank_ratio=1.0, lowrank_method="asvd", quant_method="gptq", group_size=16),
        {"bits": 8},
        {"bits": 3},
        0.05,
    ),
}


@pytest.fixture(scope="module")
def problem():
    """A weight with a decaying spectrum (as trained ones have) and correlated, unevenly scaled inputs."""
    g = torch.Generator().manual_seed(3)
    U, _ = torch.linalg.qr(torch.randn(48, 48, generator=g))
    V, _ = torch.linalg.qr(torch.randn(96, 48, generator=g))
    w = (U * (0.8 ** torch.arange(48.0))) @ V.t() * 0.3
    X = torch.randn(512, 96, generator=g) @ (torch.eye(96) + 0.3 * torch.randn(96, 96, generator=g))
    X = X * (torch.rand(96, generator=g) * 4 + 0.1)
    return w.float().contiguous(), X.square().sum(0), X.t() @ X, X


@pytest.mark.parametrize("name", sorted(TECHNIQUES))
def test_technique_contract(name, problem):
    fn, gentle, harsh, bound = TECHNIQUES[name]
    w, norm, h, X = problem
    before = (w.clone(), norm.clone(), h.clone())
    out_gentle = fn(w, norm, h, gentle)
    assert out_gentle.shape == w.shape and out_gentle.dtype == torch.float32
    assert all(torch.equal(a, b) for a, b in zip((w, norm, h), before, strict=True))  # inputs never modified
    assert torch.equal(out_gentle, fn(w.clone(), norm.clone(), h.clone(), gentle))  # bit-deterministic

    def err(approx):  # relative error of the layer's outputs on the calibration inputs
        return ((approx - w) @ X.t()).norm().item() / (w @ X.t()).norm().item()

    assert err(out_gentle) <= bound + 1e-6
    assert err(fn(w, norm, h, harsh)) > err(out_gentle)


def test_explicit_rank_above_break_even_is_refused(problem):
    from autocompress.errors import PlanError

    w = problem[0]  # 48×96: r* = 32
    svd_factorize(w, 32)
    with pytest.raises(PlanError, match="break-even"):
        svd_factorize(w, 33)
