"""Measure real latency on this machine: warm-up, then the median of repeats, on a fixed thread count.

``measure`` takes an ONNX file (run with onnxruntime CPU), an ``onnxruntime.InferenceSession``
or a torch module, and feeds it ``input_ids`` (+ ``attention_mask``) of shape (batch, seq_len).
``measure_gguf`` runs llama.cpp's ``llama-bench`` on a GGUF file (decode and prefill, fixed threads).
The machines this runs on are shared: report medians, and compare ratios measured in one run.
"""

from __future__ import annotations

import json
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


# ---- llama.cpp: llama-bench on a GGUF file ----------------------------------------------------------
PROMPT_TOKENS = 64  # llama-bench -p: one prefill of this many tokens in a single batch
GEN_TOKENS = 32  # llama-bench -n: this many tokens decoded one at a time, from an empty context


def parse_llama_bench(text: str) -> list[dict[str, Any]]:
    """Give the tests llama-bench printed with ``-o json`` (one dict per test and thread count).

    Each keeps llama-bench's own fields (``n_prompt``, ``n_gen``, ``n_threads``, ``avg_ns``,
    ``stddev_ns``, ``samples_ns``, ``model_size``...); raises LlamaCppError when the text is not
    llama-bench's JSON.
    """
    from autocompress.runtime.llamacpp import LlamaCppError

    start = text.find("[")
    try:
        tests = json.loads(text[start:]) if start >= 0 else None
    except json.JSONDecodeError:
        tests = None
    if not isinstance(tests, list) or not all(isinstance(t, dict) and "samples_ns" in t for t in tests):
        raise LlamaCppError("llama-bench printed no JSON test results (expected `-o json` output)")
    return tests


def summarize_llama_bench(tests: list[dict[str, Any]], threads: int) -> dict[str, Any]:
    """Give one thread count's decode and prefill figures from parsed llama-bench tests: the median of
    the repeats (``decode_ms`` per token, ``prefill_ms`` for the whole prompt), llama-bench's mean and
    standard deviation beside it, and the test sizes."""
    from autocompress.runtime.llamacpp import LlamaCppError

    def pick(kind: str) -> dict[str, Any]:
        for t in tests:
            gen, prompt = int(t.get("n_gen", 0)), int(t.get("n_prompt", 0))
            if int(t.get("n_threads", -1)) == threads and (
                gen > 0 and prompt == 0 if kind == "tg" else prompt > 0 and gen == 0
            ):
                return t
        raise LlamaCppError(f"llama-bench printed no {kind} test at {threads} thread(s)")

    tg, pp = pick("tg"), pick("pp")
    n_gen, n_prompt = int(tg["n_gen"]), int(pp["n_prompt"])
    decode_ms = statistics.median(tg["samples_ns"]) / 1e6 / n_gen
    prefill_ms = statistics.median(pp["samples_ns"]) / 1e6
    return {
        "decode_ms": decode_ms,
        "decode_tok_s": 1e3 / decode_ms,
        "decode_ms_mean": tg["avg_ns"] / 1e6 / n_gen,
        "decode_ms_stddev": tg["stddev_ns"] / 1e6 / n_gen,
        "prefill_ms": prefill_ms,
        "prefill_tok_s": n_prompt * 1e3 / prefill_ms,
        "prefill_ms_mean": pp["avg_ns"] / 1e6,
        "prefill_ms_stddev": pp["stddev_ns"] / 1e6,
        "gen_tokens": n_gen,
        "prompt_tokens": n_prompt,
        "repeats": len(tg["samples_ns"]),
        "threads": threads,
        "model_bytes": int(tg.get("model_size", 0)),
        "model_params": int(tg.get("model_n_params", 0)),
        "build_commit": str(tg.get("build_commit", "")),
        "runtime": "llama.cpp",
    }


def measure_gguf_threads(
    path: str | Path,
    threads: tuple[int, ...] = (2,),
    repeats: int = 5,
    *,
    prompt_tokens: int = PROMPT_TOKENS,
    gen_tokens: int = GEN_TOKENS,
    timeout_s: float = 600,
) -> dict[int, dict[str, Any]]:
    """Give, per thread count, a GGUF file's decode and prefill speed measured by one llama-bench run
    (the model loaded once; llama-bench's warm-up run first, then ``repeats`` timed runs of each test)."""
    from autocompress.runtime import llamacpp

    if not threads or min(threads) < 1 or repeats < 1 or prompt_tokens < 1 or gen_tokens < 1:
        raise llamacpp.LlamaCppError("threads, repeats, prompt and generation sizes must be positive")
    args = ["-m", path, "-p", prompt_tokens, "-n", gen_tokens, "-r", repeats, "-o", "json"]
    args += ["-t", ",".join(str(t) for t in threads)]
    proc = llamacpp.require().run("llama-bench", args, timeout=timeout_s, what=f"on {Path(path).name}")
    tests = parse_llama_bench(proc.stdout)
    return {t: summarize_llama_bench(tests, t) for t in threads}


def measure_gguf(
    path: str | Path,
    threads: int = 2,
    repeats: int = 5,
    *,
    prompt_tokens: int = PROMPT_TOKENS,
    gen_tokens: int = GEN_TOKENS,
) -> dict[str, Any]:
    """Give a GGUF file's decode and prefill speed on this machine by llama-bench at a fixed thread count:
    ``decode_tok_s`` / ``decode_ms`` (per token, ``gen_tokens`` decoded from an empty context),
    ``prefill_tok_s`` / ``prefill_ms`` (one ``prompt_tokens`` batch), medians of ``repeats``."""
    return measure_gguf_threads(path, (threads,), repeats, prompt_tokens=prompt_tokens, gen_tokens=gen_tokens)[threads]
