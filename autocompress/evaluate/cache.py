"""The evaluation cache: quality results keyed by plan hash + data hash, on disk.

A plan's hash names the base model and every compression choice; the data hash names the exact
calibration, proxy and evaluation tokens. Together they fix a quality result, whatever the target
hardware, study or process — so re-running a search, re-targeting it or starting a new study on
the same model and data never evaluates a plan twice. One small JSON file per result, written
atomically (several worker processes may share the cache).

``$AUTOCOMPRESS_EVAL_CACHE`` moves the cache (``off`` disables it); by default it lives under
the model cache folder.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from autocompress._io import atomic_write_text, cache_dir
from autocompress.compress.numerics import numerics_tag

CACHE_VERSION = 1  # bump when a metric's definition changes


def eval_cache_root() -> Path | None:
    """Give the cache folder, or None when ``$AUTOCOMPRESS_EVAL_CACHE=off``."""
    env = os.environ.get("AUTOCOMPRESS_EVAL_CACHE")
    if env == "off":
        return None
    if env:
        return Path(env)
    return cache_dir() / "evals"


class EvalCache:
    """Results of one data set (and runtime numerics), by kind ("proxy", "full") and plan hash."""

    def __init__(self, data_hash: str, root: Path | None = None, numerics: str = "exact", device_tag: str = "") -> None:
        base = Path(root) if root is not None else eval_cache_root()
        tag = numerics_tag(numerics)  # results under a runtime's emulated rounding
        tag += device_tag  # ``device.cache_tag``: results of a bf16 (GPU) model apart from float32 ones
        self.dir = base / f"{data_hash[:24]}{tag}-v{CACHE_VERSION}" if base is not None else None
        self.hits = 0
        self.misses = 0

    def _path(self, kind: str, plan_hash: str) -> Path:
        return self.dir / kind / f"{plan_hash}.json"

    def get(self, kind: str, plan_hash: str) -> dict[str, Any] | None:
        if self.dir is None:
            return None
        try:
            return json.loads(self._path(kind, plan_hash).read_text())
        except (OSError, ValueError):
            return None  # absent or damaged: evaluate again

    def put(self, kind: str, plan_hash: str, values: dict[str, Any]) -> None:
        if self.dir is None:
            return
        with contextlib.suppress(OSError):  # a read-only cache only costs re-evaluation
            atomic_write_text(self._path(kind, plan_hash), json.dumps(values, sort_keys=True) + "\n")

    def get_or_compute(self, kind: str, plan_hash: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Give the cached result, or compute, store and give it."""
        got = self.get(kind, plan_hash)
        if got is not None:
            self.hits += 1
            return got
        self.misses += 1
        values = compute()
        self.put(kind, plan_hash, values)
        return values
