import pytest
import torch

from autocompress.compress import asvd_of, factorized_linear, svd_factorize, svd_of, whitened_svd_of
from autocompress.compress.lowrank import factors_from_svd
from autocompress.errors import PlanError


def _w(out=48, inp=80, seed=0):
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))


def test_a_layer_of_low_rank_is_reproduced():
    w, bias = _w()[:, :24] @ _w(24, 80, seed=1), torch.randn(48)  # rank 24 ≤ r* = 30
    layer = factorized_linear(w, bias, 24)
    x = torch.randn(5, 80)
    ref = x @ w.t() + bias
    assert ((layer(x) - ref).norm() / ref.norm()) < 1e-5
    assert [m.weight.shape for m in layer] == [(24, 80), (48, 24)]
    assert layer[0].bias is None and torch.equal(layer[1].bias, bias)


def test_rank_above_break_even_is_refused():
    with pytest.raises(PlanError, match=r"break-even rank r\* = 30\.0"):
        factorized_linear(_w(), None, 31)


def _correlated_inputs(inp=80, seed=2):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(300, inp, generator=g) @ (torch.eye(inp) + 0.5 * torch.randn(inp, inp, generator=g))
    return X * (torch.rand(inp, generator=g) * 5 + 0.05)


@pytest.mark.parametrize("rank", [8, 16, 24])
def test_activation_aware_beats_plain_svd_on_outputs(rank):
    w, X = _w(), _correlated_inputs()

    def out_err(svd):
        A, B = factors_from_svd(svd, rank)
        return ((B @ A - w) @ X.t()).norm().item()

    plain = out_err(svd_of(w))
    whitened = out_err(whitened_svd_of(w, X.t() @ X, damp=0.0))
    assert whitened < out_err(asvd_of(w, X.square().sum(0))) < plain
    # SVD-LLM is optimal: its error is the spectrum tail of W·L
    s = torch.linalg.svdvals(w.double() @ torch.linalg.cholesky((X.t() @ X).double()))
    assert abs(whitened - s[rank:].square().sum().sqrt().item()) / whitened < 1e-3


@pytest.mark.parametrize("rank", [1, 8, 20])
def test_rank_r_error_is_the_tail_of_the_spectrum(rank):
    w = _w()
    A, B = svd_factorize(w, rank)
    assert A.shape == (rank, 80) and B.shape == (48, rank)
    s = torch.linalg.svdvals(w.double())
    expected = s[rank:].square().sum().sqrt()
    assert abs((w - B @ A).double().norm() - expected) / expected < 1e-4


def test_factors_are_bit_reproducible_and_sign_fixed():
    w = _w()
    A1, B1 = svd_factorize(w, 16)
    A2, B2 = svd_factorize(w.clone(), 16)
    assert torch.equal(A1, A2) and torch.equal(B1, B2)
    svd = svd_of(w)
    assert (svd.U.gather(0, svd.U.abs().argmax(0, keepdim=True)) > 0).all()


def test_factorized_layer_round_trips_through_plain_torch_state():
    layer = factorized_linear(_w(), None, 8)
    fresh = torch.nn.Sequential(torch.nn.Linear(80, 8, bias=False), torch.nn.Linear(8, 48, bias=False))
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(3, 80)
    assert torch.equal(fresh(x), layer(x))
