"""The scale searches' in-order sums: llama.cpp adds a block's terms left to right in float32, and
near-equal candidates are told apart by those sums, so any other order changes some choices."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from autocompress.formats.search import seqsum, sum_first


def _left_to_right(col: np.ndarray) -> np.float32:
    acc = np.float32(col[0])
    for v in col[1:]:
        acc = np.float32(acc + np.float32(v))
    return acc


@pytest.mark.parametrize("shape", [(32, 1), (32, 2), (16, 7), (256, 40), (32, 512, 3)])
def test_sum_first_adds_in_order_in_float32(shape):
    g = torch.Generator().manual_seed(0)
    # magnitudes over 12 decades: pairwise or float64 sums give other float32 results
    t = torch.randn(shape, generator=g) * 10.0 ** torch.randint(-6, 6, shape, generator=g).float()
    got = sum_first(t).numpy().reshape(-1)
    cols = t.numpy().reshape(shape[0], -1)
    want = np.array([_left_to_right(cols[:, j]) for j in range(cols.shape[1])], dtype=np.float32)
    assert got.dtype == np.float32
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    assert not np.array_equal(want, cols.astype(np.float64).sum(0).astype(np.float32))  # the data can tell


def test_seqsum_is_sum_first_over_the_last_dim():
    g = torch.Generator().manual_seed(1)
    t = torch.randn(50, 32, generator=g) * 10.0 ** torch.randint(-6, 6, (50, 32), generator=g).float()
    want = np.array([_left_to_right(row) for row in t.numpy()], dtype=np.float32)
    assert np.array_equal(seqsum(t).numpy().view(np.uint32), want.view(np.uint32))
