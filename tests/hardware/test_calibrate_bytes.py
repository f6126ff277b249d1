"""``hw calibrate`` prices each timed chain by the bytes its ONNX file really stores (format registry)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import numpy_helper

from autocompress.calibration.onnx import _quantized, _stored_bytes, chain_model
from autocompress.hardware.measure import ort_session


@pytest.mark.parametrize("fmt", ["fp32", "int8", "int4", "w8a8"])
def test_stored_bytes_are_the_weight_initializers_of_the_quantized_chain(fmt, tmp_path):
    k, n, layers = 576, 192, 3  # 576 = 4.5 groups of 128: partial groups, and both orientations differ
    proto = _quantized(chain_model(k, n, layers), fmt, tmp_path)
    stored = 0
    for init in proto.graph.initializer:
        a = numpy_helper.to_array(init)
        if a.size > 1:  # weights, scales and zero points; the dynamic quantizer's scalars aside
            stored += a.nbytes
    assert stored == _stored_bytes(fmt, k, n, layers)


@pytest.mark.parametrize("fmt", ["fp32", "int4"])
def test_a_batched_chain_is_the_same_chain_on_3d_activations(fmt, tmp_path):
    """The 3-D chain (``batched``: X[B, M, K], as a decoder feeds its linears) stores the same weights
    and computes what the 2-D one does, row for row."""
    k, n, layers = 128, 64, 3
    flat = _quantized(chain_model(k, n, layers), fmt, tmp_path)
    batched = _quantized(chain_model(k, n, layers, batched=True), fmt, tmp_path)
    assert [numpy_helper.to_array(i).tobytes() for i in flat.graph.initializer] == [
        numpy_helper.to_array(i).tobytes() for i in batched.graph.initializer
    ]
    x = np.random.default_rng(1).standard_normal((3, k)).astype(np.float32)
    (two_d,) = ort_session(flat.SerializeToString()).run(None, {"x": x})
    (three_d,) = ort_session(batched.SerializeToString()).run(None, {"x": x[None]})
    assert three_d.shape == (1, 3, k if layers % 2 == 0 else n)
    np.testing.assert_allclose(three_d[0], two_d, rtol=1e-5, atol=1e-5)
