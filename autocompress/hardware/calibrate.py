"""Fit an onnxruntime profile for this machine from its micro-benchmark timings, and write profiles.

``autocompress.calibration.onnx`` measures (GEMV / GEMM chains per weight format, elementwise
chains, a KV-cache decoder at 1 and 8 blocks, torch for reference); ``fit_local`` turns those timings into
profile fields. A least-squares fit per format of
``t = L * overhead + max(flops / (peak * eta_c), bytes / (bw * eta_bw))``
gives the profile's efficiency and overhead fields (hardware.md §4.3, steps 2, 3, 5, 6). The
result is a profile marked ``calibrated: true`` plus the raw measurements, written beside it by
``write_profile``. Energy is not measured (no power meter is readable on a VM): power fields stay priors.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from autocompress._io import atomic_write_text
from autocompress.errors import ProfileError
from autocompress.hardware.machine import cpu_mhz, cpu_name, flop_per_clock, int8_multiplier, meminfo_GB
from autocompress.hardware.profile import HardwareProfile, profile_from_dict

# the weight paths the micro-benchmarks time (``calibration/onnx.py``): fp32 MatMul, weight-only 8-bit and
# 4-bit MatMulNBits, and W8A8 as dynamic int8 (MatMulInteger)
FORMATS = ("fp32", "int8", "int4", "w8a8")
# what a calibrated onnxruntime profile offers the search: MatMulNBits 4-bit (blocks of 32 / 128,
# with or without zero points) and 8-bit weight-only, all on the generic integer grids
LOCAL_FORMATS = ("int8-ch-sym", "int8-ch-asym", "int4-g32-sym", "int4-g32-asym", "int4-g128-sym", "int4-g128-asym")


@dataclass(frozen=True)
class Sample:
    """One timed micro-benchmark: a chain of ``linears`` matmuls on ``tokens`` rows."""

    fmt: str
    tokens: int
    linears: int
    weight_bytes: float
    flops: float
    median_ms: float


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


def fit_local(
    samples: list[Sample],
    *,
    read_bw_GBps: float,
    elementwise_chain_ms: dict[int, float],
    block: dict[str, Any],
    torch_ref: dict[str, float],
    threads: int,
    seconds: float,
    tool: str,
    runtime_version: str,
) -> tuple[dict, dict]:
    """Give (profile dict, raw measurements dict) fitted to the micro-benchmarks' timings.

    ``samples``: the timed chains; ``elementwise_chain_ms``: warm chains of 8 and 64 elementwise ops;
    ``block``: the KV-cache decoder's fused kernels per block, time per block (``per_block_ms``, its
    linears included), its intercept, and its linears (count, ``linear_format``, bytes);
    ``torch_ref``: torch's fp32 GEMV / GEMM figures; ``tool`` and ``runtime_version`` name what
    measured (onnxruntime's version)."""
    read_bw, ew = read_bw_GBps, elementwise_chain_ms
    per_kernel_us = max(0.05, (ew[64] - ew[8]) / 56 * 1e3)
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
    mhz, flop_per_clk = cpu_mhz(), flop_per_clock()
    fp32_peak = max(
        flop_per_clk * mhz * 1e6 * threads, torch_ref["gemm_GFLOPs"] * 1e9, fits["fp32"]["gemm_GFLOPs"] * 1e9
    )
    int8_mult = int8_multiplier()
    int8_peak = max(int8_mult * fp32_peak, *(fits[f]["gemm_GFLOPs"] * 1e9 for f in ("int8", "int4", "w8a8")))

    def eff(x: float) -> float:
        return round(min(1.0, max(0.01, x)), 4)

    bw_eff = {f: eff(fits[f]["gemv_GBps"] / best_bw) for f in FORMATS}
    c_eff = {"fp32": eff(fits["fp32"]["gemm_GFLOPs"] * 1e9 / fp32_peak)}
    c_eff.update({f: eff(fits[f]["gemm_GFLOPs"] * 1e9 / int8_peak) for f in ("int8", "int4", "w8a8")})
    lin_over = {f: round(fits[f]["overhead_us"], 3) for f in FORMATS}
    # the block check times the deployed decoder cold, its linears included: take them out as their
    # format's GEMV fit prices them (per-linear overhead + bytes at the fitted rate); the rest is
    # the block's other kernels (norms, RoPE, the KV cache's concat, attention, reshapes)
    lin_fmt = block["linear_format"]
    linears_us = block["linears_per_block"] * lin_over[lin_fmt] + block["linear_bytes_per_block"] / (
        fits[lin_fmt]["gemv_GBps"] * 1e3
    )
    non_linear_us = block["per_block_ms"] * 1e3 - linears_us
    kernels_per_block = max(1, round(block["kernels_per_block_fused"]))
    per_kernel_fit = max(per_kernel_us, non_linear_us / kernels_per_block)
    # per token: the 1-block decoder's intercept, cold (embedding lookup, final norm, the small head,
    # the first weight reads after the caches were flushed)
    per_token_ms = max(0.0, block["intercept_ms"])
    fit_mape = _fit_error([s for s in samples if s.weight_bytes > 1e6], fits)  # the cold samples it was fitted to
    total, avail = meminfo_GB()
    today = _dt.date.today().isoformat()
    cpu = cpu_name()
    profile = {
        "schema_version": 1,
        "id": "local",
        "aliases": ["cpu"],
        "display_name": f"This machine: {cpu} ({threads} thread(s), onnxruntime {runtime_version} CPU)",
        "device_class": "server_cpu" if any(s in cpu for s in ("EPYC", "Xeon")) else "client_cpu",
        "runtime": "onnxruntime",
        "numerics": "onnxruntime-cpu",  # what our export deploys to: int8 activation rounding
        "power_mode": f"{threads} thread(s)",
        "calibrated": True,
        "sources": [
            f"measured on this machine by `autocompress hw calibrate` on {today} (raw measurements beside this file)",
            "procedure: research/hardware.md §4.3 steps 2, 3, 5, 6 (GEMV/GEMM sweeps per format, tiny-kernel overhead, "
            "fusion check and fixed costs on the KV-cache decoder of a 576-wide Llama, 1 and 8 blocks, cold)",
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
            "tool": f"autocompress hw calibrate; {tool}",
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
