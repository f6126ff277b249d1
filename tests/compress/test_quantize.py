import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from autocompress.compress import rtn_quantize, rtn_scales


def _half_step(w, bits, group_size, symmetric):
    """Give, per weight, half the quantization step of its group."""
    gs = w.shape[1] if group_size is None else min(group_size, w.shape[1])
    return rtn_scales(w, bits, group_size, symmetric).repeat_interleave(gs, dim=1)[:, : w.shape[1]] / 2


def _w(out=32, inp=576, seed=0, shift=0.0):
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed)) * 0.05 + shift


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [None, 128, 64])
def test_8bit_error_within_half_a_step_and_below_one_percent(symmetric, group_size):
    w = _w()
    q = rtn_quantize(w, 8, group_size, symmetric)
    assert ((q - w).abs() <= _half_step(w, 8, group_size, symmetric) + 1e-7).all()
    assert (q - w).norm() / w.norm() < 0.01


def test_partial_last_group_has_its_own_scale():
    w = _w(inp=576)  # 4 × 128 + 64
    w[:, 512:] *= 100.0  # the partial group is much larger; the others must keep fine steps
    q = rtn_quantize(w, 4, 128, True)
    assert rtn_scales(w, 4, 128, True).shape == (32, 5)
    assert (q[:, :512] - w[:, :512]).norm() / w[:, :512].norm() < 0.2


def test_values_lie_on_the_integer_grid():
    w = _w()
    for symmetric in (True, False):
        q = rtn_quantize(w, 3, 64, symmetric).reshape(32, -1, 64)
        assert max(len(torch.unique(g)) for g in q.reshape(-1, 64)) <= 8
    sym = rtn_quantize(w, 4, None, True)
    assert torch.allclose(sym / rtn_scales(w, 4, None, True), (sym / rtn_scales(w, 4, None, True)).round(), atol=1e-4)


def test_error_grows_as_bits_drop():
    w = _w()
    errs = [(rtn_quantize(w, b, 128, False) - w).norm().item() for b in (8, 4, 3, 2)]
    assert errs == sorted(errs) and errs[0] < errs[-1] / 10


def test_asymmetric_beats_symmetric_on_shifted_weight():
    w = _w(shift=0.3)  # all positive: symmetric wastes half its levels
    sym = (rtn_quantize(w, 4, 128, True) - w).norm()
    asym = (rtn_quantize(w, 4, 128, False) - w).norm()
    assert asym < 0.7 * sym


def test_zero_groups_and_zeros_survive():
    w = _w()
    w[:, :128] = 0.0
    w[3, 200] = 0.0
    for symmetric in (True, False):
        q = rtn_quantize(w, 4, 128, symmetric)
        assert torch.isfinite(q).all()
        assert (q[:, :128] == 0).all() and q[3, 200] == 0  # pruned zeros stay exactly zero


def test_16_bits_is_identity_and_quantizing_is_deterministic():
    w = _w()
    assert rtn_quantize(w, 16, 128, True) is w
    assert torch.equal(rtn_quantize(w, 4, 128, False), rtn_quantize(w.clone(), 4, 128, False))


@settings(max_examples=40, deadline=None)
@given(
    out=st.integers(1, 6),
    inp=st.integers(1, 70),
    bits=st.integers(2, 8),
    group_size=st.one_of(st.none(), st.integers(1, 80)),
    symmetric=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_error_never_exceeds_half_a_step(out, inp, bits, group_size, symmetric, seed):
    w = torch.randn(out, inp, generator=torch.Generator().manual_seed(seed)) + (0.5 if seed % 2 else 0.0)
    q = rtn_quantize(w, bits, group_size, symmetric)
    assert q.shape == w.shape and torch.isfinite(q).all()
    assert ((q - w).abs() <= _half_step(w, bits, group_size, symmetric) * (1 + 1e-5) + 1e-7).all()
