"""GPTQ: RTN's grid exactly when there is no error feedback; lower output error than RTN otherwise."""

from __future__ import annotations

import pytest
import torch

from autocompress.compress import gptq_quantize, prune_mask, rtn_quantize
from autocompress.errors import PlanError


def _problem(out_f=32, in_f=160, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    X = torch.randn(400, in_f, generator=g) @ (torch.eye(in_f) + 0.4 * torch.randn(in_f, in_f, generator=g))
    return w, X


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [None, 32, 64, 128])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_diagonal_hessian_gives_rtn_bit_for_bit(bits, group_size, symmetric, act_order):
    w, _ = _problem()
    h = torch.diag(torch.rand(w.shape[1], generator=torch.Generator().manual_seed(1)) + 0.5)
    got = gptq_quantize(w, h, bits, group_size, symmetric, act_order=act_order)
    assert torch.equal(got, rtn_quantize(w, bits, group_size, symmetric))


def test_diagonal_hessian_with_mask_gives_rtn_of_pruned():
    w, _ = _problem()
    mask = prune_mask(w, 0.5, "2:4", "magnitude")
    got = gptq_quantize(w, torch.eye(w.shape[1]), 4, 32, False, mask=mask)
    assert torch.equal(got, rtn_quantize(w * mask, 4, 32, False))


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits", [3, 4])
def test_beats_rtn_on_output_error(bits, act_order):
    w, X = _problem()
    h = X.t() @ X

    def err(q):
        return ((q - w) @ X.t()).norm().item()

    assert err(gptq_quantize(w, h, bits, 32, True, act_order=act_order)) < 0.9 * err(rtn_quantize(w, bits, 32, True))


def test_pruned_weights_stay_zero_and_values_on_the_grid():
    w, X = _problem()
    mask = prune_mask(w, 0.5, "unstructured", "magnitude")
    q = gptq_quantize(w, X.t() @ X, 4, 32, True, mask=mask)
    assert (q[~mask] == 0).all()
    # every group holds at most 2^4 - 1 distinct values (a symmetric restricted 4-bit grid)
    for start in range(0, w.shape[1], 32):
        for row in q[:, start : start + 32]:
            assert row.unique().numel() <= 15


def test_act_order_groups_stay_contiguous():
    """With act_order the groups are still runs of group_size input columns (static grids)."""
    w, X = _problem()
    q = gptq_quantize(w, X.t() @ X, 3, 32, True, act_order=True)
    for start in range(0, w.shape[1], 32):
        assert all(row.unique().numel() <= 7 for row in q[:, start : start + 32])


def test_wrong_hessian_shape_is_a_plan_error():
    w, _ = _problem()
    with pytest.raises(PlanError, match="Hessian"):
        gptq_quantize(w, torch.eye(5), 4)
