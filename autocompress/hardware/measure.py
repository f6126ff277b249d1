"""Measure real latency on this machine: warm-up, then the median of repeats, on a fixed thread count.

``measure`` takes an ONNX file (run with onnxruntime CPU), an ``onnxruntime.InferenceSession``
or a torch module, and feeds it ``input_ids`` (+ ``attention_mask``) of shape (batch, seq_len).
(llama.cpp's ``llama-bench`` on a GGUF file is run by ``autocompress.runtime.llama_bench``.)
The machines this runs on are shared: report medians, and compare ratios measured in one run.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Measurement:
    """Latencies of one (model, batch, seq_len) on this machine, in milliseconds."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int
    threads: int
    batch: int
    seq_len: int
    runtime: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def timed(fn: Callable[[], object], *, warmup: int = 3, repeats: int = 20, min_time_s: float = 0.0) -> list[float]:
    """Give the wall times (ms) of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls.

    With ``min_time_s`` the repeats continue until that much time has been spent (cheap calls get
    more samples, so their median is stable).
    """
    for _ in range(warmup):
        fn()
    times: list[float] = []
    spent = 0.0
    while len(times) < repeats or spent < min_time_s:
        start = time.perf_counter()
        fn()
        dt = time.perf_counter() - start
        spent += dt
        times.append(dt * 1e3)
        if len(times) >= 50 * max(1, repeats):
            break
    return times


def ort_session(model: str | Path | bytes, threads: int = 1) -> Any:
    """Give an onnxruntime CPU session with fixed intra/inter-op threads and full graph optimisation."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    src = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def _summary(times: list[float], threads: int, batch: int, seq_len: int, runtime: str) -> Measurement:
    q = np.percentile(times, [10, 90])
    return Measurement(statistics.median(times), float(q[0]), float(q[1]), len(times), threads, batch, seq_len, runtime)


def measure(
    model_or_onnx: Any,
    *,
    batch: int = 1,
    seq_len: int = 1,
    threads: int = 1,
    warmup: int = 3,
    repeats: int = 20,
    min_time_s: float = 0.0,
    vocab_size: int = 100,
    seed: int = 0,
) -> Measurement:
    """Give the measured latency of one forward over (batch, seq_len) tokens on this machine.

    ``model_or_onnx``: a path to an ``.onnx`` file, ONNX bytes, an onnxruntime session, or a torch
    ``nn.Module`` taking ``input_ids``/``attention_mask``. Threads are fixed for the measurement
    (torch's setting is restored afterwards).
    """
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab_size, size=(batch, seq_len), dtype=np.int64)
    mask = np.ones_like(ids)
    if isinstance(model_or_onnx, (str, Path, bytes)) or hasattr(model_or_onnx, "get_inputs"):
        sess = model_or_onnx if hasattr(model_or_onnx, "get_inputs") else ort_session(model_or_onnx, threads)
        names = {i.name for i in sess.get_inputs()}
        feed = {"input_ids": ids, "attention_mask": mask}
        feed = {k: v for k, v in feed.items() if k in names}
        times = timed(lambda: sess.run(None, feed), warmup=warmup, repeats=repeats, min_time_s=min_time_s)
        return _summary(times, threads, batch, seq_len, "onnxruntime")
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t_ids, t_mask = torch.from_numpy(ids), torch.from_numpy(mask)
        with torch.inference_mode():
            times = timed(
                lambda: model_or_onnx(input_ids=t_ids, attention_mask=t_mask),
                warmup=warmup,
                repeats=repeats,
                min_time_s=min_time_s,
            )
    finally:
        torch.set_num_threads(before)
    return _summary(times, threads, batch, seq_len, "torch")
