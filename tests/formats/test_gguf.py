"""GGUF formats against the ``gguf`` package (llama.cpp's own Python reader/writer).

The gguf package's ``dequantize`` decodes our packed bytes independently of our code: equality
bit for bit means the block layout and the dequantization order are ggml's. Its ``quantize``
implements the legacy reference quantizers (``quantize_row_*_ref``); measured on these tensors our
unweighted Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 bytes differ from it in 0 of all bytes (no FMA in either numpy
or torch's elementwise float32 ops), so the test asserts byte equality.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import quants as gq
from gguf.constants import GGMLQuantizationType as T

from autocompress import formats
from autocompress.formats import FormatError
from tests.formats.conftest import skewed_importance, weight

GGUF = ["F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0", "IQ4_NL", "Q3_K", "Q2_K"]
SHAPES = [(64, 256), (8, 512), (16, 576)]
LEGACY = ["Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0"]

# ggml-common.h: (weights per block, bytes per block), written out by hand (not read from gguf-py)
BLOCKS = {
    "F32": (1, 4),
    "F16": (1, 2),
    "BF16": (1, 2),
    "Q8_0": (32, 34),
    "Q5_1": (32, 24),
    "Q5_0": (32, 22),
    "Q4_1": (32, 20),
    "Q4_0": (32, 18),
    "IQ4_NL": (32, 18),
    "Q6_K": (256, 210),
    "Q5_K": (256, 176),
    "Q4_K": (256, 144),
    "Q3_K": (256, 110),
    "Q2_K": (256, 84),
}


def _cases():
    for name in GGUF:
        for shape in SHAPES:
            if formats.get(name).check(shape) is None:
                yield name, shape


@pytest.mark.parametrize("imatrix", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize(("name", "shape"), list(_cases()))
def test_gguf_decodes_our_bytes_to_our_values(name, shape, imatrix):
    fmt = formats.get(name)
    w = weight(*shape)
    q = fmt.quantize(w, skewed_importance(shape[1]) if imatrix else None)
    data = fmt.pack(q)
    assert data.dtype == np.uint8 and data.shape[0] == shape[0] and data.size == fmt.bytes(shape)
    theirs = gq.dequantize(data, fmt.gguf_type).reshape(shape)
    ours = fmt.dequantize(q).numpy()
    assert theirs.dtype == np.float32 and ours.dtype == np.float32
    assert np.array_equal(theirs, ours)
    back = fmt.unpack(data, shape)
    assert torch.equal(back.codes, q.codes)
    assert back.params.keys() == q.params.keys()
    for k in q.params:
        assert back.params[k].dtype == q.params[k].dtype, k
        assert torch.equal(back.params[k], q.params[k]), k


@pytest.mark.parametrize("name", [*LEGACY, "F16", "BF16"])
def test_legacy_quantizers_give_gguf_bytes(name):
    fmt = formats.get(name)
    for shape in SHAPES:
        w = weight(*shape, seed=3)
        w[2, 40:72] = torch.linspace(-1, 1, 32)  # many exact ties at half steps
        ours = fmt.pack(fmt.quantize(w))
        theirs = gq.quantize(w.numpy(), fmt.gguf_type).view(np.uint8).reshape(ours.shape)
        assert np.array_equal(ours, theirs), f"{name} {shape}: {(ours != theirs).mean():.2e} of bytes differ"


@pytest.mark.parametrize("name", GGUF)
def test_bytes_are_ggml_block_sizes(name):
    fmt = formats.get(name)
    block, size = BLOCKS[name]
    assert fmt.block_size == block
    for out, in_f in [(3, 1536), (49152, 512), (7, 256 * 3)]:
        assert fmt.bytes((out, in_f)) == out * in_f // block * size
    assert fmt.bits_per_weight((4, 1536)) == pytest.approx(size * 8 / block)


def test_bits_per_weight_of_known_types():
    bpw = {"Q4_0": 4.5, "Q8_0": 8.5, "Q4_K": 4.5, "Q6_K": 6.5625, "Q2_K": 2.625, "Q3_K": 3.4375, "Q5_K": 5.5}
    for name, expected in bpw.items():
        assert formats.get(name).bits_per_weight((16, 1024)) == expected


@pytest.mark.parametrize("name", ["Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K"])
def test_k_quants_refuse_576_wide_rows_naming_256(name):
    fmt = formats.get(name)
    reason = fmt.check((576, 576))
    assert reason is not None and "256" in reason and "576" in reason
    with pytest.raises(FormatError, match="256"):
        fmt.bytes((576, 576))
    with pytest.raises(FormatError, match="256"):
        fmt.quantize(torch.zeros(4, 576))
    assert fmt.check((576, 1536)) is None


def test_legacy_types_refuse_rows_not_multiple_of_32():
    assert "32" in formats.get("Q4_0").check((4, 100))
    assert formats.get("Q4_0").check((4, 576)) is None


def test_fallback_follows_llama_cpp():
    expected = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "IQ4_XS": "IQ4_NL"}
    for name, to in expected.items():
        assert formats.fallback(name, 576) == to
        assert formats.fallback(name, 1536) is None
    assert formats.fallback("Q4_K", 100) == "F16"  # Q5_0 does not fit 100 either
    assert formats.fallback("IQ4_XS", 48) == "F16"
    assert formats.fallback("Q4_0", 576) is None
    assert formats.fallback("int4-g128-sym", 576) is None
    with pytest.raises(FormatError):
        formats.fallback("Q9_9", 576)


def test_whole_group_runtimes_move_rows_their_groups_do_not_divide():
    """compressed-tensors (vLLM, TensorRT-LLM, torchao) packs whole groups only: a 576-wide row cannot
    hold int4 groups of 128 there, and takes the runtime's per-channel int8; other runtimes pad."""
    for rt in formats.WHOLE_GROUP_RUNTIMES:
        assert formats.fallback("int4-g128-sym", 576, rt) == "int8-ch-sym"
        assert formats.fallback("int4-g128-sym", 1536, rt) is None  # 12 whole groups
        assert formats.fallback("int8-ch-sym", 576, rt) is None  # one scale per row always fits
        got = formats.get(formats.fallback("int4-g128-sym", 576, rt))
        assert rt in got.runtimes and got.bits >= 4
    assert formats.fallback("int4-g128-sym", 576, "onnxruntime") is None  # MatMulNBits pads the last block
    assert formats.fallback("Q4_K", 576, "vllm") == "Q5_0"  # GGUF types keep llama.cpp's switch


def test_gguf_types_are_gguf_enum_members():
    for name in GGUF:
        assert formats.get(name).gguf_type == T[name]
        assert "llama.cpp" in formats.get(name).runtimes
