"""The three shapes every storage format shares: a ``Grid`` (what GPTQ rounds onto), a
``QuantizedTensor`` (codes + the scale data exactly as stored) and the ``Format`` protocol.

A format quantizes an ``[out, in]`` weight along its input (row) dimension, as every runtime here
stores it. Values are always ``scale * level + offset`` per group of ``group`` input columns, or
``(level - zero) * scale`` for the generic asymmetric grids (kept so old plans reproduce bit for bit),
computed in float32 in exactly the order the runtime's dequantizer uses, so
``Format.dequantize`` equals the runtime's numbers, not just approximately.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from autocompress.errors import AutocompressError


class FormatError(AutocompressError, ValueError):
    """A format name is unknown, or a tensor shape cannot be stored in a format."""


def expand(per_group: torch.Tensor, group: int, in_features: int) -> torch.Tensor:
    """Give a per-group tensor [out, n_groups] repeated over each group's columns: [out, in_features]."""
    return per_group.repeat_interleave(group, dim=1)[:, :in_features]


@dataclass(frozen=True)
class Grid:
    """The fixed quantization parameters of a whole [out, in] tensor: what GPTQ rounds onto.

    ``scale`` / ``offset`` / ``zero`` are float32 [out, n_groups]; ``levels`` float32 [L] sorted. A
    code c in group g means ``scale[g] * levels[c] + offset[g]``, or ``(levels[c] - zero[g]) *
    scale[g]`` when ``zero`` is set (generic asymmetric integer grids only). ``params`` is the
    format's stored scale data this grid was computed from (what ``Format.from_codes`` stores), None
    for a grid built by hand.
    """

    scale: torch.Tensor
    offset: torch.Tensor | None
    levels: torch.Tensor
    group: int
    zero: torch.Tensor | None = None
    params: dict[str, torch.Tensor] | None = None

    def _uniform(self) -> bool:
        lv = self.levels
        return bool(torch.equal(lv, torch.arange(int(lv[0]), int(lv[0]) + len(lv), dtype=lv.dtype)))

    def _index_of_zero(self) -> int:
        return int(self.levels.abs().argmin())

    def round(self, x: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Give (codes int64, dequantized float32) of x [out, k] = input columns start..start+k-1, nearest level.

        Ties go to the upper level for non-uniform grids (llama.cpp's ``best_index_int8``) and to the
        even integer for uniform ones (its ``nearest_int``). A group whose scale is 0 takes the level
        nearest to 0 (any level gives the same value there).
        """
        x = x.float()
        cols = torch.arange(start, start + x.shape[1]) // self.group
        s = self.scale[:, cols]
        lv = self.levels
        if self.zero is not None:
            z = self.zero[:, cols]
            q = torch.round(x / s).add_(z).clamp_(float(lv[0]), float(lv[-1]))
            return (q - lv[0]).long(), (q - z) * s
        o = None if self.offset is None else self.offset[:, cols]
        t = x / s if o is None else (x - o) / s
        dead = s == 0
        t = torch.where(dead, torch.zeros_like(t), t)
        if self._uniform():
            idx = (torch.round(t) - lv[0]).clamp_(0, len(lv) - 1).long()
        else:
            idx = torch.bucketize(t, (lv[1:] + lv[:-1]) / 2, right=True)
        idx = torch.where(dead, torch.full_like(idx, self._index_of_zero()), idx)
        deq = lv[idx] * s
        return idx, deq if o is None else deq + o

    def value(self, codes: torch.Tensor) -> torch.Tensor:
        """Give the dequantized float32 [out, in] of full codes [out, in]."""
        in_f = codes.shape[1]
        s = expand(self.scale, self.group, in_f)
        lv = self.levels[codes]
        if self.zero is not None:
            return (lv - expand(self.zero, self.group, in_f)) * s
        v = lv * s
        return v if self.offset is None else v + expand(self.offset, self.group, in_f)


@dataclass(frozen=True)
class QuantizedTensor:
    """A stored tensor: codes int64 [out, in] (index into the grid's levels) and the scale data as stored."""

    format: str
    shape: tuple[int, int]
    codes: torch.Tensor
    params: dict[str, torch.Tensor]


class Format:
    """One storage format. Subclasses set the attributes and implement the ``_``-free abstract methods.

    Constructors only store their arguments; all work happens in methods.
    """

    name: str = ""
    runtimes: tuple[str, ...] = ()
    bits: int = 0
    block_size: int | None = None
    group_size: int | None = None
    symmetric: bool = True
    is_float: bool = False
    gguf_type = None  # gguf.GGMLQuantizationType for GGUF formats

    def __repr__(self) -> str:
        return f"<Format {self.name}>"

    # --- shape and size -------------------------------------------------------------------
    def check(self, shape: tuple[int, int]) -> str | None:
        """Give None if an [out, in] tensor is storable, else the reason."""
        if len(shape) != 2 or min(shape) < 1:
            return f"{self.name} stores 2-D [out, in] tensors, got shape {tuple(shape)}"
        if self.block_size and shape[1] % self.block_size:
            return f"row width {shape[1]} is not a multiple of {self.block_size} ({self.name} blocks)"
        return None

    def _require(self, shape: tuple[int, int]) -> tuple[int, int]:
        reason = self.check(tuple(shape))
        if reason:
            raise FormatError(f"{self.name}: {reason}")
        return int(shape[0]), int(shape[1])

    def bytes(self, shape: tuple[int, int]) -> int:
        """Give the exact stored bytes of an [out, in] tensor; FormatError if it is not storable."""
        raise NotImplementedError

    def bits_per_weight(self, shape: tuple[int, int]) -> float:
        """Give stored bits per weight (scales included) of an [out, in] tensor."""
        return self.bytes(shape) * 8 / (int(shape[0]) * int(shape[1]))

    # --- quantization ---------------------------------------------------------------------
    def fit_grid(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> Grid:
        """Give the grid the runtime's reference quantizer picks for w [out, in] (importance: Σx² per input)."""
        raise NotImplementedError

    def quantize(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> QuantizedTensor:
        """Give w stored in this format: the reference quantizer's grid and the nearest codes."""
        grid = self.fit_grid(w, importance)
        codes, _ = grid.round(w, 0)
        return self.from_codes(grid, codes)

    def from_codes(self, grid: Grid, codes: torch.Tensor) -> QuantizedTensor:
        """Give the stored tensor of codes [out, in] on a grid this format fitted (e.g. after GPTQ)."""
        if grid.params is None:
            raise FormatError(f"{self.name}: the grid carries no stored parameters; fit it with {self.name}.fit_grid")
        return QuantizedTensor(self.name, tuple(codes.shape), codes.long(), dict(grid.params))

    def grid_of(self, q: QuantizedTensor) -> Grid:
        """Give the grid a stored tensor's parameters define."""
        raise NotImplementedError

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        """Give float32 [out, in]: exactly the values the runtime computes with."""
        return self.grid_of(q).value(q.codes)

    # --- bytes ----------------------------------------------------------------------------
    def pack(self, q: QuantizedTensor) -> np.ndarray:
        """Give uint8 [out, row_bytes]: the runtime's byte layout."""
        raise FormatError(f"{self.name} has no byte layout here (cost and quality only)")

    def unpack(self, data: np.ndarray, shape: tuple[int, int]) -> QuantizedTensor:
        """Give the stored tensor read back from ``pack``'s bytes."""
        raise FormatError(f"{self.name} has no byte layout here (cost and quality only)")


def as_weight(w: torch.Tensor) -> torch.Tensor:
    """Give w as a contiguous float32 2-D tensor, or raise FormatError."""
    if w.dim() != 2:
        raise FormatError(f"formats store 2-D [out, in] weights, got shape {tuple(w.shape)}")
    return w.detach().float().contiguous()


def importance_matrix(importance: torch.Tensor | None, w: torch.Tensor) -> torch.Tensor | None:
    """Give per-input importance broadcast to w's shape [out, in] (llama.cpp's quant_weights), or None."""
    if importance is None:
        return None
    imp = importance.detach().float().reshape(-1)
    if imp.numel() != w.shape[1]:
        raise FormatError(f"importance has {imp.numel()} entries, the weight has {w.shape[1]} inputs")
    return imp.expand_as(w)
