"""Storage formats real runtimes run, in one registry: the single source of truth for the cost model,
evaluation (fake-quant), exporters and calibration.

- ``base``: ``Grid`` (what GPTQ rounds onto), ``QuantizedTensor`` (codes + stored scale data), the
  ``Format`` protocol and ``FormatError``.
- ``ggml``: the GGUF block table (from the ``gguf`` package), block packing, F32 / F16 / BF16.
- ``legacy``: Q8_0, Q5_1, Q5_0, Q4_1, Q4_0, IQ4_NL (gguf-py's bytes without an imatrix).
- ``kquants``: Q6_K, Q5_K, Q4_K, Q3_K, Q2_K (llama.cpp's searches, ggml's block layouts).
- ``search``: llama.cpp's scale searches (``make_qx_quants`` ...), vectorised over blocks.
- ``integer``: the generic integer grids ``int{b}-g{gs}-{sym|asym}`` / ``int{b}-ch-...`` (the project's
  RTN grid; onnxruntime MatMulNBits, compressed-tensors and int8 weight-only storage).
- ``mlc``: MLC-LLM ``q4f16_1`` / ``q3f16_1``.
- ``registry``: name -> format, formats per runtime, each runtime's shape fallback.
- ``gptq``: GPTQ on any format's own grid.
"""

from autocompress.formats.base import Format, FormatError, Grid, QuantizedTensor
from autocompress.formats.gptq import gptq_quantize
from autocompress.formats.registry import RUNTIMES, WHOLE_GROUP_RUNTIMES, fallback, for_runtime, generic, get, names

__all__ = [
    "RUNTIMES",
    "WHOLE_GROUP_RUNTIMES",
    "Format",
    "FormatError",
    "Grid",
    "QuantizedTensor",
    "fallback",
    "for_runtime",
    "generic",
    "get",
    "gptq_quantize",
    "names",
]
