"""One contract every weight technique must meet: declared shape, deterministic, near-exact at its gentlest level."""

from __future__ import annotations

import pytest
import torch

from autocompress.compress import compress_weight, prune_mask, rtn_quantize, svd_factorize
from autocompress.plan import LayerChoice


def _rtn(symmetric):
    return lambda w, norm, level: rtn_quantize(w, level, 32, symmetric)


def _prune(method, pattern="unstructured"):
    return lambda w, norm, level: w * prune_mask(w, level, pattern, method, norm)


def _lowrank(w, norm, rank):
    A, B = svd_factorize(w, rank)
    return B @ A


def _choice(**kw):
    return lambda w, norm, level: _dense(compress_weight(w, LayerChoice(**kw, **level), norm))


def _dense(result):
    return result[0] if len(result) == 1 else result[1] @ result[0]


# name -> (technique(weight, input_sq_norm, level) -> approximation [out, in], gentlest level, harsh level, rel. error bound)
TECHNIQUES = {
    "rtn-sym": (_rtn(True), 8, 3, 0.01),
    "rtn-asym": (_rtn(False), 8, 3, 0.01),
    "magnitude": (_prune("magnitude"), 0.0, 0.6, 0.0),
    "wanda": (_prune("wanda"), 0.0, 0.6, 0.0),
    "wanda-2:4-then-int8": (_choice(sparsity=0.5, sparsity_pattern="2:4"), {"bits": 16}, {"bits": 3}, 0.7),
    "svd": (_lowrank, 48, 8, 1e-5),
    "plan-lowrank": (_choice(), {"rank_ratio": 1.0}, {"rank_ratio": 0.25}, 0.6),
    "plan-all": (_choice(sparsity=0.2, group_size=16), {"bits": 8}, {"bits": 2}, 0.5),
}


@pytest.fixture(scope="module")
def weight_and_norm():
    g = torch.Generator().manual_seed(3)
    return torch.randn(48, 96, generator=g) * 0.02, torch.rand(96, generator=g) * 10 + 0.1


@pytest.mark.parametrize("name", sorted(TECHNIQUES))
def test_technique_contract(name, weight_and_norm):
    fn, gentle, harsh, bound = TECHNIQUES[name]
    w, norm = weight_and_norm
    before = w.clone()
    out_gentle = fn(w, norm, gentle)
    assert out_gentle.shape == w.shape and out_gentle.dtype == torch.float32
    assert torch.equal(w, before)  # inputs are never modified
    assert torch.equal(out_gentle, fn(w.clone(), norm.clone(), gentle))  # bit-deterministic
    err_gentle = ((out_gentle - w).norm() / w.norm()).item()
    err_harsh = ((fn(w, norm, harsh) - w).norm() / w.norm()).item()
    assert err_gentle <= bound + 1e-6
    assert err_harsh > err_gentle
