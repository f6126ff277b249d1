"""MLC-LLM's group quantization ``q4f16_1`` and ``q3f16_1`` (``mlc_llm/quantization/group_quantization.py``).

MLC computes, in the model dtype fp16: max_int = 2^(b-1) - 1, scale = max|w| / max_int per group,
stored code = clamp(round(w / scale + max_int), 0, 2·max_int) in uint32 words (``32 // b`` codes a
word), value (code - max_int) · scale in fp16. q4f16_1: 4 bits, groups of 32 (8 codes a word);
q3f16_1: 3 bits, groups of 40 (10 codes a word, 2 bits unused). A partial last group is padded
(MLC's ``ceildiv``), so every row width is storable.

Here the scale is the fp16 rounding of max|w| / max_int (one rounding, as an fp16 division), codes
are the nearest level under that stored scale (MLC rounds w / scale + max_int in fp16, which differs
only at near-ties), and ``dequantize`` rounds the product to fp16 as MLC's kernel does (``Grid.value``
is the exact fp32 product). An all-zero group stores scale 0 and the middle code. ``pack`` writes
each row as the uint32 words (code i of a word at bits b·i, little-endian) ++ the fp16 scales.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from autocompress.formats.base import Format, Grid, QuantizedTensor, as_weight


class MLCGroupFormat(Format):
    """One MLC group-quantization mode (symmetric ints, an fp16 scale per group)."""

    runtimes = ("mlc-llm",)
    symmetric = True

    def __init__(self, name: str, bits: int, group_size: int) -> None:
        self._name = name
        self.bits = bits
        self.group_size = group_size

    @property
    def name(self) -> str:  # type: ignore[override]
        return self._name

    @property
    def block_size(self) -> int:  # type: ignore[override]
        return self.group_size

    @property
    def max_int(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def levels(self) -> torch.Tensor:
        return torch.arange(-self.max_int, self.max_int + 1, dtype=torch.float32)

    def check(self, shape):
        if len(shape) != 2 or min(shape) < 1:
            return f"{self.name} stores 2-D [out, in] tensors, got shape {tuple(shape)}"
        return None

    def _words_per_group(self) -> int:
        return self.group_size // (32 // self.bits)

    def bytes(self, shape):
        out, in_f = self._require(shape)
        return out * math.ceil(in_f / self.group_size) * (4 * self._words_per_group() + 2)

    def fit_grid(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> Grid:
        w = as_weight(w)
        out, in_f = self._require(tuple(w.shape))
        g = F.pad(w, (0, (-in_f) % self.group_size)).reshape(out, -1, self.group_size)
        scale = (g.half().float().abs().amax(-1) / self.max_int).half()
        return self._grid({"scale": scale})

    def _grid(self, params):
        return Grid(params["scale"].float(), None, self.levels, self.group_size, params=params)

    def grid_of(self, q: QuantizedTensor) -> Grid:
        return self._grid(q.params)

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        return self.grid_of(q).value(q.codes).half().float()

    def pack(self, q: QuantizedTensor) -> np.ndarray:
        out, in_f = self._require(q.shape)
        per_word = 32 // self.bits
        u = q.codes.numpy().astype(np.uint32)  # level index = stored code (code - max_int is the level)
        u = np.pad(u, ((0, 0), (0, (-in_f) % self.group_size)), constant_values=self.max_int).reshape(out, -1, per_word)
        words = (u << (self.bits * np.arange(per_word, dtype=np.uint32))[None, None, :]).sum(-1).astype("<u4")
        scales = np.ascontiguousarray(q.params["scale"].numpy().astype("<f2")).view(np.uint8)
        return np.concatenate([np.ascontiguousarray(words).view(np.uint8).reshape(out, -1), scales], axis=1)

    def unpack(self, data: np.ndarray, shape) -> QuantizedTensor:
        out, in_f = self._require(shape)
        per_word = 32 // self.bits
        groups = math.ceil(in_f / self.group_size)
        n = groups * self._words_per_group() * 4
        data = np.ascontiguousarray(data, dtype=np.uint8).reshape(out, -1)
        words = data[:, :n].copy().view("<u4").astype(np.uint32)
        mask = np.uint32((1 << self.bits) - 1)
        u = (words[:, :, None] >> (self.bits * np.arange(per_word, dtype=np.uint32))[None, None, :]) & mask
        codes = torch.from_numpy(u.reshape(out, -1)[:, :in_f].astype(np.int64))
        scale = torch.from_numpy(data[:, n:].copy().view("<f2").astype(np.float16))
        return QuantizedTensor(self.name, (out, in_f), codes, {"scale": scale})


Q4F16_1 = MLCGroupFormat("q4f16_1", 4, 32)
Q3F16_1 = MLCGroupFormat("q3f16_1", 3, 40)
