"""The generic integer grids ``int{b}-g{gs}-{sym|asym}`` and ``int{b}-ch-{sym|asym}``.

The grid is the project's RTN grid, bit for bit (``autocompress.compress.quantize.rtn_quantize``):

- symmetric: scale = max|w| / (2^(b-1) - 1) per group, codes clamp(round(w / scale), ±(2^(b-1) - 1));
- asymmetric: lo = min(w, 0), hi = max(w, 0), scale = (hi - lo) / (2^b - 1), zero = round(-lo / scale),
  codes clamp(round(w / scale) + zero, 0, 2^b - 1), value (code - zero) · scale;
- an all-zero group has scale 1; groups run along the input; the last group may be partial (576 =
  4×128 + 64); ``-ch-`` is one group per row. Importance is ignored (no runtime's quantizer uses it).

Scales stay float32 in ``params`` (as the project always computed them); runtimes store them in the
model's dtype (fp16/bf16) or, for our fp32 ONNX exports, fp32. Storage per family (``bytes``):

| family | codes | scale | zero point (asym) |
|---|---|---|---|
| onnxruntime MatMulNBits: b ∈ {4, 8}, gs a power of two 16..256 | ceil(in/gs) blocks × gs·b/8 B (last block padded) | fp32 (the export's input dtype) | b bits per block, each row's padded to a byte |
| compressed-tensors ``pack-quantized`` (int4-g128-sym, what vLLM loads) | 8 codes per int32, ceil(in/8) int32 | bf16/fp16 ``weight_scale`` (2 B) | - |
| int8-ch-sym (torchao / TensorRT-LLM / vLLM int8 weight-only) | 1 B | 2 B per row | - |
| any other (research runtime "torch") | b bits, packed | 2 B | b bits |

``pack`` writes each row as codes ++ scales (float32, little-endian, so ``unpack`` is exact) ++ zero
points: MatMulNBits' ``B`` blob (unsigned codes, symmetric ones offset by 2^(b-1), its default zero
point; two 4-bit codes per byte, low nibble first) and zero-point layout; compressed-tensors'
``pack_to_int32`` (signed codes + 8, code i of each int32 at bits 4i); int8 bytes for int8-ch-sym;
otherwise a little-endian bit stream. Where the runtime's scale dtype is 2 B, ``pack`` is therefore
2 B per group longer than ``bytes``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from autocompress.formats.base import Format, FormatError, Grid, QuantizedTensor, as_weight

MATMULNBITS_BITS = (4, 8)
MATMULNBITS_GROUPS = (16, 32, 64, 128, 256)


def grouped_scale_zero(
    w: torch.Tensor, bits: int, group: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Give (scale, zero or None) float32 [out, n_groups]: the project's RTN grid of w [out, in]."""
    out, in_f = w.shape
    pad = (-in_f) % group
    g = (F.pad(w, (0, pad)) if pad else w).reshape(out, -1, group)  # zero padding never changes a grid
    if symmetric:
        scale = g.abs().amax(dim=-1) / (2 ** (bits - 1) - 1)
        lo = None
    else:
        lo = g.amin(dim=-1).clamp(max=0.0)
        hi = g.amax(dim=-1).clamp(min=0.0)
        scale = (hi - lo) / (2**bits - 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, None if lo is None else torch.round(-lo / scale)


def _bitstream(u: np.ndarray, bits: int) -> np.ndarray:
    """Give unsigned codes [N, k] (< 2^bits) as a little-endian bit stream [N, ceil(k·bits/8)]."""
    planes = (u[:, :, None] >> np.arange(bits, dtype=np.uint16)[None, None, :]) & 1
    return np.packbits(planes.reshape(len(u), -1).astype(np.uint8), axis=1, bitorder="little")


def _from_bitstream(b: np.ndarray, bits: int, k: int) -> np.ndarray:
    planes = np.unpackbits(b, axis=1, bitorder="little")[:, : k * bits].reshape(len(b), k, bits)
    return (planes.astype(np.int64) << np.arange(bits)[None, None, :]).sum(-1)


def _f32_bytes(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.numpy().astype("<f4")).view(np.uint8).reshape(len(x), -1)


def _f32_from(b: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(b).view("<f4").astype(np.float32))


class IntegerFormat(Format):
    """A generic integer grid: ``bits`` bits, ``group_size`` inputs per scale (None: one per row)."""

    is_float = False

    def __init__(self, bits: int, group_size: int | None, symmetric: bool) -> None:
        self.bits = bits
        self.group_size = group_size
        self.symmetric = symmetric

    @property
    def name(self) -> str:  # type: ignore[override]
        g = "ch" if self.group_size is None else f"g{self.group_size}"
        return f"int{self.bits}-{g}-{'sym' if self.symmetric else 'asym'}"

    @property
    def block_size(self) -> int | None:  # type: ignore[override]
        return self.group_size

    @property
    def layout(self) -> str:
        """Give the storage family: matmulnbits, compressed-tensors, int8-channel or bitstream."""
        if self.bits == 4 and self.group_size == 128 and self.symmetric:
            return "compressed-tensors"
        if self.bits in MATMULNBITS_BITS and self.group_size in MATMULNBITS_GROUPS:
            return "matmulnbits"
        if self.bits == 8 and self.group_size is None and self.symmetric:
            return "int8-channel"
        return "bitstream"

    @property
    def runtimes(self) -> tuple[str, ...]:  # type: ignore[override]
        rt = ["torch"]
        if self.bits in MATMULNBITS_BITS and self.group_size in MATMULNBITS_GROUPS:
            rt.append("onnxruntime")
        if self.layout in ("compressed-tensors", "int8-channel"):
            rt += ["tensorrt-llm", "torchao", "vllm"]
        return tuple(rt)

    @property
    def levels(self) -> torch.Tensor:
        if self.symmetric:
            q = 2 ** (self.bits - 1) - 1
            return torch.arange(-q, q + 1, dtype=torch.float32)
        return torch.arange(0, 2**self.bits, dtype=torch.float32)

    def _group(self, in_f: int) -> int:
        return in_f if self.group_size is None else max(1, min(int(self.group_size), in_f))

    def check(self, shape):
        if len(shape) != 2 or min(shape) < 1:
            return f"{self.name} stores 2-D [out, in] tensors, got shape {tuple(shape)}"
        return None

    def bytes(self, shape):
        out, in_f = self._require(shape)
        b = self.bits
        groups = math.ceil(in_f / self._group(in_f))
        zero = 0 if self.symmetric else math.ceil(groups * b / 8)
        if self.layout == "matmulnbits":
            return out * (groups * (self.group_size * b // 8 + 4) + zero)
        if self.layout == "compressed-tensors":
            return out * (math.ceil(in_f / 8) * 4 + groups * 2)
        if self.layout == "int8-channel":
            return out * (in_f + 2)
        return out * (math.ceil(in_f * b / 8) + groups * 2 + zero)

    def fit_grid(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> Grid:
        w = as_weight(w)
        self._require(tuple(w.shape))
        scale, zero = grouped_scale_zero(w, self.bits, self._group(w.shape[1]), self.symmetric)
        params = {"scale": scale} if zero is None else {"scale": scale, "zero": zero}
        return self._grid(params, w.shape[1])

    def _grid(self, params: dict[str, torch.Tensor], in_f: int) -> Grid:
        return Grid(params["scale"], None, self.levels, self._group(in_f), zero=params.get("zero"), params=params)

    def grid_of(self, q: QuantizedTensor) -> Grid:
        return self._grid(q.params, q.shape[1])

    # --- bytes ------------------------------------------------------------------------------
    def _unsigned(self, codes: torch.Tensor) -> np.ndarray:
        """Give codes as the stored unsigned integers (the level index, except as noted in the table)."""
        c = codes.numpy().astype(np.int64)
        if self.symmetric and self.layout != "bitstream":
            c = c - (2 ** (self.bits - 1) - 1)  # the signed code
            c = c & 0xFF if self.layout == "int8-channel" else c + 2 ** (self.bits - 1)
        return c.astype(np.uint16)

    def _codes_back(self, u: np.ndarray) -> torch.Tensor:
        c = u.astype(np.int64)
        if self.symmetric and self.layout != "bitstream":
            c = np.where(c >= 128, c - 256, c) if self.layout == "int8-channel" else c - 2 ** (self.bits - 1)
            c = c + (2 ** (self.bits - 1) - 1)
        return torch.from_numpy(c)

    def pack(self, q: QuantizedTensor) -> np.ndarray:
        out, in_f = self._require(q.shape)
        if self.layout == "matmulnbits":
            codes, scales, zero = matmulnbits_blocks(q, self.bits, self.group_size)
            parts = [codes.reshape(out, -1), np.ascontiguousarray(scales.astype("<f4")).view(np.uint8)]
            return np.concatenate(parts if zero is None else [*parts, zero], axis=1)
        u = self._unsigned(q.codes)
        if self.layout == "compressed-tensors":
            u = np.pad(u, ((0, 0), (0, (-in_f) % 8))).astype(np.uint32).reshape(out, -1, 8)
            words = (u << (4 * np.arange(8, dtype=np.uint32))[None, None, :]).sum(-1).astype("<u4")
            codes = np.ascontiguousarray(words).view(np.uint8).reshape(out, -1)
        elif self.layout == "int8-channel":
            codes = u.astype(np.uint8)
        else:
            codes = _bitstream(u, self.bits)
        parts = [codes.astype(np.uint8), _f32_bytes(q.params["scale"])]
        if not self.symmetric:
            parts.append(_bitstream(q.params["zero"].numpy().astype(np.uint16), self.bits))
        return np.concatenate(parts, axis=1)

    def unpack(self, data: np.ndarray, shape) -> QuantizedTensor:
        out, in_f = self._require(shape)
        gs = self._group(in_f)
        groups = math.ceil(in_f / gs)
        data = np.ascontiguousarray(data, dtype=np.uint8).reshape(out, -1)
        if self.layout == "matmulnbits":
            n = groups * self.group_size * self.bits // 8  # whole blocks, also when a row is shorter than one
            raw = data[:, :n]
            u = np.stack([raw & 15, raw >> 4], axis=2).reshape(out, -1) if self.bits == 4 else raw
            u = u[:, :in_f]
        elif self.layout == "compressed-tensors":
            n = math.ceil(in_f / 8) * 4
            words = data[:, :n].copy().view("<u4").astype(np.uint32)
            u = ((words[:, :, None] >> (4 * np.arange(8, dtype=np.uint32))[None, None, :]) & 15).reshape(out, -1)[
                :, :in_f
            ]
        elif self.layout == "int8-channel":
            n = in_f
            u = data[:, :n]
        else:
            n = math.ceil(in_f * self.bits / 8)
            u = _from_bitstream(data[:, :n], self.bits, in_f)
        params = {"scale": _f32_from(data[:, n : n + 4 * groups])}
        if not self.symmetric:
            z = data[:, n + 4 * groups :]
            if self.layout == "matmulnbits" and self.bits == 4:
                z = np.stack([z & 15, z >> 4], axis=2).reshape(out, -1)[:, :groups]
            elif self.layout != "matmulnbits":
                z = _from_bitstream(z, self.bits, groups)
            params["zero"] = torch.from_numpy(z.astype(np.float32))
        return QuantizedTensor(self.name, (out, in_f), self._codes_back(u), params)


def matmulnbits_blocks(q: QuantizedTensor, bits: int, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Give a generic-grid tensor in onnxruntime MatMulNBits' layout, ``bits``-bit cells in blocks of ``block`` inputs.

    Returns (B uint8 [out, k_blocks, block·bits/8], scales float32 [out, k_blocks], zero points uint8
    [out, ceil(k_blocks·bits/8)] or None when symmetric): unsigned codes (symmetric ones offset by
    2^(bits-1), MatMulNBits' default zero point), two 4-bit codes or zero points per byte, low nibble
    first, the last block padded (code 2^(bits-1) when symmetric, else 0; the kernel never reads past K). Cells may be
    wider than the grid (3-bit codes in 4-bit cells: the same values); each group must be whole
    blocks (a group of 48 in 16-blocks: its scale repeated), so the values are the tensor's exactly.
    """
    fmt = parse_generic(q.format)
    if fmt is None:
        raise FormatError(f"{q.format} is not a generic integer grid: MatMulNBits stores only those")
    out, in_f = q.shape
    gs = fmt._group(in_f)
    if bits not in MATMULNBITS_BITS or bits < fmt.bits:
        raise FormatError(f"{q.format} does not fit MatMulNBits {bits}-bit cells")
    if block not in MATMULNBITS_GROUPS or (gs % block and gs < in_f):
        raise FormatError(f"{q.format}: groups of {gs} are not whole MatMulNBits blocks of {block}")
    k_blocks = math.ceil(in_f / block)
    group_of = torch.arange(k_blocks) * block // gs
    c = q.codes.numpy().astype(np.int64)
    if fmt.symmetric:  # level index -> signed code -> MatMulNBits' unsigned code
        c = c - (2 ** (fmt.bits - 1) - 1) + 2 ** (bits - 1)
    pad_code = 2 ** (bits - 1) if fmt.symmetric else 0
    u = np.pad(c, ((0, 0), (0, k_blocks * block - in_f)), constant_values=pad_code).astype(np.uint8)
    codes = u[:, 0::2] | (u[:, 1::2] << 4) if bits == 4 else u
    scales = q.params["scale"][:, group_of].numpy().astype(np.float32)
    if fmt.symmetric:
        return codes.reshape(out, k_blocks, -1), scales, None
    z = q.params["zero"][:, group_of].numpy().astype(np.uint8)
    if bits == 4:
        z = np.pad(z, ((0, 0), (0, k_blocks % 2)))
        z = z[:, 0::2] | (z[:, 1::2] << 4)
    return codes.reshape(out, k_blocks, -1), scales, z


def parse_generic(name: str) -> IntegerFormat | None:
    """Give the generic format a name ``int{b}-g{gs}-{sym|asym}`` / ``int{b}-ch-{sym|asym}`` denotes, or None."""
    parts = name.split("-")
    if len(parts) != 3 or not parts[0].startswith("int") or parts[2] not in ("sym", "asym"):
        return None
    try:
        bits = int(parts[0][3:])
        group = None if parts[1] == "ch" else int(parts[1].removeprefix("g")) if parts[1].startswith("g") else -1
    except ValueError:
        return None
    if not 2 <= bits <= 8 or (group is not None and group < 1):
        return None
    return IntegerFormat(bits, group, parts[2] == "sym")


def generic(bits: int, group_size: int | None, symmetric: bool) -> IntegerFormat:
    """Give the generic integer grid with these parameters (bits 2..8; group_size None = per channel)."""
    if not 2 <= int(bits) <= 8:
        raise FormatError(f"generic integer grids have 2..8 bits, got {bits}")
    if group_size is not None and int(group_size) < 1:
        raise FormatError(f"group size must be a positive integer or None (per channel), got {group_size}")
    return IntegerFormat(int(bits), None if group_size is None else int(group_size), bool(symmetric))
