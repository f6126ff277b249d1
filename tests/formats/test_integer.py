"""Generic integer grids: the project's RTN grid bit for bit, and the runtimes' storage layouts.

onnxruntime itself checks the MatMulNBits layout: a one-node graph fed our packed codes, scales and
zero points must compute x @ dequantize(q).T.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from autocompress import formats
from autocompress.compress.quantize import rtn_quantize
from autocompress.formats import FormatError
from tests.formats.conftest import weight

GROUPS = [None, 16, 32, 40, 64, 128, 256, 1000]


@pytest.mark.parametrize("shape", [(24, 576), (8, 512), (5, 100)])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_generic_grids_reproduce_rtn_quantize_bit_for_bit(shape, symmetric):
    w = weight(*shape)
    w[2, 10:20] = torch.linspace(-0.05, 0.05, 10)  # exact half-step ties for some grids
    for bits in range(2, 9):
        for group in GROUPS:
            fmt = formats.generic(bits, group, symmetric)
            q = fmt.quantize(w)
            assert torch.equal(fmt.dequantize(q), rtn_quantize(w, bits, group, symmetric)), fmt.name
            grid = fmt.fit_grid(w)
            codes, deq = grid.round(w[:, 7:300], 7)
            assert torch.equal(codes, q.codes[:, 7:300]) and torch.equal(deq, fmt.dequantize(q)[:, 7:300])
            back = fmt.unpack(fmt.pack(q), q.shape)
            assert torch.equal(back.codes, q.codes), fmt.name
            assert all(torch.equal(back.params[k], q.params[k]) for k in q.params), fmt.name


def test_generic_names_and_registry():
    assert formats.get("int4-g128-asym").name == "int4-g128-asym"
    assert formats.generic(4, 40, True).name == "int4-g40-sym"
    assert formats.get("int4-g40-sym").group_size == 40  # any group size is parsed
    assert formats.get("int8-ch-sym").group_size is None
    for bad in ["int9-g32-sym", "int4-g0-sym", "int4-g32-symm", "int1-ch-asym"]:
        with pytest.raises(FormatError, match="unknown format"):
            formats.get(bad)
    with pytest.raises(FormatError):
        formats.generic(9, 32, True)


def test_runtimes_per_format():
    assert set(formats.get("int8-ch-sym").runtimes) >= {"tensorrt-llm", "torchao", "vllm", "torch"}
    assert set(formats.get("int4-g128-sym").runtimes) >= {"vllm", "tensorrt-llm", "torchao", "onnxruntime"}
    assert formats.get("int3-g64-sym").runtimes == ("torch",)
    ort = {f.name for f in formats.for_runtime("onnxruntime")}
    assert ort == {f"int{b}-g{g}-{s}" for b in (4, 8) for g in (16, 32, 64, 128, 256) for s in ("sym", "asym")}
    assert [f.name for f in formats.for_runtime("mlc-llm")] == ["q4f16_1", "q3f16_1"]
    assert {f.name for f in formats.for_runtime("llama.cpp")} >= {"Q4_K", "Q8_0", "IQ4_NL", "F16"}
    with pytest.raises(FormatError, match="unknown runtime"):
        formats.for_runtime("ollama")


def test_bytes_per_storage_family():
    # hand-computed from each runtime's layout (see integer.py's table)
    assert formats.get("int4-g32-asym").bytes((4, 576)) == 4 * (18 * (16 + 4) + 9)  # MatMulNBits, fp32 scales
    assert formats.get("int8-g128-sym").bytes((4, 576)) == 4 * 5 * (128 + 4)  # last block padded
    assert formats.get("int4-g128-sym").bytes((4, 576)) == 4 * (72 * 4 + 5 * 2)  # compressed-tensors int32 + bf16
    assert formats.get("int8-ch-sym").bytes((4, 576)) == 4 * (576 + 2)
    assert formats.get("int3-g128-asym").bytes((4, 576)) == 4 * (216 + 5 * 2 + 2)
    assert formats.get("q4f16_1").bytes((4, 576)) == 4 * 18 * (16 + 2)
    assert formats.get("q3f16_1").bytes((4, 576)) == 4 * 15 * (16 + 2)  # 40-groups, the last one padded


def _matmulnbits(fmt, q, x: np.ndarray) -> np.ndarray:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    n, k = q.shape
    bs, bits = fmt.group_size, fmt.bits
    blocks = math.ceil(k / bs)
    row = fmt.pack(q)
    nb = blocks * bs * bits // 8
    b = row[:, :nb].reshape(n, blocks, bs * bits // 8)
    scales = row[:, nb : nb + 4 * blocks].copy().view("<f4").reshape(-1)
    inits = [numpy_helper.from_array(b, "B"), numpy_helper.from_array(scales.astype(np.float32), "scales")]
    inputs = ["A", "B", "scales"]
    if not fmt.symmetric:
        inits.append(numpy_helper.from_array(row[:, nb + 4 * blocks :].reshape(-1).copy(), "zero_points"))
        inputs.append("zero_points")
    node = helper.make_node(
        "MatMulNBits", inputs, ["Y"], domain="com.microsoft", K=k, N=n, bits=bits, block_size=bs, accuracy_level=1
    )
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [x.shape[0], k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [x.shape[0], n])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    del onnx
    return sess.run(None, {"A": x})[0]


@pytest.mark.parametrize("name", ["int4-g32-asym", "int4-g64-sym", "int4-g128-asym", "int8-g32-sym", "int8-g128-asym"])
def test_onnxruntime_matmulnbits_computes_our_values(name):
    fmt = formats.get(name)
    assert fmt.layout == "matmulnbits"
    w = weight(48, 576)
    q = fmt.quantize(w)
    x = torch.randn(3, 576, generator=torch.Generator().manual_seed(5))
    y = _matmulnbits(fmt, q, x.numpy())
    expected = (x.double() @ fmt.dequantize(q).double().T).numpy()
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)


def test_compressed_tensors_unpacks_our_int4_words():
    pytest.importorskip("compressed_tensors")
    try:  # 0.20 moved the helpers
        from compressed_tensors.compressors.pack_quantized import helpers as pack_mod
    except ImportError:
        from compressed_tensors.compressors.quantized_compressors import pack_quantized as pack_mod
    fmt = formats.get("int4-g128-sym")
    assert fmt.layout == "compressed-tensors"
    w = weight(16, 576)
    q = fmt.quantize(w)
    row = fmt.pack(q)
    words = torch.from_numpy(row[:, : 72 * 4].copy().view("<i4").astype(np.int32))
    signed = pack_mod.unpack_from_int32(words, 4, torch.Size(q.shape))
    scale = torch.from_numpy(row[:, 72 * 4 :].copy().view("<f4"))
    deq = signed.float() * scale.repeat_interleave(128, dim=1)[:, :576]
    assert torch.equal(deq, fmt.dequantize(q))


@pytest.mark.parametrize("name", ["q4f16_1", "q3f16_1"])
def test_mlc_grids(name):
    fmt = formats.get(name)
    w = weight(8, 576)
    q = fmt.quantize(w)
    deq = fmt.dequantize(q)
    max_int = 2 ** (fmt.bits - 1) - 1
    assert int(q.codes.min()) >= 0 and int(q.codes.max()) <= 2 * max_int
    step = q.params["scale"].float().repeat_interleave(fmt.group_size, dim=1)[:, :576]
    assert bool(((deq - w).abs() <= step / 2 * 1.01 + 1e-6).all())
    assert torch.equal(deq, deq.half().float())  # MLC computes in fp16
    assert torch.equal(deq[1, :256], torch.zeros(256))  # the all-zero groups stay 0
    back = fmt.unpack(fmt.pack(q), q.shape)
    assert torch.equal(back.codes, q.codes) and torch.equal(back.params["scale"], q.params["scale"])
