"""GGUF's 32-weight block types: Q8_0, Q5_1, Q5_0, Q4_1, Q4_0 and IQ4_NL.

``quantize`` is what llama-quantize writes: without importance the reference quantizers
``quantize_row_*_ref`` (codes from the fp32 scale's inverse: truncation of ``x·id + 8.5`` for Q4_0,
``roundf`` for Q8_0, ...), with importance (an imatrix) ``quantize_row_*_impl``: ``make_qx_quants``
(Q4_0/Q5_0) or ``make_qkx3_quants`` (Q4_1/Q5_1) on weights ``qw·sqrt(σ² + x²)``, σ² the row's mean
square, keeping the search's codes. Q8_0 has no weighted variant and ignores importance. IQ4_NL: 16
non-linear levels (``kvalues_iq4nl``) times an fp16 scale per 32 weights, ``quantize_iq4_nl`` (15
trial scales; weights x² without an imatrix), codes from the fp32 scale as llama.cpp does.

Measured (tests/formats and a ctypes harness around llama.cpp's ggml-quants.c built with
``-ffp-contract=off``): our bytes equal the C code's on Gaussian, heavy-tailed, positive, tiny,
on-grid and sparse tensors, with and without an imatrix, and equal gguf-py's ``quantize``. The one
known gguf-py deviation is a block of only ±0 that starts with -0: its fp16 d is -0 in C (what we
write) and +0 in gguf-py; the values are the same. ``fit_grid`` + ``Grid.round`` (what GPTQ uses)
take the nearest level under the stored fp16 scale instead.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf.constants import GGMLQuantizationType as T

from autocompress.formats.ggml import (
    GGUFFormat,
    f16,
    fp16_bytes,
    fp16_from,
    from_nibbles,
    nibbles,
    over_chunks,
)
from autocompress.formats.search import (
    iq4_nl_scale,
    make_qkx_quants,
    make_qx_quants,
    nearest_level,
    seqsum,
    signed_absmax,
    sqrtf,
)

IQ4_NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def _levels(lo: int, hi: int) -> torch.Tensor:
    return torch.arange(lo, hi + 1, dtype=torch.float32)


def _row_weights(w: torch.Tensor, qw: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Give (x, weights) as [blocks, block]: llama.cpp's qw·sqrt(σ² + x²), σ² = the row's mean square."""
    sigma2 = seqsum(w * w)[:, None] / w.shape[1]
    return w.reshape(-1, block), (qw * sqrtf(sigma2 + w * w)).reshape(-1, block)


def _qh_bytes(c: np.ndarray) -> np.ndarray:
    """Give the fifth bit of 32 codes as ggml's uint32 ``qh`` (bit j = code j), little-endian bytes [N, 4]."""
    return np.packbits((c >> 4) & 1, axis=1, bitorder="little")


def _qh_bits(b: np.ndarray) -> np.ndarray:
    return np.unpackbits(b, axis=1, bitorder="little")


def np_roundf(x: torch.Tensor) -> torch.Tensor:
    """Give x rounded half away from zero, exactly (C ``roundf``; gguf-py's ``np_roundf``)."""
    a = x.abs()
    fl = torch.floor(a)
    return torch.sign(x) * (fl + torch.floor(2 * (a - fl)))


class _Symmetric32(GGUFFormat):
    """Q4_0 / Q5_0: d·(q - 2^(b-1)), d = max / -2^(b-1) (the signed extreme maps to the lowest code)."""

    symmetric = True
    group_size = 32

    def __init__(self, gguf_type: T, bits: int) -> None:
        self.gguf_type = gguf_type
        self.bits = bits
        self.levels = _levels(-(1 << (bits - 1)), (1 << (bits - 1)) - 1)

    def _fit(self, w, qw):
        half = 1 << (self.bits - 1)
        if qw is None:
            x = w.reshape(-1, 32)
            mx = signed_absmax(x)
            d = torch.where(mx == 0, 0.0, mx) / -half  # C's max starts at +0: a block of ±0 gives d = -0
            inv = torch.where(d == 0, 0.0, 1 / d)
            codes = torch.trunc(x * inv[:, None] + (half + 0.5)).clamp_(0, 2 * half - 1)
        else:
            x, wt = _row_weights(w, qw, 32)
            d, codes = over_chunks(lambda a, b: make_qx_quants(a, half, b), x, wt)
        return {"d": f16(d).reshape(w.shape[0], -1)}, codes

    def _scale_offset(self, p):
        return p["d"].float(), None

    def _pack_blocks(self, c, p):
        parts = [fp16_bytes(p["d"])]
        if self.bits == 5:
            parts.append(_qh_bytes(c))
        parts.append(nibbles(c & 15))
        return np.concatenate(parts, axis=1)

    def _unpack_blocks(self, b):
        d = fp16_from(b[:, :2])
        c = from_nibbles(b[:, -16:])
        if self.bits == 5:
            c = c | (_qh_bits(b[:, 2:6]) << 4)
        return c, {"d": d}


