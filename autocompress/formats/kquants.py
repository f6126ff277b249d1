"""GGUF's K-quants: 256-weight super-blocks with sub-block scales (Q6_K, Q5_K, Q4_K, Q3_K, Q2_K).

Scales are searched as llama.cpp's ``quantize_row_q*_K_ref`` (no importance) or
``quantize_row_q*_K_impl`` (with an imatrix: weights ``qw·sqrt(σ² + x²)``, sub-block scales and mins
quantized by ``make_qp_quants``/``make_qx_quants``); then every code is llama.cpp's requantization
``nearest_int((x + dm) / d)`` under the stored scales, except in sub-blocks whose scale is 0, where
the search's codes stay (``if (!d) continue``). The searches add in C order and divide and take
square roots correctly rounded (``search``), so the bytes equal llama.cpp's C code (built without
FMA contraction) on every tensor we compared, with and without an imatrix.

Stored parameters (``QuantizedTensor.params``), per tensor of ``nb = in / 256`` super-blocks per row:

| type | d, dmin (fp16, [out, nb]) | sub-block data ([out, nb · subs]) | value |
|---|---|---|---|
| Q6_K | d | ``scales`` int8, 16 per block | d·sc·q, q -32..31 |
| Q5_K | d, dmin | ``scales``, ``mins`` 6-bit, 8 per block | d·sc·q - dmin·m, q 0..31 |
| Q4_K | d, dmin | ``scales``, ``mins`` 6-bit, 8 per block | d·sc·q - dmin·m, q 0..15 |
| Q3_K | d | ``scales`` 6-bit signed (-32..31), 16 per block | d·sc·q, q -4..3 |
| Q2_K | d, dmin | ``scales``, ``mins`` 4-bit, 16 per block | d·sc·q - dmin·m, q 0..3 |
"""

from __future__ import annotations

import numpy as np
import torch
from gguf.constants import GGMLQuantizationType as T

from autocompress.formats.ggml import GGUFFormat, f16, fp16_bytes, fp16_from, over_chunks
from autocompress.formats.search import (
    make_q3_quants,
    make_qkx_quants,
    make_qp_quants,
    make_qx_quants,
    rdiv,
    seqsum,
    signed_absmax,
    sqrtf,
)

QK_K = 256


def _levels(lo: int, hi: int) -> torch.Tensor:
    return torch.arange(lo, hi + 1, dtype=torch.float32)


def _per_sub(d: torch.Tensor, subs: int, sc: torch.Tensor) -> torch.Tensor:
    """Give d (fp16 [out, nb]) times each sub-block's integer scale [out, nb·subs], in float32 (ggml's order)."""
    return d.float().repeat_interleave(subs, dim=1) * sc.float()


