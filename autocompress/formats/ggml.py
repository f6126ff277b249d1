"""What every GGUF type shares: ggml's block table (read from the ``gguf`` package), block packing
per row, and the float types F32 / F16 / BF16.

A GGUF block format stores each row as ``in / block_size`` blocks of ``type_size`` bytes, exactly
ggml's ``block_*`` structs (``ggml-common.h``); ``bytes`` comes from ``gguf.constants.GGML_QUANT_SIZES``,
so our sizes are theirs by construction. Subclasses give the block's levels, its scale search
(``_fit``), how the stored scale data turns into per-group scale/offset (``_scale_offset``) and the
byte layout of one block (``_pack_blocks`` / ``_unpack_blocks``, vectorised over all blocks).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from autocompress.formats.base import (
    Format,
    FormatError,
    Grid,
    QuantizedTensor,
    as_weight,
    importance_matrix,
)

CHUNK_BLOCKS = (
    1 << 12
)  # blocks searched at once: keeps the [n, blocks, trials] searches in cache (4096 measured fastest)


def over_chunks(fn: Callable[..., tuple[torch.Tensor, ...]], *tensors: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """Give fn applied to consecutive chunks of blocks (dim 0) of every tensor, outputs concatenated."""
    n = next(t for t in tensors if t is not None).shape[0]
    parts = [fn(*(None if t is None else t[i : i + CHUNK_BLOCKS] for t in tensors)) for i in range(0, n, CHUNK_BLOCKS)]
    return tuple(torch.cat([p[k] for p in parts]) for k in range(len(parts[0])))


def f16(x: torch.Tensor) -> torch.Tensor:
    """Give x rounded to fp16 (round to nearest even, as GGML_FP32_TO_FP16 and numpy's astype)."""
    return x.to(torch.float16)


def fp16_bytes(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """Give fp16 values [N] (or [N, k]) as little-endian bytes [N, 2k]."""
    a = np.ascontiguousarray(np.asarray(x, dtype=np.float16).reshape(len(x), -1))
    return a.view(np.uint8)


def fp16_from(b: np.ndarray) -> torch.Tensor:
    """Give little-endian fp16 bytes [N, 2k] back as a float16 tensor [N, k]."""
    return torch.from_numpy(np.ascontiguousarray(b).view(np.float16).copy())


def nibbles(c: np.ndarray) -> np.ndarray:
    """Give codes [N, 2m] (< 16) as bytes [N, m]: byte j = c[j] | c[j + m] << 4 (ggml's 32-blocks)."""
    m = c.shape[1] // 2
    return (c[:, :m] | (c[:, m:] << 4)).astype(np.uint8)


def from_nibbles(b: np.ndarray) -> np.ndarray:
    """Give bytes [N, m] back as codes [N, 2m] (inverse of ``nibbles``)."""
    return np.concatenate([b & 15, b >> 4], axis=1)


class GGUFFormat(Format):
    """A GGUF block type; subclasses set ``gguf_type``, ``levels``, ``group_size``, ``bits``, ``symmetric``."""

    runtimes = ("llama.cpp",)
    levels: torch.Tensor

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.gguf_type.name

    @property
    def block_size(self) -> int:  # type: ignore[override]
        return GGML_QUANT_SIZES[self.gguf_type][0]

    @property
    def type_size(self) -> int:
        """Bytes of one block (ggml's ``sizeof(block_*)``)."""
        return GGML_QUANT_SIZES[self.gguf_type][1]

    def bytes(self, shape: tuple[int, int]) -> int:
        out, in_f = self._require(shape)
        return out * (in_f // self.block_size) * self.type_size

    # subclasses ------------------------------------------------------------------------------
    def _fit(self, w: torch.Tensor, qw: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """Give (stored scale data, the reference quantizer's own codes [out, in] or None)."""
        raise NotImplementedError

    def _reference_codes(self, nearest: torch.Tensor, ref: torch.Tensor, grid: Grid) -> torch.Tensor:
        """Give the codes llama.cpp stores, from the nearest codes and its search's codes."""
        return ref

    def _scale_offset(self, p: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def _pack_blocks(self, c: np.ndarray, p: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def _unpack_blocks(self, b: np.ndarray) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
        raise NotImplementedError

    # shared ----------------------------------------------------------------------------------
    def fit_grid(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> Grid:
        w = as_weight(w)
        self._require(tuple(w.shape))
        return self._grid(self._fit(w, importance_matrix(importance, w))[0])

    def quantize(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> QuantizedTensor:
        w = as_weight(w)
        self._require(tuple(w.shape))
        params, ref = self._fit(w, importance_matrix(importance, w))
        grid = self._grid(params)
        codes, _ = grid.round(w, 0)
        if ref is not None:
            codes = self._reference_codes(codes, ref.long().reshape(w.shape), grid)
        return self.from_codes(grid, codes)

    def _grid(self, params: dict[str, torch.Tensor]) -> Grid:
        scale, offset = self._scale_offset(params)
        return Grid(scale, offset, self.levels, self.group_size, params=params)

    def grid_of(self, q: QuantizedTensor) -> Grid:
        return self._grid(q.params)

    def pack(self, q: QuantizedTensor) -> np.ndarray:
        out, in_f = self._require(q.shape)
        n = out * (in_f // self.block_size)
        c = q.codes.reshape(n, self.block_size).numpy().astype(np.uint8)
        p = {k: v.reshape(n, -1).numpy() for k, v in q.params.items()}
        blocks = self._pack_blocks(c, p)
        assert blocks.shape == (n, self.type_size), (self.name, blocks.shape)
        return np.ascontiguousarray(blocks).reshape(out, -1)

    def unpack(self, data: np.ndarray, shape: tuple[int, int]) -> QuantizedTensor:
        out, in_f = self._require(shape)
        n = out * (in_f // self.block_size)
        blocks = np.ascontiguousarray(data, dtype=np.uint8).reshape(n, self.type_size)
        c, p = self._unpack_blocks(blocks)
        codes = torch.from_numpy(c.astype(np.int64)).reshape(out, in_f)
        return QuantizedTensor(self.name, (out, in_f), codes, {k: v.reshape(out, -1) for k, v in p.items()})


class FloatFormat(Format):
    """F32 / F16 / BF16: no grid; quantize is a cast, codes are the raw bit patterns (as int64)."""

    runtimes = ("llama.cpp",)
    is_float = True
    block_size = 1

    def __init__(self, gguf_type: GGMLQuantizationType, dtype: torch.dtype, bits: int) -> None:
        self.gguf_type = gguf_type
        self.dtype = dtype
        self.bits = bits

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.gguf_type.name

    def bytes(self, shape: tuple[int, int]) -> int:
        out, in_f = self._require(shape)
        return out * in_f * self.bits // 8

    def _int_dtype(self) -> torch.dtype:
        return torch.int32 if self.bits == 32 else torch.int16

    def fit_grid(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> Grid:
        raise FormatError(f"{self.name} is a float format: it has no quantization grid")

    def quantize(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> QuantizedTensor:
        w = as_weight(w)
        self._require(tuple(w.shape))
        raw = w.to(self.dtype).view(self._int_dtype()).long()
        if self.bits == 16:
            raw = raw & 0xFFFF
        return QuantizedTensor(self.name, tuple(w.shape), raw, {})

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        raw = q.codes
        if self.bits == 16:
            raw = torch.where(raw >= 1 << 15, raw - (1 << 16), raw)
        return raw.to(self._int_dtype()).view(self.dtype).float()

    def grid_of(self, q: QuantizedTensor) -> Grid:
        raise FormatError(f"{self.name} is a float format: it has no quantization grid")

    def pack(self, q: QuantizedTensor) -> np.ndarray:
        vals = self.dequantize(q).to(self.dtype).view(self._int_dtype()).numpy()
        return np.ascontiguousarray(vals.astype(vals.dtype.newbyteorder("<"))).view(np.uint8).reshape(q.shape[0], -1)

    def unpack(self, data: np.ndarray, shape: tuple[int, int]) -> QuantizedTensor:
        out, in_f = self._require(shape)
        np_int = np.int32 if self.bits == 32 else np.int16
        raw = np.ascontiguousarray(data, dtype=np.uint8).view(np.dtype(np_int).newbyteorder("<")).reshape(out, in_f)
        codes = torch.from_numpy(raw.astype(np.int64))
        if self.bits == 16:
            codes = codes & 0xFFFF
        return QuantizedTensor(self.name, (out, in_f), codes, {})


F32 = FloatFormat(GGMLQuantizationType.F32, torch.float32, 32)
F16 = FloatFormat(GGMLQuantizationType.F16, torch.float16, 16)
BF16 = FloatFormat(GGMLQuantizationType.BF16, torch.bfloat16, 16)
