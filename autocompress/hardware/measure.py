"""Measure real latency on this machine: warm-up, then the median of repeats, on a fixed thread count.

``measure`` takes an ONNX file (run with onnxruntime CPU), an ``onnxruntime.InferenceSession``
or a torch module, and feeds it ``input_ids`` (+ ``attention_mask``) of shape (batch, seq_len):
one forward, without a cache.

A decoder exported with a KV cache (``export_onnx(..., kv_cache=True)``: ``past_key_values.{i}.key``
/ ``.value`` inputs, ``present.{i}.*`` outputs) is measured as it generates: ``measure_decode``
times the prefill of ``context`` tokens from an empty cache, and one decode step (one new token)
with ``context`` tokens already in the cache, each as the median of repeats after warm-up on a
fixed thread count. ``ort_generate`` is the token-by-token greedy loop itself (the export check
compares its tokens with PyTorch's). Caches travel between steps as numpy arrays (no I/O binding).

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
    ``nn.Module`` taking ``input_ids``/``attention_mask``. A decoder with a KV cache runs from an empty
    cache (``measure_decode`` times its decode steps). Threads are fixed for the measurement
    (torch's setting is restored afterwards).
    """
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab_size, size=(batch, seq_len), dtype=np.int64)
    mask = np.ones_like(ids)
    if isinstance(model_or_onnx, (str, Path, bytes)) or hasattr(model_or_onnx, "get_inputs"):
        sess = model_or_onnx if hasattr(model_or_onnx, "get_inputs") else ort_session(model_or_onnx, threads)
        names = {i.name for i in sess.get_inputs()}
        if has_cache(sess):  # a KV-cache decoder: one forward from an empty cache (a prefill of seq_len tokens)
            feed = _step_feed(ids, empty_cache(sess, batch), 0)
        else:
            feed = {k: v for k, v in {"input_ids": ids, "attention_mask": mask}.items() if k in names}
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


PAST_PREFIX = "past_key_values."


def has_cache(sess: Any) -> bool:
    """True when an onnxruntime session is a decoder with a KV cache (``past_key_values.*`` inputs)."""
    return any(i.name.startswith(PAST_PREFIX) for i in sess.get_inputs())


def empty_cache(sess: Any, batch: int) -> dict[str, np.ndarray]:
    """Give every ``past_key_values.*`` input of ``sess`` as an empty cache [batch, kv_heads, 0, head_dim]."""
    out = {}
    for i in sess.get_inputs():
        if i.name.startswith(PAST_PREFIX):
            heads, dim = i.shape[1], i.shape[3]
            out[i.name] = np.zeros((batch, heads, 0, dim), dtype=np.float32)
    return out


def _step_feed(ids: np.ndarray, past: dict[str, np.ndarray], past_len: int) -> dict[str, np.ndarray]:
    batch, seq = ids.shape
    pos = np.broadcast_to(np.arange(past_len, past_len + seq, dtype=np.int64), (batch, seq))
    mask = np.ones((batch, past_len + seq), dtype=np.int64)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": np.ascontiguousarray(pos), **past}