def _sub_weights(w: torch.Tensor, qw: torch.Tensor, sub: int, sigma_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Give (x, weights) as [sub-blocks, sub]: qw·sqrt(σ² + x²), σ² = sigma_factor · the super-block's mean square."""
    x = w.reshape(-1, QK_K)
    sigma2 = sigma_factor * seqsum(x * x)[:, None] / QK_K
    wt = qw.reshape(-1, QK_K) * sqrtf(sigma2 + x * x)
    return x.reshape(-1, sub), wt.reshape(-1, sub)


def _quantize_scales(values: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Give (integer scales 0..top [B, subs], super-scale [B]) as the _ref quantizers do: top / max."""
    mx = values.max(1).values
    mx = torch.where(mx > 0, mx, 0.0)  # C starts from +0 and keeps only larger values (never -0)
    inv = torch.where(mx > 0, rdiv(top, torch.where(mx > 0, mx, 1)), 0.0)
    return torch.round(inv[:, None] * values).clamp_(0, top), mx / top


class _KQuant(GGUFFormat):
    """Codes are llama.cpp's requantization (nearest under the stored scales), except in sub-blocks
    whose scale d·sc is 0, where it keeps its search's codes (``if (!d) continue``)."""

    def _reference_codes(self, nearest, ref, grid):
        dead = (grid.scale == 0).repeat_interleave(self.group_size, dim=1)
        return torch.where(dead, ref, nearest)


class _Affine(_KQuant):
    """Q5_K / Q4_K / Q2_K: d·sc·q - dmin·m per sub-block."""

    symmetric = False

    def __init__(self, gguf_type: T, bits: int, sub: int, scale_bits: int, ref: tuple[float, float, int, bool]) -> None:
        self.gguf_type = gguf_type
        self.bits = bits
        self.group_size = sub
        self.scale_bits = scale_bits
        self.ref = ref  # make_qkx2_quants' (rmin, rdelta, nstep, use_mad) in the _ref quantizer
        self.levels = _levels(0, (1 << bits) - 1)

    def _fit(self, w: torch.Tensor, qw: torch.Tensor | None) -> dict[str, torch.Tensor]:
        sub, nmax, top = self.group_size, (1 << self.bits) - 1, (1 << self.scale_bits) - 1
        subs = QK_K // sub
        if qw is None:
            x = w.reshape(-1, sub)
            # Q4_K / Q5_K weigh by av_x + |x| (av_x the sub-block's rms), Q2_K by |x|
            wt = sqrtf(seqsum(x * x)[:, None] / 32) + x.abs() if sub == 32 else x.abs()
            rmin, rdelta, nstep, mad = self.ref
            sc, mn, codes = over_chunks(
                lambda a, b: make_qkx_quants(a, b, nmax, rmin, rdelta, nstep, mad, False), x, wt
            )
            ls, d = _quantize_scales(sc.reshape(-1, subs), top)
            lm, dmin = _quantize_scales(mn.reshape(-1, subs), top)
        else:
            x, wt = _sub_weights(w, qw, sub, 2.0 if sub == 32 else 1.0)
            sc, mn, codes = over_chunks(lambda a, b: make_qkx_quants(a, b, nmax, -0.9, 0.05, 36, False, True), x, wt)
            sw = seqsum(wt).reshape(-1, subs)
            d, ls = make_qp_quants(sc.reshape(-1, subs), top, sw)
            dmin, lm = make_qp_quants(mn.reshape(-1, subs), top, sw)
        out = w.shape[0]
        return {
            "d": f16(d).reshape(out, -1),
            "dmin": f16(dmin).reshape(out, -1),
            "scales": ls.to(torch.uint8).reshape(out, -1),
            "mins": lm.to(torch.uint8).reshape(out, -1),
        }, codes

    def _scale_offset(self, p):
        subs = QK_K // self.group_size
        return _per_sub(p["d"], subs, p["scales"]), -_per_sub(p["dmin"], subs, p["mins"])

    def _pack_blocks(self, c, p):
        d, dmin = fp16_bytes(p["d"]), fp16_bytes(p["dmin"])
        ls, lm = p["scales"].astype(np.uint8), p["mins"].astype(np.uint8)
        n = len(c)
        if self.gguf_type == T.Q2_K:
            qs = (c.reshape(n, 2, 4, 32) << (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]).sum(2)
            return np.concatenate([ls | (lm << 4), qs.astype(np.uint8).reshape(n, 64), d, dmin], axis=1)
        scales = np.concatenate(
            [
                ls[:, :4] | ((ls[:, 4:] >> 4) << 6),
                lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
                (ls[:, 4:] & 15) | ((lm[:, 4:] & 15) << 4),
            ],
            axis=1,
        )
        lo = c.reshape(n, 4, 2, 32) & 15
        qs = (lo[:, :, 0] | (lo[:, :, 1] << 4)).reshape(n, 128)
        if self.gguf_type == T.Q4_K:
            return np.concatenate([d, dmin, scales, qs], axis=1)
        hi = (c.reshape(n, 8, 32) >> 4) & 1
        qh = (hi << np.arange(8, dtype=np.uint8)[None, :, None]).sum(1).astype(np.uint8)
        return np.concatenate([d, dmin, scales, qh, qs], axis=1)

    def _unpack_blocks(self, b):
        n = len(b)
        if self.gguf_type == T.Q2_K:
            sb, qs = b[:, :16], b[:, 16:80].reshape(n, 2, 1, 32)
            c = (qs >> (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]) & 3
            p = {"scales": sb & 15, "mins": sb >> 4, "d": fp16_from(b[:, 80:82]), "dmin": fp16_from(b[:, 82:84])}
            return c.reshape(n, 256), {k: torch.as_tensor(v) for k, v in p.items()}
        d, dmin, s = fp16_from(b[:, :2]), fp16_from(b[:, 2:4]), b[:, 4:16]
        ls = np.concatenate([s[:, :4] & 63, (s[:, 8:] & 15) | ((s[:, :4] >> 6) << 4)], axis=1)
        lm = np.concatenate([s[:, 4:8] & 63, (s[:, 8:] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
        qs = b[:, -128:].reshape(n, 4, 1, 32)
        c = np.concatenate([qs & 15, qs >> 4], axis=2).reshape(n, 256)
        if self.gguf_type == T.Q5_K:
            qh = b[:, 16:48].reshape(n, 1, 32)
            c = c | (((qh >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1).reshape(n, 256) << 4)
        return c, {"d": d, "dmin": dmin, "scales": torch.from_numpy(ls.copy()), "mins": torch.from_numpy(lm.copy())}


class Q6_KFormat(_KQuant):
    """Q6_K: d·sc·q, q -32..31, 16 int8 sub-block scales per 256 weights."""

    gguf_type = T.Q6_K
    bits = 6
    group_size = 16
    symmetric = True
    levels = _levels(-32, 31)

    def _fit(self, w, qw):
        x = w.reshape(-1, 16)
        q = None if qw is None else qw.reshape(-1, 16)
        sc, codes = over_chunks(lambda a, b: make_qx_quants(a, 32, b), x, q)
        sc = sc.reshape(-1, 16)
        mx = signed_absmax(sc)
        dead = mx.abs() < 1e-15
        iscale = rdiv(-128, torch.where(dead, torch.ones_like(mx), mx))
        ls = torch.round(iscale[:, None] * sc).clamp_(-128, 127)
        d = torch.where(dead, 0.0, 1 / iscale)
        ls = torch.where(dead[:, None], 0.0, ls)
        codes = torch.where(dead.repeat_interleave(16)[:, None], 0.0, codes)  # llama.cpp zeroes such blocks
        out = w.shape[0]
        return {"d": f16(d).reshape(out, -1), "scales": ls.to(torch.int8).reshape(out, -1)}, codes

    def _scale_offset(self, p):
        return _per_sub(p["d"], 16, p["scales"]), None

    def _pack_blocks(self, c, p):
        n = len(c)
        c = c.reshape(n, 2, 4, 32)
        lo, hi = c & 15, c >> 4
        ql = np.concatenate([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], axis=2)
        qh = (hi << (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]).sum(2).astype(np.uint8)
        sc = p["scales"].astype(np.int8).view(np.uint8)
        return np.concatenate([ql.reshape(n, 128), qh.reshape(n, 64), sc, fp16_bytes(p["d"])], axis=1)

    def _unpack_blocks(self, b):
        n = len(b)
        ql = b[:, :128].reshape(n, 2, 1, 64)
        lo = np.concatenate([ql & 15, ql >> 4], axis=2).reshape(n, 2, 4, 32)
        qh = b[:, 128:192].reshape(n, 2, 1, 32)
        hi = (qh >> (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]) & 3
        c = (lo | (hi << 4)).reshape(n, 256)
        sc = torch.from_numpy(b[:, 192:208].copy().view(np.int8))
        return c, {"d": fp16_from(b[:, 208:210]), "scales": sc}


class Q3_KFormat(_KQuant):
    """Q3_K: d·sc·q, q -4..3 (2 low bits + a high-bit mask), 16 signed 6-bit scales per 256 weights."""

    gguf_type = T.Q3_K
    bits = 3
    group_size = 16
    symmetric = True
    levels = _levels(-4, 3)

    def _fit(self, w, qw):
        if qw is None:
            sc, codes = over_chunks(lambda a: make_q3_quants(a, 4), w.reshape(-1, 16))
            sc = sc.reshape(-1, 16)
            mx = signed_absmax(sc)
            dead = mx == 0
            iscale = rdiv(-32, torch.where(dead, torch.ones_like(mx), mx))
            ls = torch.round(iscale[:, None] * sc).clamp_(-32, 31)
            d = torch.where(dead, 0.0, 1 / iscale)
            ls = torch.where(dead[:, None], -32.0, ls)  # llama.cpp leaves the scale bytes 0 (= -32)
        else:
            x, wt = _sub_weights(w, qw, 16, 2.0)
            sc, codes = over_chunks(lambda a, b: make_qx_quants(a, 4, b), x, wt)
            d, ls = make_qx_quants(sc.reshape(-1, 16), 32, seqsum(wt).reshape(-1, 16))
            ls = ls - 32
        out = w.shape[0]
        return {"d": f16(d).reshape(out, -1), "scales": ls.to(torch.int8).reshape(out, -1)}, codes

    def _scale_offset(self, p):
        return _per_sub(p["d"], 16, p["scales"]), None

    def _pack_blocks(self, c, p):
        n = len(c)
        hm = (((c.reshape(n, 8, 32) >> 2) & 1) << np.arange(8, dtype=np.uint8)[None, :, None]).sum(1).astype(np.uint8)
        low = c.reshape(n, 2, 4, 32) & 3
        qs = (low << (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]).sum(2).astype(np.uint8).reshape(n, 64)
        lv = (p["scales"].astype(np.int16) + 32).astype(np.uint8)
        hi = (lv >> 4).reshape(n, 4, 4)
        scales = np.concatenate(
            [
                (lv[:, :8] & 15) | ((lv[:, 8:] & 15) << 4),
                (hi << (2 * np.arange(4, dtype=np.uint8))[None, :, None]).sum(1),
            ],
            axis=1,
        ).astype(np.uint8)
        return np.concatenate([hm, qs, scales, fp16_bytes(p["d"])], axis=1)

    def _unpack_blocks(self, b):
        n = len(b)
        hm = b[:, :32].reshape(n, 1, 32)
        high = ((hm >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1).reshape(n, 256)
        qs = b[:, 32:96].reshape(n, 2, 1, 32)
        low = ((qs >> (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]) & 3).reshape(n, 256)
        s = b[:, 96:108]
        lv = np.concatenate([s[:, :8] & 15, s[:, :8] >> 4], axis=1)
        hi = (s[:, None, 8:12] >> (2 * np.arange(4, dtype=np.uint8))[None, :, None]) & 3  # [n, g, i]
        lv = lv | (hi.reshape(n, 16) << 4)
        sc = torch.from_numpy((lv.astype(np.int16) - 32).astype(np.int8))
        return low | (high << 2), {"d": fp16_from(b[:, 108:110]), "scales": sc}


Q6_K = Q6_KFormat()
Q5_K = _Affine(T.Q5_K, 5, 32, 6, (-0.5, 0.1, 15, False))
Q4_K = _Affine(T.Q4_K, 4, 32, 6, (-1.0, 0.1, 20, False))
Q3_K = Q3_KFormat()
Q2_K = _Affine(T.Q2_K, 2, 16, 4, (-0.5, 0.1, 15, True))
