"""The variant cache: compressed per-linear results (and full SVDs, so any rank reuses them) kept
in memory under a byte bound, and optionally on disk as safetensors, so another process (a search
worker, a resumed study) starts warm.

One cache belongs to one owner (a ``Workbench``): its keys name the base model by hash, so a model
whose weights were edited in place after the cache was filled must get a new cache (a new
workbench), not the old one. ``apply_plan_to`` without a cache computes every variant afresh.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DEFAULT_CACHE_BYTES = 1_500_000_000
DISK_FORMAT = "v2"  # part of every on-disk key: bump when a technique's arithmetic changes


@dataclass(frozen=True)
class CacheInfo:
    """Size and hit counters of a variant cache."""

    entries: int
    bytes: int
    max_bytes: int
    hits: int
    misses: int


class VariantCache:
    """Least-recently-used memory cache of compressed tensors (or SVDs) bounded by their total size
    in bytes, over an optional folder of safetensors files (``folder``; None: memory only).

    Values are kept on the CPU whatever device computed them, so the bound is host memory.
    """

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES, folder: str | Path | None = None) -> None:
        self.max_bytes = int(max_bytes)
        self.folder = Path(folder) if folder is not None else None
        self._items: OrderedDict[tuple, tuple[Any, int]] = OrderedDict()
        self.bytes = self.hits = self.misses = 0

    @classmethod
    def from_env(cls) -> VariantCache:
        """Give a cache bounded by ``$AUTOCOMPRESS_VARIANT_CACHE_BYTES`` (default 1.5 GB), on disk in
        ``$AUTOCOMPRESS_VARIANT_CACHE`` when set."""
        max_bytes = int(os.environ.get("AUTOCOMPRESS_VARIANT_CACHE_BYTES") or DEFAULT_CACHE_BYTES)
        return cls(max_bytes, os.environ.get("AUTOCOMPRESS_VARIANT_CACHE") or None)

    def get(self, key: tuple) -> Any | None:
        """Give the value stored under ``key`` in memory, or None."""
        item = self._items.get(key)
        if item is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return item[0]

    def put(self, key: tuple, value: Any, nbytes: int) -> None:
        """Keep ``value`` (``nbytes`` large) in memory, evicting the least recently used entries."""
        if nbytes > self.max_bytes or key in self._items:
            return
        self._items[key] = (value, nbytes)
        self.bytes += nbytes
        self._evict()

    def set_limit(self, max_bytes: int) -> None:
        """Bound the memory part to ``max_bytes`` (0 disables it), evicting the oldest entries now if needed."""
        self.max_bytes = int(max_bytes)
        self._evict()

    def _evict(self) -> None:
        while self.bytes > self.max_bytes and self._items:
            _, (_, nbytes) = self._items.popitem(last=False)
            self.bytes -= nbytes

    def clear(self) -> None:
        """Empty the memory part (and reset its counters); files on disk stay."""
        self._items.clear()
        self.bytes = self.hits = self.misses = 0

    def info(self) -> CacheInfo:
        """Give the memory part's size and hit counters."""
        return CacheInfo(len(self._items), self.bytes, self.max_bytes, self.hits, self.misses)

    def _file(self, key: tuple) -> Path | None:
        if self.folder is None:
            return None
        return self.folder / f"{hashlib.sha256(repr((DISK_FORMAT, key)).encode()).hexdigest()[:40]}.safetensors"

    def disk_get(self, key: tuple) -> tuple[torch.Tensor, ...] | None:
        """Give the tensors stored on disk under ``key``, or None (no folder, no file, a damaged file)."""
        path = self._file(key)
        if path is None or not path.is_file():
            return None
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
            return tuple(tensors[str(i)] for i in range(len(tensors)))
        except Exception:  # a damaged file is a miss; it is rewritten
            return None

    def disk_put(self, key: tuple, result: tuple[torch.Tensor, ...]) -> None:
        """Write ``result`` under ``key`` (atomically; a full or read-only disk is not an error)."""
        path = self._file(key)
        if path is None:
            return
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        try:
            save_file({str(i): t.detach().cpu().contiguous() for i, t in enumerate(result)}, tmp)
            os.replace(tmp, path)
        except OSError:
            Path(tmp).unlink(missing_ok=True)
