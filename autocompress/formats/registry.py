"""The one table of formats: name -> Format, which runtimes run each, and llama.cpp's shape fallback."""

from __future__ import annotations

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from autocompress.formats import kquants, legacy, mlc
from autocompress.formats.base import Format, FormatError
from autocompress.formats.ggml import BF16, F16, F32
from autocompress.formats.integer import MATMULNBITS_GROUPS, IntegerFormat, generic, parse_generic

RUNTIMES = ("llama.cpp", "onnxruntime", "mlc-llm", "tensorrt-llm", "torchao", "vllm", "torch")

_GGUF: tuple[Format, ...] = (
    F32,
    F16,
    BF16,
    legacy.Q8_0,
    kquants.Q6_K,
    kquants.Q5_K,
    legacy.Q5_1,
    legacy.Q5_0,
    kquants.Q4_K,
    legacy.Q4_1,
    legacy.Q4_0,
    legacy.IQ4_NL,
    kquants.Q3_K,
    kquants.Q2_K,
)
_GENERIC: tuple[Format, ...] = tuple(
    IntegerFormat(bits, group, sym)
    for bits in range(2, 9)
    for group in (*MATMULNBITS_GROUPS, None)
    for sym in (True, False)
)
_MLC: tuple[Format, ...] = (mlc.Q4F16_1, mlc.Q3F16_1)

FORMATS: dict[str, Format] = {f.name: f for f in (*_GGUF, *_GENERIC, *_MLC)}

# llama.cpp ``tensor_type_fallback`` (src/llama-quant.cpp): the type used when a row width is not a
# multiple of the wanted type's block size; if that one does not fit either, F16.
_IQ_TO_NL = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS")
FALLBACK: dict[str, str] = {
    **dict.fromkeys(_IQ_TO_NL, "IQ4_NL"),
    **dict.fromkeys(("Q2_K", "Q3_K", "TQ1_0", "TQ2_0"), "Q4_0"),
    "Q4_K": "Q5_0",
    "Q5_K": "Q5_1",
    "Q6_K": "Q8_0",
}


def names() -> list[str]:
    """Give every registered format name (GGUF types, generic integer grids, MLC modes)."""
    return list(FORMATS)


def get(name: str) -> Format:
    """Give the format of a name (case-sensitive); generic ``int{b}-g{gs}-{sym|asym}`` with any group size too."""
    fmt = FORMATS.get(name) or parse_generic(name)
    if fmt is None:
        gguf = ", ".join(f.name for f in _GGUF)
        raise FormatError(
            f"unknown format {name!r}; known: {gguf}, {mlc.Q4F16_1.name}, {mlc.Q3F16_1.name}, "
            "int{2..8}-g{16..256}-{sym|asym}, int{2..8}-ch-{sym|asym}"
        )
    return fmt


def for_runtime(runtime: str) -> list[Format]:
    """Give the registered formats a runtime runs (runtime ids: ``RUNTIMES``)."""
    if runtime not in RUNTIMES:
        raise FormatError(f"unknown runtime {runtime!r}; known: {', '.join(RUNTIMES)}")
    return [f for f in FORMATS.values() if runtime in f.runtimes]


def _gguf_block(name: str) -> int | None:
    try:
        return GGML_QUANT_SIZES[GGMLQuantizationType[name]][0]
    except KeyError:
        return None


# Runtimes whose checkpoints hold integer grids in whole groups only: they take compressed-tensors
# folders (README, "Which exporter for which runtime"), whose pack-quantized layout refuses a row
# width that is not a multiple of the group size (export/compressed_tensors.py). onnxruntime's
# MatMulNBits and our own kernels pad the last group.
WHOLE_GROUP_RUNTIMES = ("tensorrt-llm", "torchao", "vllm")


def fallback(name: str, in_features: int, runtime: str = "llama.cpp") -> str | None:
    """Give the format ``runtime`` stores instead for this row width, or None if ``name`` fits as it is.

    GGUF types take llama.cpp's fallback (a type outside its fallback switch, where llama.cpp gives
    up, goes to F16 here). Other formats fit, except an integer grid whose groups do not divide the
    row on a ``WHOLE_GROUP_RUNTIMES`` runtime: it takes the format of that runtime with the fewest bits
    (at least as many) and then the fewest bytes that stores the row in whole groups (F16 if none).
    """
    block = _gguf_block(name)
    if block is None:
        fmt = get(name)  # raises for unknown names
        group = fmt.block_size
        if runtime not in WHOLE_GROUP_RUNTIMES or not isinstance(fmt, IntegerFormat) or not group:
            return None
        if in_features % group == 0:
            return None
        fits = [
            f
            for f in for_runtime(runtime)
            if isinstance(f, IntegerFormat) and f.bits >= fmt.bits and in_features % (f.block_size or in_features) == 0
        ]
        best = min(fits, key=lambda f: (f.bits, f.bytes((1, in_features))), default=None)
        return best.name if best is not None else "F16"
    if in_features % block == 0:
        return None
    new = FALLBACK.get(name, "F16")
    return new if in_features % _gguf_block(new) == 0 else "F16"


__all__ = [
    "FALLBACK",
    "FORMATS",
    "RUNTIMES",
    "WHOLE_GROUP_RUNTIMES",
    "fallback",
    "for_runtime",
    "generic",
    "get",
    "names",
]
