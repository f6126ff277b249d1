"""Measure a GGUF file on this machine with llama.cpp's ``llama-bench``: decode and prefill at fixed thread counts.

The machines this runs on are shared: report medians, and compare ratios measured in one run.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from autocompress.runtime import llamacpp

PROMPT_TOKENS = 64  # llama-bench -p: one prefill of this many tokens in a single batch
GEN_TOKENS = 32  # llama-bench -n: this many tokens decoded one at a time, from an empty context


def parse_llama_bench(text: str) -> list[dict[str, Any]]:
    """Give the tests llama-bench printed with ``-o json`` (one dict per test and thread count).

    Each keeps llama-bench's own fields (``n_prompt``, ``n_gen``, ``n_threads``, ``avg_ns``,
    ``stddev_ns``, ``samples_ns``, ``model_size``...); raises LlamaCppError when the text is not
    llama-bench's JSON.
    """
    start = text.find("[")
    try:
        tests = json.loads(text[start:]) if start >= 0 else None
    except json.JSONDecodeError:
        tests = None
    if not isinstance(tests, list) or not all(isinstance(t, dict) and "samples_ns" in t for t in tests):
        raise llamacpp.LlamaCppError("llama-bench printed no JSON test results (expected `-o json` output)")
    return tests


def summarize_llama_bench(tests: list[dict[str, Any]], threads: int) -> dict[str, Any]:
    """Give one thread count's decode and prefill figures from parsed llama-bench tests: the median of
    the repeats (``decode_ms`` per token, ``prefill_ms`` for the whole prompt), llama-bench's mean and
    standard deviation beside it, and the test sizes."""

    def pick(kind: str) -> dict[str, Any]:
        for t in tests:
            gen, prompt = int(t.get("n_gen", 0)), int(t.get("n_prompt", 0))
            if int(t.get("n_threads", -1)) == threads and (
                gen > 0 and prompt == 0 if kind == "tg" else prompt > 0 and gen == 0
            ):
                return t
        raise llamacpp.LlamaCppError(f"llama-bench printed no {kind} test at {threads} thread(s)")

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
