"""``hw calibrate`` prices each timed chain by the bytes its ONNX file really stores (format registry)."""

from __future__ import annotations

import pytest
from onnx import numpy_helper

from autocompress.calibration.onnx import _chain_model, _quantized, _stored_bytes


@pytest.mark.parametrize("fmt", ["fp32", "int8", "int4", "w8a8"])
def test_stored_bytes_are_the_weight_initializers_of_the_quantized_chain(fmt, tmp_path):
    k, n, layers = 576, 192, 3  # 576 = 4.5 groups of 128: partial groups, and both orientations differ
    proto = _quantized(_chain_model(k, n, layers), fmt, tmp_path)
    stored = 0
    for init in proto.graph.initializer:
        a = numpy_helper.to_array(init)
        if a.size > 1:  # weights, scales and zero points; the dynamic quantizer's scalars aside
            stored += a.nbytes
    assert stored == _stored_bytes(fmt, k, n, layers)
