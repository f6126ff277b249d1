"""GPTQ on a format's own grid: better than the format's round-to-nearest on held-out inputs, and
its output is an ordinary stored tensor of that format (gguf-py decodes it to our values)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import quants as gq

from autocompress import formats
from autocompress.formats import FormatError, gptq_quantize


def _inputs(in_f: int, n: int, seed: int) -> torch.Tensor:
    """Give correlated Gaussian inputs [n, in]: a random mixing of independent Gaussians."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(in_f, in_f, generator=g) / in_f**0.5 + torch.eye(in_f) * 0.3
    scale = torch.rand(in_f, generator=g) * 2 + 0.2  # uneven input scales, as real activations
    return (torch.randn(n, in_f, generator=g) @ mix) * scale


def _problem(in_f: int = 256, out: int = 48):
    g = torch.Generator().manual_seed(11)
    w = torch.randn(out, in_f, generator=g) * 0.02
    x = _inputs(in_f, 2048, 12)
    calib, held = x[:1024], x[1024:]
    return w, calib.T @ calib, held


def _output_error(w, deq, x):
    return float(torch.linalg.norm(x @ (w - deq).T))


@pytest.mark.parametrize("name", ["Q4_0", "Q4_K", "IQ4_NL", "Q3_K", "int4-g128-asym"])
def test_gptq_beats_rtn_on_held_out_inputs(name):
    fmt = formats.get(name)
    w, hessian, held = _problem()
    rtn = fmt.quantize(w)
    gq_ = gptq_quantize(w, hessian, fmt)
    assert gq_.format == name and gq_.shape == tuple(w.shape)
    err_rtn = _output_error(w, fmt.dequantize(rtn), held)
    err_gptq = _output_error(w, fmt.dequantize(gq_), held)
    assert err_gptq < 0.9 * err_rtn, (err_rtn, err_gptq)
    # the grid stays the reference quantizer's: GPTQ changes codes only
    assert all(torch.equal(gq_.params[k], fmt.fit_grid(w).params[k]) for k in gq_.params)
    if fmt.gguf_type is not None:
        data = fmt.pack(gq_)
        assert np.array_equal(gq.dequantize(data, fmt.gguf_type).reshape(w.shape), fmt.dequantize(gq_).numpy())


def test_gptq_without_act_order_also_improves():
    fmt = formats.get("Q4_K")
    w, hessian, held = _problem()
    a = _output_error(w, fmt.dequantize(gptq_quantize(w, hessian, fmt, act_order=False)), held)
    assert a < _output_error(w, fmt.dequantize(fmt.quantize(w)), held)


@pytest.mark.parametrize("name", ["Q4_0", "Q8_0", "Q3_K", "int4-g128-asym", "int3-g64-sym", "q4f16_1"])
def test_pruned_weights_are_exactly_zero_where_the_grid_holds_zero(name):
    fmt = formats.get(name)
    w, hessian, _ = _problem()
    mask = torch.rand(w.shape, generator=torch.Generator().manual_seed(3)) > 0.5
    deq = fmt.dequantize(gptq_quantize(w, hessian, fmt, mask=mask))
    assert torch.equal(deq[~mask], torch.zeros(int((~mask).sum())))


def test_pruned_weights_take_the_level_nearest_zero_on_iq4_nl():
    fmt = formats.get("IQ4_NL")
    w, hessian, _ = _problem()
    mask = torch.rand(w.shape, generator=torch.Generator().manual_seed(3)) > 0.5
    q = gptq_quantize(w, hessian, fmt, mask=mask)
    assert bool((q.codes[~mask] == 8).all())  # kvalues[8] = 1, the level nearest 0


def test_gptq_on_float_formats_is_the_cast():
    w, hessian, _ = _problem()
    for name in ["F16", "BF16", "F32"]:
        fmt = formats.get(name)
        assert torch.equal(fmt.dequantize(gptq_quantize(w, hessian, fmt)), fmt.dequantize(fmt.quantize(w)))


def test_gptq_rejects_a_hessian_of_the_wrong_size():
    w, hessian, _ = _problem()
    with pytest.raises(FormatError, match="Hessian"):
        gptq_quantize(w, hessian[:10, :10], formats.get("Q4_0"))
