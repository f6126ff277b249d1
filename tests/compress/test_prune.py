import pytest
import torch

from autocompress.compress import head_scores, kv_group_scores, mlp_channel_scores, prune_mask, top_indices
from autocompress.errors import PlanError


def _w(out=16, inp=64, seed=0):
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_two_four_keeps_exactly_two_of_every_four(method):
    w = _w()
    norm = torch.rand(64, generator=torch.Generator().manual_seed(1)) + 0.01
    mask = prune_mask(w, 0.5, "2:4", method, norm)
    assert (mask.reshape(16, 16, 4).sum(-1) == 2).all()


@pytest.mark.parametrize("sparsity", [0.1, 0.3, 0.5, 0.77])
def test_unstructured_sparsity_is_exact_per_row(sparsity):
    mask = prune_mask(_w(inp=100), sparsity, "unstructured", "magnitude")
    assert ((~mask).sum(1) == round(sparsity * 100)).all()


def test_magnitude_zeros_the_smallest():
    w = _w()
    mask = prune_mask(w, 0.5, "unstructured", "magnitude")
    for row, keep in zip(w.abs(), mask, strict=True):
        assert row[keep].min() >= row[~keep].max()


def test_wanda_uses_input_norms():
    w = _w()
    norm = torch.ones(64)
    norm[5] = 1e10  # a column carrying huge activations
    w[:, 5] = 1e-4  # with tiny weights: magnitude drops it, Wanda keeps it
    norm[10:20] = 1e-4
    mag = prune_mask(w, 0.5, "unstructured", "magnitude")
    wanda = prune_mask(w, 0.5, "unstructured", "wanda", norm)
    assert not mag[:, 5].any() and wanda[:, 5].all()
    assert not torch.equal(mag, wanda)


def test_wanda_without_stats_is_a_plan_error():
    with pytest.raises(PlanError, match="statistics"):
        prune_mask(_w(), 0.5, "unstructured", "wanda", None)


def test_two_four_needs_divisible_inputs():
    with pytest.raises(PlanError, match="divisible by 4"):
        prune_mask(_w(inp=30), 0.5, "2:4", "magnitude")


def test_masks_are_deterministic_with_ties():
    w = torch.ones(4, 16)  # all tied: lower indices go first
    mask = prune_mask(w, 0.25, "unstructured", "magnitude")
    assert torch.equal(mask, prune_mask(w.clone(), 0.25, "unstructured", "magnitude"))
    assert not mask[:, :4].any() and mask[:, 4:].all()


def test_structured_scores():
    down = torch.ones(8, 6)
    down[:, 2] = 3.0
    norm = torch.ones(6)
    norm[4] = 100.0
    s = mlp_channel_scores(down, norm)
    assert torch.allclose(s[[2, 4, 0]], torch.tensor([3.0, 10.0, 1.0]) * 8**0.5)
    assert top_indices(s, 2).tolist() == [2, 4]  # highest kept, original order
    assert top_indices(torch.ones(5), 3).tolist() == [0, 1, 2]  # ties: lower index kept
    o = torch.zeros(8, 4 * 2)
    o[:, 6:8] = 1.0  # only head 3 matters
    hs = head_scores(o, num_heads=4, head_dim=2)
    assert hs.argmax() == 3 and hs[:3].sum() == 0
    assert kv_group_scores(hs, 2).tolist() == [0.0, hs[3].item()]


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.9])
def test_unstructured_mask_equals_stable_sort_even_with_ties(sparsity):
    w = torch.randint(-3, 4, (32, 40), generator=torch.Generator().manual_seed(2)).float()  # many ties
    order = torch.argsort(w.abs(), dim=1, stable=True)
    expected = torch.ones_like(w, dtype=torch.bool).scatter_(1, order[:, : round(sparsity * 40)], False)
    assert torch.equal(prune_mask(w, sparsity, "unstructured", "magnitude"), expected)