def _next_cache(sess: Any, outputs: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Give the ``past_key_values.*`` feed made of a step's ``present.*`` outputs."""
    names = [o.name for o in sess.get_outputs()]
    return {
        n.replace("present.", PAST_PREFIX, 1): v
        for n, v in zip(names, outputs, strict=True)
        if n.startswith("present.")
    }


def _random_ids(context: int, batch: int, vocab_size: int, seed: int) -> np.ndarray:
    """Give [batch, context + 1] random token ids below ``vocab_size``: a prompt and the token after it."""
    return np.random.default_rng(seed).integers(0, vocab_size, size=(batch, context + 1), dtype=np.int64)


def prefill_feed(
    sess: Any, context: int, batch: int = 1, vocab_size: int = 100, seed: int = 0
) -> dict[str, np.ndarray]:
    """Give the feed of the prefill of ``context`` random tokens below ``vocab_size`` (from an empty cache)."""
    return _step_feed(_random_ids(context, batch, vocab_size, seed)[:, :context], empty_cache(sess, batch), 0)


def _decode_feeds(
    sess: Any, context: int, batch: int, vocab_size: int, seed: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Give (``prefill_feed``, the feed of the decode step after it, its KV cache made by running
    that prefill)."""
    prompt = prefill_feed(sess, context, batch, vocab_size, seed)
    last = _random_ids(context, batch, vocab_size, seed)[:, context:]
    return prompt, _step_feed(last, _next_cache(sess, sess.run(None, prompt)), context)


def decode_feed(sess: Any, context: int, batch: int = 1, vocab_size: int = 100, seed: int = 0) -> dict[str, np.ndarray]:
    """Give the feed of one decode step with ``context`` tokens in the KV cache (made by a real prefill
    of random tokens below ``vocab_size``): running it again and again times the same step."""
    return _decode_feeds(sess, context, batch, vocab_size, seed)[1]


@dataclass(frozen=True)
class Generation:
    """Greedy tokens an ONNX decoder generated, the logits each was chosen from, and the wall times."""

    tokens: np.ndarray  # [batch, new_tokens] int64
    logits: np.ndarray  # [batch, new_tokens, vocab]
    prefill_ms: float  # the prompt from an empty cache (gives the first token)
    step_ms: tuple[float, ...]  # each later token (one input token, cache growing by one)


def ort_generate(sess: Any, ids: np.ndarray, new_tokens: int) -> Generation:
    """Give ``new_tokens`` greedy tokens after the prompt ``ids`` [batch, seq], decoded token by token
    with ``sess``'s KV cache (an empty cache first, then each step's ``present`` as the next ``past``)."""
    batch, seq = ids.shape
    start = time.perf_counter()
    out = sess.run(None, _step_feed(ids.astype(np.int64), empty_cache(sess, batch), 0))
    prefill_ms = (time.perf_counter() - start) * 1e3
    tokens, logits, steps = [], [], []
    for k in range(new_tokens):
        last = out[0][:, -1]
        logits.append(last)
        tokens.append(last.argmax(-1).astype(np.int64))
        if k == new_tokens - 1:
            break
        feed = _step_feed(tokens[-1][:, None], _next_cache(sess, out), seq + k)
        start = time.perf_counter()
        out = sess.run(None, feed)
        steps.append((time.perf_counter() - start) * 1e3)
    return Generation(np.stack(tokens, 1), np.stack(logits, 1), prefill_ms, tuple(steps))


@dataclass(frozen=True)
class DecodeMeasurement:
    """Prefill and per-token decode latency of a KV-cache decoder at one context length."""

    decode: Measurement  # one new token with ``context`` tokens in the cache (seq_len 1)
    prefill: Measurement  # ``context`` tokens from an empty cache (seq_len = context)
    context: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "decode_ms": self.decode.median_ms,
            "prefill_ms": self.prefill.median_ms,
            "context_tokens": self.context,
            "decode": self.decode.to_dict(),
            "prefill": self.prefill.to_dict(),
        }


def measure_decode(
    model: str | Path | bytes | Any,
    *,
    context: int = 64,
    batch: int = 1,
    threads: int = 1,
    warmup: int = 3,
    repeats: int = 20,
    prefill_repeats: int = 7,
    min_time_s: float = 0.0,
    vocab_size: int = 100,
    seed: int = 0,
) -> DecodeMeasurement:
    """Give the measured prefill time of ``context`` tokens and the time of one decode step with
    ``context`` tokens in the KV cache, for an ONNX decoder with a cache (path, bytes or session).

    Every decode repeat runs the same step (one token after the same ``context``-token cache, made by a
    real prefill), so the figure is the cost of a token at exactly that context."""
    sess = model if hasattr(model, "get_inputs") else ort_session(model, threads)
    if not has_cache(sess):
        raise ValueError("measure_decode needs an ONNX decoder with a KV cache (past_key_values.* inputs)")
    prompt, step = _decode_feeds(sess, context, batch, vocab_size, seed)
    pre = timed(lambda: sess.run(None, prompt), warmup=max(1, warmup // 2), repeats=prefill_repeats)
    dec = timed(lambda: sess.run(None, step), warmup=warmup, repeats=repeats, min_time_s=min_time_s)
    return DecodeMeasurement(
        decode=_summary(dec, threads, batch, 1, "onnxruntime"),
        prefill=_summary(pre, threads, batch, context, "onnxruntime"),
        context=context,
    )
