"""Every registered format passes the same checks (the scikit-learn habit: one shared conformance test)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from autocompress import formats
from tests.formats.conftest import skewed_importance, weight

ALL = formats.names()
SHAPE = (32, 512)  # storable by every format (K-quants need rows of 256·k)
WEIGHTED = ["Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0", "IQ4_NL", "Q3_K", "Q2_K"]


def _max_error_in_steps(fmt) -> float:
    """Give the largest error allowed, in steps of the row's range split by the format's level count.

    Integer grids round to nearest: half a step. GGUF types may clip: Q4_0/Q5_0 map the block's
    signed extreme to the lowest code, so the opposite extreme can be up to one code off; the
    K-quants' searches trade a clipped extreme for a finer step.
    """
    if fmt.runtimes == ("llama.cpp",):
        return 1.0
    if fmt.runtimes == ("mlc-llm",):
        return 0.51  # the fp16 rounding of the product
    return 0.5 * (1 + 1e-6)


def _rel_mse(fmt, w, importance=None, weigh=None):
    e = fmt.dequantize(fmt.quantize(w, importance)) - w
    iw = torch.ones(w.shape[1]) if weigh is None else weigh
    return float(((e * e) * iw).sum() / ((w * w) * iw).sum())


@pytest.mark.parametrize("name", ALL)
def test_format_conformance(name):
    fmt = formats.get(name)
    w = weight(*SHAPE)
    assert fmt.check(SHAPE) is None
    q = fmt.quantize(w)
    q2 = fmt.quantize(w.clone())
    assert torch.equal(q.codes, q2.codes) and all(torch.equal(q.params[k], q2.params[k]) for k in q.params)
    assert q.format == name and q.shape == SHAPE and q.codes.dtype == torch.int64 and q.codes.shape == SHAPE
    deq = fmt.dequantize(q)
    assert deq.dtype == torch.float32 and deq.shape == SHAPE and torch.isfinite(deq).all()

    data = fmt.pack(q)
    assert data.dtype == np.uint8 and data.shape[0] == SHAPE[0]
    back = fmt.unpack(data, SHAPE)
    assert torch.equal(fmt.dequantize(back), deq)
    assert fmt.bytes(SHAPE) > 0
    assert fmt.bits_per_weight(SHAPE) == pytest.approx(fmt.bytes(SHAPE) * 8 / (SHAPE[0] * SHAPE[1]))
    assert fmt.bits_per_weight(SHAPE) >= fmt.bits

    if fmt.is_float:
        dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[name]
        assert torch.equal(deq, w.to(dtype).float())
        assert data.size == fmt.bytes(SHAPE)
        return

    grid = fmt.fit_grid(w)
    assert grid.scale.shape == (SHAPE[0], -(-SHAPE[1] // grid.group))
    assert bool((grid.levels[1:] > grid.levels[:-1]).all())
    assert int(q.codes.min()) >= 0 and int(q.codes.max()) < len(grid.levels)
    # the grid's own rounding is what the format stores and dequantizes
    codes, rounded = grid.round(w, 0)
    stored = fmt.dequantize(fmt.from_codes(grid, codes))
    assert torch.equal(stored, rounded.half().float() if name.startswith("q") else rounded)
    # a column window rounds like the whole tensor
    c2, r2 = grid.round(w[:, 37:301], 37)
    assert torch.equal(c2, codes[:, 37:301]) and torch.equal(r2, rounded[:, 37:301])
    # error bound in steps of the row range
    step = 2 * w.abs().amax(1, keepdim=True) / (len(grid.levels) - 1)
    assert float(((deq - w).abs() / step).max()) <= _max_error_in_steps(fmt)
    assert torch.equal(deq[1, :256], torch.zeros(256)) or not fmt.symmetric  # all-zero blocks stay exactly 0


def test_quality_order_of_gguf_types():
    w = torch.randn(256, 1024, generator=torch.Generator().manual_seed(0))
    mse = {n: _rel_mse(formats.get(n), w) for n in ["Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K"]}
    chain = list(mse.values())
    assert chain == sorted(chain), mse
    assert mse["Q8_0"] < 1e-4 and mse["Q2_K"] < 0.2
    legacy = {n: _rel_mse(formats.get(n), w) for n in ["Q5_1", "Q5_0", "Q4_1", "Q4_0", "IQ4_NL"]}
    assert legacy["Q5_1"] < legacy["Q4_1"] and legacy["Q5_0"] < legacy["Q4_0"]
    assert legacy["IQ4_NL"] < legacy["Q4_0"]  # the non-linear grid fits Gaussian weights better


@pytest.mark.parametrize("name", WEIGHTED)
def test_importance_lowers_the_importance_weighted_error(name):
    fmt = formats.get(name)
    w = weight(64, 512, seed=4)
    imp = skewed_importance(512)
    plain = _rel_mse(fmt, w, None, imp)
    weighted = _rel_mse(fmt, w, imp, imp)
    assert weighted < plain, (plain, weighted)


def test_q8_0_ignores_importance_as_llama_cpp_does():
    fmt = formats.get("Q8_0")
    w = weight(8, 256)
    assert torch.equal(fmt.quantize(w).codes, fmt.quantize(w, skewed_importance(256)).codes)
