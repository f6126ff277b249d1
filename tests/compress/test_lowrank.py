import pytest
import torch

from autocompress.compress import factorized_linear, svd_factorize, svd_of


def _w(out=48, inp=80, seed=0):
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))


def test_full_rank_reproduces_the_layer():
    w, bias = _w(), torch.randn(48)
    layer = factorized_linear(w, bias, 48)
    x = torch.randn(5, 80)
    ref = x @ w.t() + bias
    assert ((layer(x) - ref).norm() / ref.norm()) < 1e-5
    assert [m.weight.shape for m in layer] == [(48, 80), (48, 48)]
    assert layer[0].bias is None and torch.equal(layer[1].bias, bias)


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
