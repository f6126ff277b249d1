"""Calibrate a hardware profile for this machine with micro-benchmarks in the runtime we deploy to.

``calibrate_local()`` times, with onnxruntime CPU on a fixed thread count (and torch for reference):

1. **bandwidth per weight format** — GEMV (M = 1) through chains of linears of model-like shapes,
   weights cold (the cache is flushed between runs), for fp32 ``MatMul``, 8-bit and 4-bit
   ``MatMulNBits`` (weight-only) and dynamic int8 (``MatMulInteger``, W8A8);
2. **compute rate per format** — chains of a small and a large shape at M = 16..128 tokens;
3. **per-linear overhead per format** — the intercept of the cold GEMV fit (a cold linear pays a
   prefetch/first-touch ramp); chains of tiny warm linears are kept as a reference;
4. **per-kernel overhead and the block's fusion check** — a tiny Llama exported to ONNX with 1 and
   4 blocks: onnxruntime's optimised graph gives the kernels per block (after fusion), the
   1-vs-4-block slope the fixed cost per block, the intercept the per-token cost.

A least-squares fit per format of ``t = L * overhead + max(flops / (peak * eta_c), bytes / (bw * eta_bw))``
gives the profile's efficiency and overhead fields (hardware.md §4.3, steps 2, 3, 5, 6). The
result is a profile marked ``calibrated: true`` plus the raw measurements, written beside it.
Energy is not measured (no power meter is readable on a VM): power fields stay priors.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from autocompress import formats
from autocompress._io import atomic_write_text
from autocompress.errors import ProfileError
from autocompress.hardware.measure import ort_session, timed
from autocompress.hardware.profile import HardwareProfile, profile_from_dict

# what our ONNX export writes (export/onnx.py): fp32 MatMul, weight-only 8-bit MatMulNBits (per row,
# symmetric, in ROW_BLOCK[8]-blocks), 4-bit MatMulNBits g128, and W8A8 as dynamic int8 (MatMulInteger)
FORMATS = ("fp32", "int8", "int4", "w8a8")
_EXPORT_FMT = {"fp32": "fp32", "int8": "int8-row-sym", "int4": "int4-g128-asym", "w8a8": "int8-dynamic"}
# the registry formats the exported layouts are (their bytes price the samples); W8A8's dynamic int8 is
# onnxruntime's own (MatMulInteger), not a storage format a plan names
_REGISTRY_FMT = {"fp32": "F32", "int8": "int8-g32-sym", "int4": "int4-g128-asym"}
# what a calibrated onnxruntime profile offers the search: MatMulNBits 4-bit (blocks of 32 / 128,
# with or without zero points) and 8-bit weight-only, all on the generic integer grids
LOCAL_FORMATS = ("int8-ch-sym", "int8-ch-asym", "int4-g32-sym", "int4-g32-asym", "int4-g128-sym", "int4-g128-asym")
# (K, N, linears in the chain): model-like widths (SmolLM2-135M ... TinyLlama-1.1B); chains
# alternate K->N and N->K so every weight is distinct and the whole chain misses the cache
# (small q/k/v/o-sized matrices too: below ~1-2 MB a GEMV does not reach streaming bandwidth, which the
# fitted per-linear overhead then carries)
GEMV_SHAPES = ((576, 192, 24), (576, 576, 16), (576, 1536, 6), (576, 1536, 18), (1024, 2816, 8), (1536, 4096, 6))
GEMM_SHAPES = ((576, 576, 8), (1024, 2816, 4))
GEMM_TOKENS = (16, 64, 128)
TINY_CHAINS = (4, 32)  # 64 x 64 linears: fixed costs only
FLUSH_BYTES = 96 << 20  # > the L3 cache of any CPU we expect


@dataclass(frozen=True)
class Sample:
    """One timed micro-benchmark: a chain of ``linears`` matmuls on ``tokens`` rows."""

    fmt: str
    tokens: int
    linears: int
    weight_bytes: float
    flops: float
    median_ms: float


def _chain_model(k: int, n: int, layers: int, seed: int = 0) -> Any:
    """Give an fp32 ONNX model X[M, k] -> chain of ``layers`` MatMuls alternating k->n and n->k."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    prev, width = "x", k
    for i in range(layers):
        out_w = n if width == k else k
        w = (rng.standard_normal((width, out_w)) / np.sqrt(width)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"], name=f"/chain/l{i}/MatMul"))
        prev, width = f"h{i}", out_w
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT, ["m", width])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _elementwise_chain(ops: int, width: int = 64) -> Any:
    from onnx import TensorProto, helper, numpy_helper

    one = numpy_helper.from_array(np.ones((width,), np.float32), "one")
    nodes = [
        helper.make_node("Add" if i % 2 == 0 else "Mul", [f"h{i - 1}" if i else "x", "one"], [f"h{i}"])
        for i in range(ops)
    ]
    graph = helper.make_graph(
        nodes,
        "ew",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", width])],
        [helper.make_tensor_value_info(f"h{ops - 1}", TensorProto.FLOAT, ["m", width])],
        [one],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _quantized(proto: Any, fmt: str, tmp: Path) -> Any:
    from autocompress.export.onnx import quantize_groups

    if fmt == "fp32":
        return proto
    nodes = [n.name for n in proto.graph.node if n.op_type == "MatMul"]
    return quantize_groups(proto, {_EXPORT_FMT[fmt]: nodes}, tmp)


def _stored_bytes(fmt: str, k: int, n: int, layers: int) -> float:
    """Give the bytes the micro-benchmark's chain stores in ``fmt``: ``layers`` linears, out x in
    alternating n x k and k x n (``_chain_model``), each priced by the format registry."""
    shapes = [(n, k) if i % 2 == 0 else (k, n) for i in range(layers)]
    if fmt == "w8a8":  # int8 codes, an fp32 scale and an int8 zero point per output channel
        return float(sum(out * (inp + 5) for out, inp in shapes))
    return float(sum(formats.get(_REGISTRY_FMT[fmt]).bytes(shape) for shape in shapes))


class _Flusher:
    """Evicts the CPU caches between timed runs, so weights are read from DRAM as in a real model."""

    def __init__(self) -> None:
        self.buf = np.ones(FLUSH_BYTES // 4, np.float32)

    def __call__(self) -> None:
        self.buf += 1.0


def _time_cold(run: Callable[[], object], flush: _Flusher, repeats: int) -> float:
    run()
    times = []
    for _ in range(repeats):
        flush()
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _read_bandwidth_GBps(flush: _Flusher) -> float:
    """Give the best streaming-read bandwidth numpy reaches on one core (a sum over 256 MB)."""
    a = np.ones(64 << 20, np.float32)
    best = 0.0
    for _ in range(5):
        flush()
        start = time.perf_counter()
        a.sum()
        best = max(best, a.nbytes / (time.perf_counter() - start) / 1e9)
    return best


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cpu_mhz() -> float:
    try:
        mhz = [
            float(line.split(":")[1]) for line in Path("/proc/cpuinfo").read_text().splitlines() if "cpu MHz" in line
        ]
        return max(mhz) if mhz else 2500.0
    except (OSError, ValueError):
        return 2500.0


def _meminfo_GB() -> tuple[float, float]:
    vals = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, rest = line.split(":", 1)
            vals[key] = float(rest.split()[0]) * 1024 / 1e9
    except (OSError, ValueError):
        return 16.0, 8.0
    return vals.get("MemTotal", 16.0), vals.get("MemAvailable", 8.0)


def _fit_bandwidth(samples: list[Sample]) -> tuple[float, float, float]:
    """Least squares on relative error: t = call + L * overhead + bytes * s; give (call ms, overhead ms, s ms/byte)."""
    a = np.array([[1.0, s.linears, s.weight_bytes] for s in samples]) / np.array([[s.median_ms] for s in samples])
    y = np.ones(len(samples))
    coef, *_ = np.linalg.lstsq(a, y, rcond=None)
    if (coef < 0).any():  # a term below noise: refit without it (non-negative least squares, 3 terms)
        from scipy.optimize import nnls

        coef, _ = nnls(a, y)
    call, overhead, slope = (float(c) for c in coef)
    return call, overhead, slope


def _block_costs(threads: int, tmp: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Give the tiny-Llama block measurements: ONNX node counts before/after ORT fusion, and timings."""
    import onnx
    import onnxruntime as ort

    from autocompress.export.onnx import export_onnx
    from autocompress.model import load_model
    from autocompress.plan import ModelRef, Plan

    lm = load_model("tiny-llama")
    a = lm.anatomy
    out: dict[str, Any] = {"timings_ms": {}}
    for keep in (1, len(a.blocks)):
        plan = Plan(model=ModelRef.of(a))
        if keep < a.num_blocks:
            plan = Plan(model=plan.model, drop_blocks=tuple(range(keep, a.num_blocks)))
        from autocompress.compress.apply import apply_plan_to

        model = apply_plan_to(lm.model, a, plan)
        exp = export_onnx(model, a, plan, tmp / f"block{keep}.onnx", quantize=False)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.optimized_model_filepath = str(tmp / f"block{keep}.opt.onnx")
        opts.log_severity_level = 3
        opts.intra_op_num_threads = threads
        ort.InferenceSession(str(exp.path), opts, providers=["CPUExecutionProvider"])
        raw_ops = [n.op_type for n in onnx.load(str(exp.path)).graph.node if n.op_type != "Constant"]
        opt_ops = [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node]
        sess = ort_session(exp.path, threads)
        feed = {"input_ids": np.ones((1, 1), np.int64), "attention_mask": np.ones((1, 1), np.int64)}
        times = timed(lambda s=sess, f=feed: s.run(None, f), warmup=20, repeats=200, min_time_s=0.5)
        out["timings_ms"][keep] = statistics.median(times)
        out[f"ops_raw_{keep}"] = len(raw_ops)
        out[f"ops_fused_{keep}"] = len(opt_ops)
        out[f"op_types_fused_{keep}"] = sorted(set(opt_ops))
    n_hi = len(a.blocks)
    per_block = (out["timings_ms"][n_hi] - out["timings_ms"][1]) / (n_hi - 1)
    kernels_fused = (out[f"ops_fused_{n_hi}"] - out["ops_fused_1"]) / (n_hi - 1)
    kernels_raw = (out[f"ops_raw_{n_hi}"] - out["ops_raw_1"]) / (n_hi - 1)
    linears = len(a.blocks[0].linears)
    out.update(
        per_block_ms=per_block,
        kernels_per_block_fused=kernels_fused,
        kernels_per_block_unfused=kernels_raw,
        linears_per_block=linears,
        intercept_ms=out["timings_ms"][1] - per_block,
    )
    log(
        f"fusion check: a Llama block is {kernels_raw:.0f} ONNX ops, {kernels_fused:.0f} kernels after ORT fusion; "
        f"{per_block * 1e3:.0f} µs fixed per block"
    )
    return out


def calibrate_local(
    threads: int = 1, repeats: int = 9, rounds: int = 3, log: Callable[[str], None] | None = None
) -> tuple[dict, dict]:
    """Run the micro-benchmarks and fit; give (profile dict, raw measurements dict)."""
    import onnxruntime as ort
    import torch

    say = log or (lambda _m: None)
    t0 = time.perf_counter()
    flush = _Flusher()
    samples: list[Sample] = []
    with tempfile.TemporaryDirectory(prefix="autocompress-calib-") as tmpdir:
        tmp = Path(tmpdir)
        say("memory bandwidth: streaming read")
        read_bw = _read_bandwidth_GBps(flush)
        say(f"  {read_bw:.1f} GB/s; GEMV and GEMM sweeps per format ({', '.join(FORMATS)})")
        # every session first, then interleaved rounds keeping each benchmark's lowest median:
        # on a shared machine a burst of load then hits one round, not one benchmark
        benches: list[tuple[Sample, Callable[[], object], bool]] = []
        for fmt in FORMATS:
            for k, n, layers in (*GEMV_SHAPES, *GEMM_SHAPES, *((64, 64, t) for t in TINY_CHAINS)):
                sess = ort_session(_quantized(_chain_model(k, n, layers), fmt, tmp).SerializeToString(), threads)
                tiny = k == 64
                sizes = (1,) + (GEMM_TOKENS if (k, n, layers) in GEMM_SHAPES else ())
                for m in sizes:
                    x = np.ones((m, k), np.float32)
                    sample = Sample(fmt, m, layers, _stored_bytes(fmt, k, n, layers), 2.0 * m * k * n * layers, 1e9)
                    benches.append((sample, lambda s=sess, x=x: s.run(None, {"x": x}), tiny))
        best = [1e9] * len(benches)
        for r in range(rounds):
            for i, (_, run, tiny) in enumerate(benches):
                if tiny:  # fixed costs only: warm, many short repeats
                    ms = statistics.median(timed(run, warmup=20, repeats=200, min_time_s=0.2))
                else:
                    ms = _time_cold(run, flush, repeats)
                best[i] = min(best[i], ms)
            say(f"  round {r + 1}/{rounds}: {len(benches)} timings")
        samples = [Sample(**{**b[0].__dict__, "median_ms": ms}) for b, ms in zip(benches, best, strict=True)]
        say("per-kernel overhead: chains of elementwise ops")
        ew = {}
        for ops in (8, 64):
            sess = ort_session(_elementwise_chain(ops).SerializeToString(), threads)
            x = np.ones((1, 64), np.float32)
            ew[ops] = statistics.median(
                timed(lambda s=sess, x=x: s.run(None, {"x": x}), warmup=20, repeats=200, min_time_s=0.3)
            )
        per_kernel_us = max(0.05, (ew[64] - ew[8]) / 56 * 1e3)
        say("fusion check and fixed costs: tiny Llama with 1 and 4 blocks")
        block = _block_costs(threads, tmp, say)
        say("torch reference (fp32 GEMV/GEMM)")
        torch_ref = _torch_reference(threads, flush, repeats)

    # ---- fit ------------------------------------------------------------------------
    fits: dict[str, dict[str, float]] = {}
    for fmt in FORMATS:
        # cold chains only: in a model the lm_head evicts every weight between tokens, and a cold
        # linear pays a ramp (prefetch, first touch) that warm tiny chains never show
        gemv = [s for s in samples if s.fmt == fmt and s.tokens == 1 and s.weight_bytes > 1e6]
        call_ms, overhead_ms, slope = _fit_bandwidth(gemv)
        gemm = [s for s in samples if s.fmt == fmt and s.tokens >= 64]
        y = np.array([s.median_ms - call_ms - s.linears * overhead_ms for s in gemm])
        f = np.array([s.flops for s in gemm])
        ms_per_flop = float(np.dot(f, y) / np.dot(f, f))
        fits[fmt] = {
            "call_us": call_ms * 1e3,
            "overhead_us": overhead_ms * 1e3,
            "gemv_GBps": 1e-6 / slope,
            "gemm_GFLOPs": 1e-6 / ms_per_flop,
        }
    best_bw = max([read_bw, *(v["gemv_GBps"] for v in fits.values())])
    mhz, flags = _cpu_mhz(), _cpu_flags()
    flop_per_clk = 64.0 if "avx512f" in flags else 32.0  # two FMA pipes x 16 / 8 fp32 lanes x 2
    fp32_peak = max(
        flop_per_clk * mhz * 1e6 * threads, torch_ref["gemm_GFLOPs"] * 1e9, fits["fp32"]["gemm_GFLOPs"] * 1e9
    )
    int8_mult = 4.0 if {"avx512_vnni", "avx_vnni"} & flags else 2.0
    int8_peak = max(int8_mult * fp32_peak, *(fits[f]["gemm_GFLOPs"] * 1e9 for f in ("int8", "int4", "w8a8")))

    def eff(x: float) -> float:
        return round(min(1.0, max(0.01, x)), 4)

    bw_eff = {f: eff(fits[f]["gemv_GBps"] / best_bw) for f in FORMATS}
    c_eff = {"fp32": eff(fits["fp32"]["gemm_GFLOPs"] * 1e9 / fp32_peak)}
    c_eff.update({f: eff(fits[f]["gemm_GFLOPs"] * 1e9 / int8_peak) for f in ("int8", "int4", "w8a8")})
    lin_over = {f: round(fits[f]["overhead_us"], 3) for f in FORMATS}
    non_linear_us = block["per_block_ms"] * 1e3 - block["linears_per_block"] * lin_over["fp32"]
    kernels_per_block = max(1, round(block["kernels_per_block_fused"]))
    per_kernel_fit = max(per_kernel_us, non_linear_us / kernels_per_block)
    # per token: the warm fixed cost of a run (tiny-Llama intercept) + the cold-start of the first
    # weight reads after the caches were flushed (the GEMV fits' per-run term)
    cold_start_ms = float(np.mean([fits[f]["call_us"] for f in FORMATS])) * 1e-3
    per_token_ms = max(0.0, block["intercept_ms"] - lin_over["fp32"] * 1e-3) + cold_start_ms
    fit_mape = _fit_error([s for s in samples if s.weight_bytes > 1e6], fits)  # the cold samples it was fitted to
    total, avail = _meminfo_GB()
    seconds = time.perf_counter() - t0
    today = _dt.date.today().isoformat()
    cpu = _cpu_name()
    profile = {
        "schema_version": 1,
        "id": "local",
        "aliases": ["cpu"],
        "display_name": f"This machine: {cpu} ({threads} thread(s), onnxruntime {ort.__version__} CPU)",
        "device_class": "server_cpu" if any(s in cpu for s in ("EPYC", "Xeon")) else "client_cpu",
        "runtime": "onnxruntime",
        "numerics": "onnxruntime-cpu",  # what our export deploys to: int8 activation rounding
        "power_mode": f"{threads} thread(s)",
        "calibrated": True,
        "sources": [
            f"measured on this machine by `autocompress hw calibrate` on {today} (raw measurements beside this file)",
            "procedure: research/hardware.md §4.3 steps 2, 3, 5, 6 (GEMV/GEMM sweeps per format, tiny-kernel overhead, fusion check)",
            f"peaks [D]: fp32 = max({flop_per_clk:.0f} FLOP/clk x {mhz:.0f} MHz x {threads} thread(s), best measured sgemm); "
            f"int8 = {int8_mult:g} x fp32 ({'VNNI' if int8_mult == 4 else 'no VNNI'})",
        ],
        "notes": "power fields are priors (no power meter readable here); attention and activation traffic are not calibrated",
        "memory_GB": round(total, 2),
        "usable_memory_GB": round(min(avail, total), 2),
        "runtime_overhead_MB": 60.0,
        "peak_bw_GBps": round(best_bw, 3),
        "bw_efficiency": bw_eff["fp32"],
        "bw_efficiency_by_format": bw_eff,
        "kv_cache_bits": 32,
        "dense_bits": 32,
        "fp16_tflops": round(fp32_peak / 1e12, 5),
        "int8_tops": round(int8_peak / 1e12, 5),
        "compute_efficiency": c_eff["fp32"],
        "compute_efficiency_by_format": c_eff,
        "kernels": {
            "weight_only_bits": [4, 8],
            "int8_compute": True,
            "sparse_2_4": False,
            "sparse_2_4_speedup": 1.0,
            "unstructured_sparse_storage": False,
            "low_rank": True,  # onnxruntime runs the two factors as two MatMuls
        },
        "formats": list(LOCAL_FORMATS),
        "scale_bits": 32,
        "zero_bits": 4,
        "per_kernel_overhead_us": round(per_kernel_fit, 3),
        "per_token_overhead_ms": round(per_token_ms, 4),
        "kernels_per_linear": 1,
        "linear_overhead_us_by_format": lin_over,
        "kernels_per_block": kernels_per_block,
        "alignment": 16,
        "misaligned_penalty": 0.95,
        "idle_W": 5.0,
        "active_W": 15.0,
        "calibration": {
            "date": today,
            "host": f"{platform.node()} / {cpu}",
            "threads": threads,
            "seconds": round(seconds, 1),
            "samples": len(samples) + len(ew) + len(block["timings_ms"]) + 2,  # + torch GEMV and GEMM
            "measurements": "",
            "fit_mape": round(fit_mape, 4),
            "tool": f"autocompress hw calibrate; onnxruntime {ort.__version__}; torch {torch.__version__}",
        },
    }
    raw = {
        "read_bandwidth_GBps": read_bw,
        "samples": [s.__dict__ for s in samples],
        "fits": fits,
        "elementwise_chain_ms": ew,
        "block": block,
        "torch": torch_ref,
        "seconds": seconds,
    }
    return profile, raw


def _fit_error(samples: list[Sample], fits: dict[str, dict[str, float]]) -> float:
    errs = []
    for s in samples:
        f = fits[s.fmt]
        pred = (f["call_us"] + s.linears * f["overhead_us"]) * 1e-3 + max(
            s.weight_bytes / (f["gemv_GBps"] * 1e6), s.flops / (f["gemm_GFLOPs"] * 1e6)
        )
        errs.append(abs(pred - s.median_ms) / s.median_ms)
    return float(np.mean(errs))


def _torch_reference(threads: int, flush: _Flusher, repeats: int) -> dict[str, float]:
    """Give torch fp32 GEMV bandwidth and GEMM rate (reference only: the profile is for onnxruntime)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        k, n, layers = max(GEMV_SHAPES, key=lambda kn: kn[0] * kn[1] * kn[2])
        ws = [torch.randn(n, k) if i % 2 == 0 else torch.randn(k, n) for i in range(layers)]

        def chain(x: torch.Tensor) -> torch.Tensor:
            for w in ws:
                x = torch.nn.functional.linear(x, w)
            return x

        with torch.inference_mode():
            gemv = _time_cold(lambda: chain(torch.ones(1, k)), flush, repeats)
            gemm = _time_cold(lambda: chain(torch.ones(128, k)), flush, repeats)
    finally:
        torch.set_num_threads(before)
    return {
        "gemv_ms": gemv,
        "gemv_GBps": layers * k * n * 4 / gemv / 1e6,
        "gemm_ms": gemm,
        "gemm_GFLOPs": 2 * 128 * layers * k * n / gemm / 1e6,
    }


def write_profile(profile: dict, raw: dict, out: str | Path) -> HardwareProfile:
    """Validate and write the profile YAML and, beside it, ``<stem>.measurements.json``; give the profile."""
    out = Path(out)
    if out.suffix not in (".yaml", ".yml"):
        raise ProfileError(f"--out must be a .yaml path, got {out}")
    raw_path = out.with_name(f"{out.stem}.measurements.json")
    profile = {**profile, "calibration": {**profile["calibration"], "measurements": raw_path.name}}
    validated = profile_from_dict(profile, str(out))
    header = (
        "# Calibrated on this machine by `autocompress hw calibrate` -- machine-specific, not for git.\n"
        f"# Raw measurements: {raw_path.name}. Re-run after hardware, runtime or load changes.\n"
    )
    atomic_write_text(raw_path, json.dumps(raw, indent=1, default=float) + "\n")
    atomic_write_text(out, header + yaml.safe_dump(profile, sort_keys=False, width=120))
    return validated


def default_threads() -> int:
    return int(os.environ.get("AUTOCOMPRESS_THREADS", "0")) or 1