class _Affine32(GGUFFormat):
    """Q4_1 / Q5_1: d·q + m, d = (max - min) / (2^b - 1), m = min."""

    symmetric = False
    group_size = 32

    def __init__(self, gguf_type: T, bits: int) -> None:
        self.gguf_type = gguf_type
        self.bits = bits
        self.levels = _levels(0, (1 << bits) - 1)

    def _fit(self, w, qw):
        nmax = (1 << self.bits) - 1
        if qw is None:
            x = w.reshape(-1, 32)
            lo, hi = x.min(1).values, x.max(1).values
            d, m = (hi - lo) / nmax, lo
            inv = torch.where(d == 0, 0.0, 1 / d)
            codes = torch.trunc((x - lo[:, None]) * inv[:, None] + 0.5).clamp_(0, nmax)
        else:
            x, wt = _row_weights(w, qw, 32)
            d, the_min, codes = over_chunks(
                lambda a, b: make_qkx_quants(a, b, nmax, -0.9, 0.05, 36, False, True), x, wt
            )
            m = -the_min
        out = w.shape[0]
        return {"d": f16(d).reshape(out, -1), "m": f16(m).reshape(out, -1)}, codes

    def _scale_offset(self, p):
        return p["d"].float(), p["m"].float()

    def _pack_blocks(self, c, p):
        parts = [fp16_bytes(p["d"]), fp16_bytes(p["m"])]
        if self.bits == 5:
            parts.append(_qh_bytes(c))
        parts.append(nibbles(c & 15))
        return np.concatenate(parts, axis=1)

    def _unpack_blocks(self, b):
        d, m = fp16_from(b[:, :2]), fp16_from(b[:, 2:4])
        c = from_nibbles(b[:, -16:])
        if self.bits == 5:
            c = c | (_qh_bits(b[:, 4:8]) << 4)
        return c, {"d": d, "m": m}


class Q8_0Format(GGUFFormat):
    """Q8_0: d·q, q int8, d = max|x| / 127, q = roundf(x / d) (codes index levels -128..127)."""

    gguf_type = T.Q8_0
    bits = 8
    group_size = 32
    symmetric = True
    levels = _levels(-128, 127)

    def _fit(self, w, qw):
        x = w.reshape(-1, 32)
        d = x.abs().amax(1) / 127
        inv = torch.where(d == 0, 0.0, 1 / d)
        q = np_roundf(x * inv[:, None]).clamp_(-128, 127)
        return {"d": f16(d).reshape(w.shape[0], -1)}, q + 128

    def _scale_offset(self, p):
        return p["d"].float(), None

    def _pack_blocks(self, c, p):
        return np.concatenate([fp16_bytes(p["d"]), (c.astype(np.int16) - 128).astype(np.int8).view(np.uint8)], axis=1)

    def _unpack_blocks(self, b):
        return b[:, 2:].view(np.int8).astype(np.int16) + 128, {"d": fp16_from(b[:, :2])}


class IQ4_NLFormat(GGUFFormat):
    """IQ4_NL: d·kvalues_iq4nl[q], one fp16 d per 32 weights."""

    gguf_type = T.IQ4_NL
    bits = 4
    group_size = 32
    symmetric = True
    levels = torch.tensor(IQ4_NL_VALUES, dtype=torch.float32)

    def _fit(self, w, qw):
        x = w.reshape(-1, 32)
        sigma2 = 2 * seqsum(x * x)[:, None] / 32  # per block: the 32-block is its own super-block
        wt = x * x if qw is None else qw.reshape(-1, 32) * sqrtf(sigma2 + x * x)
        (d,) = over_chunks(lambda a, b: (iq4_nl_scale(a, b, self.levels),), x, wt)
        inv = torch.where(d == 0, 0.0, 1 / torch.where(d == 0, 1.0, d))
        codes = nearest_level(inv[:, None] * x, self.levels)  # llama.cpp codes with the fp32 scale
        return {"d": f16(d).reshape(w.shape[0], -1)}, codes

    def _scale_offset(self, p):
        return p["d"].float(), None

    def _pack_blocks(self, c, p):
        return np.concatenate([fp16_bytes(p["d"]), nibbles(c)], axis=1)

    def _unpack_blocks(self, b):
        return from_nibbles(b[:, 2:]), {"d": fp16_from(b[:, :2])}


Q8_0 = Q8_0Format()
Q5_1 = _Affine32(T.Q5_1, 5)
Q5_0 = _Symmetric32(T.Q5_0, 5)
Q4_1 = _Affine32(T.Q4_1, 4)
Q4_0 = _Symmetric32(T.Q4_0, 4)
IQ4_NL = IQ4_NLFormat()
