"""Fit a llama.cpp profile of this machine to llama-bench timings of GGUF files, so that the cost model
predicts each file's decode and prefill time.

``autocompress.calibration.llamacpp`` writes and measures the files; this module holds the fit. With every
weight matmul memory-bound at one token, the ``CostModel``'s decode time of a plan is linear in the unknowns::

    t = per_token_overhead + blocks x (kernels_per_block + linears) x per_kernel_overhead
        + sum over formats f of  x_f / eff_f  + (activations, KV cache: fixed)

where ``x_f`` is the time of the plan's bytes in format f at full bandwidth. The features ``x_f``
and the per-kernel count are read off the cost model by finite differences (so the embedding / head,
shape fallbacks and everything else it prices are included exactly as it will predict), and a
bounded least-squares fit on relative error gives the overheads and the per-format bandwidth
efficiencies (keyed by format name). Prefill likewise, with the overheads fixed, gives the per-format
compute efficiencies. The result is reported as the cost model's own predictions with the written
profile: the fit's mean absolute percentage error on the fitted files and on the held-out files.

``python -m autocompress.hardware.llamacpp_calibrate <measurements.json>`` prints a run's measured-vs-predicted table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from autocompress import formats
from autocompress.errors import ProfileError
from autocompress.hardware.cost import CostModel
from autocompress.hardware.machine import meminfo_GB
from autocompress.hardware.profile import HardwareProfile, load_profile, profile_from_dict
from autocompress.plan import Plan

PROFILE_ID = "local-llamacpp"
CPU_PRIOR = "x86-avx2-laptop"  # the shipped llama.cpp CPU profile: numerics and head format come from it
KERNELS_PER_BLOCK = 6  # the llama.cpp laptop prior; only the per-block total (with the linears) is fitted
# what the attention's and other unlisted matmuls reach of the fp path's peak (not separable here: a prior)
DEFAULT_COMPUTE_EFFICIENCY = 0.5
MIN_SCALE = 1e-3  # lower bound of a fitted 1/efficiency (an efficiency 1000x the reference is no fit)


# ---- fit ----------------------------------------------------------------------------------------


def _with(profile: dict, **change: Any) -> HardwareProfile:
    return profile_from_dict({**profile, **change}, "llama.cpp calibration")


def predict_ms(profile: HardwareProfile, cases: Sequence[tuple[Plan, Any]], scenario: dict[str, int]) -> np.ndarray:
    """Give [decode ms, prefill ms] of each (plan, anatomy) under ``profile``."""
    rows = []
    for plan, anatomy in cases:
        c = CostModel(profile, anatomy, **scenario).predict(plan)
        rows.append((c.decode_ms_per_token, c.prefill_ms))
    return np.array(rows)


def _formats_in(cases: Sequence[tuple[Plan, Any]]) -> list[str]:
    """Give the registry formats the plans store any weight in (dense tensors are named formats here)."""
    seen: dict[str, None] = {}
    for plan, anatomy in cases:
        for s in anatomy.linears:
            if s.block not in plan.drop_blocks:
                seen[plan.choice_for(s.name).format or "F16"] = None
        for e in anatomy.embeddings:
            seen[plan.embedding_choice(e.name).format or "F16"] = None
    return [f for f in seen if f != "F32"]


_WORK = 1e3  # while fitting, peaks are this many times the references: no efficiency reaches 1 on the way


@dataclass(frozen=True)
class _Working:
    """Profile fields in fitting units: bandwidths as multiples of the reference bandwidth, compute rates as
    multiples of their path's peak (either may exceed 1 here; the written profile rescales the peaks)."""

    base: dict
    ref_bw: float
    fp_peak: float
    int8_peak: float

    def profile(self, tok_ms: float, kernel_us: float, bw: dict[str, float], rate: dict[str, float]) -> HardwareProfile:
        return _with(
            self.base,
            peak_bw_GBps=self.ref_bw * _WORK,
            bw_efficiency=1 / _WORK,
            bw_efficiency_by_format={f: b / _WORK for f, b in bw.items()},
            fp16_tflops=self.fp_peak * _WORK / 1e12,
            int8_tops=self.int8_peak * _WORK / 1e12,
            compute_efficiency=DEFAULT_COMPUTE_EFFICIENCY / _WORK,
            compute_efficiency_by_format={f: r / _WORK for f, r in rate.items()},
            per_token_overhead_ms=tok_ms,
            per_kernel_overhead_us=kernel_us,
        )


def _linear_part(
    w: _Working, cases: Sequence, scenario: dict, col: int, at: dict, vary: str, fmts: Sequence[str], level: float
) -> tuple[np.ndarray, np.ndarray]:
    """Give (fixed part, per-format features) of decode (``col`` 0) or prefill (1) times around ``at`` with the
    ``vary`` rates (``bw`` or ``rate``) of every format at ``level``: time = fixed + sum_f feature_f / rate_f
    where that term dominates its roofline (read off the cost model by halving one rate)."""
    rates = dict.fromkeys(fmts, level)
    t0 = predict_ms(w.profile(**{**at, vary: rates}), cases, scenario)[:, col]
    feats = np.zeros((len(cases), len(fmts)))
    for j, f in enumerate(fmts):
        t = predict_ms(w.profile(**{**at, vary: {**rates, f: level / 2}}), cases, scenario)[:, col]
        feats[:, j] = (t - t0) * level
    return t0 - feats.sum(axis=1) / level, feats


def _solve(a: np.ndarray, y: np.ndarray, lower: np.ndarray) -> np.ndarray:
    """Give x >= lower minimizing the relative error of a @ x against y (bounded linear least squares)."""
    from scipy.optimize import lsq_linear

    w = 1.0 / y
    return lsq_linear(a * w[:, None], y * w, bounds=(lower, np.inf), method="bvls").x


@dataclass(frozen=True)
class Fit:
    """The fitted profile fields and how well the cost model then predicts the measured files."""

    profile: dict
    decode_pred_ms: np.ndarray
    prefill_pred_ms: np.ndarray
    decode_parameters: int  # per-token, per-kernel overhead and one bandwidth efficiency per format seen
    prefill_parameters: int  # one compute efficiency per format seen


def fit_profile(
    skeleton: dict,
    cases: Sequence[tuple[Plan, Any]],
    decode_ms: Sequence[float],
    prefill_ms: Sequence[float],
    *,
    reference_bw_GBps: float,
    fp_peak: float,
    int8_peak: float,
    scenario: dict[str, int],
    dense_format: str = "BF16",
) -> Fit:
    """Fit the overheads and per-format efficiencies of ``skeleton`` (a profile dict) to measured times.

    ``reference_bw_GBps`` is the bandwidth activations and the KV cache are read at (a streaming read);
    the peaks are the compute references. Two linear fits give the start (decode with the weights'
    reads as the only matmul cost, then prefill with the compute as its only one); a least-squares fit
    of the cost model's own decode and prefill times (relative errors) finishes, so matmuls on either
    side of the roofline are priced as the cost model will price them. The peaks are then raised to the
    fastest format where one beats its reference (every efficiency <= 1; predictions unchanged).
    ``dense_format``: the type a plan's dense tensors are exported in (their ``fp16`` class key)."""
    from scipy.optimize import least_squares

    y_dec, y_pre = np.asarray(decode_ms, float), np.asarray(prefill_ms, float)
    fmts = _formats_in(cases)
    base = {
        **skeleton,
        "kernels_per_block": KERNELS_PER_BLOCK,
        "kernels_per_linear": 1,
        "linear_overhead_us_by_format": {},
    }
    w = _Working(base, reference_bw_GBps, fp_peak, int8_peak)
    fast = dict.fromkeys(fmts, _WORK)  # compute at the working peak: negligible beside the reads
    # decode: t = fixed + tok + k * per_kernel + sum_f x_f / bw_f
    at = {"tok_ms": 0.0, "kernel_us": 0.0, "rate": fast}
    fixed, x = _linear_part(w, cases, scenario, 0, at, "bw", fmts, 1.0)
    t0 = predict_ms(w.profile(0.0, 0.0, dict.fromkeys(fmts, 1.0), fast), cases, scenario)[:, 0]
    kcol = predict_ms(w.profile(0.0, 1.0, dict.fromkeys(fmts, 1.0), fast), cases, scenario)[:, 0] - t0
    used = [f for j, f in enumerate(fmts) if x[:, j].any()]
    a = np.column_stack([np.ones(len(cases)), kcol, x[:, [fmts.index(f) for f in used]]])
    sol = _solve(a, y_dec - fixed, np.array([0.0, 0.0, *([1 / _WORK] * len(used))]))
    tok_ms, kernel_us = float(sol[0]), float(sol[1])
    bw = {**dict.fromkeys(fmts, 1.0), **{f: 1 / v for f, v in zip(used, sol[2:], strict=True)}}
    # prefill with those: t = fixed + sum_f flops-time_f / rate_f (features where compute dominates)
    level = 1e-3
    fixed_p, xp = _linear_part(
        w, cases, scenario, 1, {"tok_ms": tok_ms, "kernel_us": kernel_us, "bw": bw}, "rate", fmts, level
    )
    used_p = [f for j, f in enumerate(fmts) if xp[:, j].any()]
    sol_p = _solve(xp[:, [fmts.index(f) for f in used_p]], y_pre - fixed_p, np.full(len(used_p), 1 / _WORK))
    rate = {**fast, **{f: 1 / v for f, v in zip(used_p, sol_p, strict=True)}}

    # the cost model itself, both phases: x = [tok, kernel, log bw_f..., log rate_f...]
    def unpack(v: np.ndarray) -> tuple[float, float, dict[str, float], dict[str, float]]:
        b = {**bw, **dict(zip(used, np.exp(v[2 : 2 + len(used)]), strict=True))}
        r = {**rate, **dict(zip(used_p, np.exp(v[2 + len(used) :]), strict=True))}
        return float(v[0]), float(v[1]), b, r

    def residuals(v: np.ndarray) -> np.ndarray:
        pred = predict_ms(w.profile(*unpack(v)), cases, scenario)
        return np.concatenate([pred[:, 0] / y_dec - 1, pred[:, 1] / y_pre - 1])

    lo = np.array([0.0, 0.0, *([np.log(1e-3)] * (len(used) + len(used_p)))])
    hi = np.array([np.inf, np.inf, *([np.log(_WORK)] * (len(used) + len(used_p)))])
    v0 = np.array([tok_ms, kernel_us, *(np.log(bw[f]) for f in used), *(np.log(rate[f]) for f in used_p)])
    v0 = np.clip(v0, lo, np.where(np.isfinite(hi), hi, v0))
    best = least_squares(residuals, v0, bounds=(lo, hi), x_scale="jac", xtol=1e-10, ftol=1e-10)
    tok_ms, kernel_us, bw, rate = unpack(best.x)

    # the written profile: peaks raised to the fastest format measured (rates relative to the references)
    bw = {f: bw[f] for f in used}
    rate = {f: rate[f] for f in used_p}
    peak_bw = reference_bw_GBps * max([1.0, *bw.values()])
    is_float = {f: formats.get(f).is_float for f in rate}
    fp_scale = max([1.0, *(r for f, r in rate.items() if is_float[f])])
    int_scale = max([1.0, *(r for f, r in rate.items() if not is_float[f])])
    final = {
        **base,
        "peak_bw_GBps": peak_bw,
        "bw_efficiency": reference_bw_GBps / peak_bw,
        "bw_efficiency_by_format": {f: b * reference_bw_GBps / peak_bw for f, b in bw.items()},
        "fp16_tflops": fp_peak * fp_scale / 1e12,
        "int8_tops": int8_peak * int_scale / 1e12,
        "compute_efficiency": DEFAULT_COMPUTE_EFFICIENCY / fp_scale,
        "compute_efficiency_by_format": {f: r / (fp_scale if is_float[f] else int_scale) for f, r in rate.items()},
        "per_token_overhead_ms": tok_ms,
        "per_kernel_overhead_us": kernel_us,
    }
    final = _rounded(_with_class_keys(final, dense_format))
    pred = predict_ms(profile_from_dict(final, "llama.cpp calibration"), cases, scenario)
    return Fit(final, pred[:, 0], pred[:, 1], 2 + len(used), len(used_p))


def _with_class_keys(profile: dict, dense_format: str) -> dict:
    """Add class keys (``int4``, ``fp16``...) for formats of a width that was measured, so a format the
    fit never saw (a later GGUF type) falls back to its measured siblings (their median). ``fp16`` is
    also what a plan's dense tensors are priced by: they are exported in ``dense_format``, so its value."""
    out = dict(profile)
    for field in ("bw_efficiency_by_format", "compute_efficiency_by_format"):
        table = dict(profile[field])
        by_class: dict[str, list[float]] = {}
        for name, eff in profile[field].items():
            key = "fp16" if formats.get(name).is_float else f"int{min(formats.get(name).bits, 8)}"
            by_class.setdefault(key, []).append(eff)
        for key, vals in by_class.items():
            table.setdefault(key, float(np.median(vals)))
        if dense_format in table:
            table["fp16"] = table[dense_format]
        out[field] = table
    return out


def _rounded(profile: dict) -> dict:
    def r(v: float) -> float:
        return float(f"{v:.5g}") if abs(v) > 1e-9 else 0.0

    out = {k: (r(v) if isinstance(v, float) else v) for k, v in profile.items()}
    for field in ("bw_efficiency_by_format", "compute_efficiency_by_format"):
        out[field] = {k: min(1.0, r(v)) for k, v in profile[field].items()}
    out["bw_efficiency"] = min(1.0, out["bw_efficiency"])
    out["compute_efficiency"] = min(1.0, out["compute_efficiency"])
    return out


def mape(pred: Sequence[float], measured: Sequence[float]) -> float:
    """Give the mean absolute percentage error (a fraction) of predictions against measurements."""
    p, m = np.asarray(pred, float), np.asarray(measured, float)
    return float(np.mean(np.abs(p - m) / m)) if len(m) else float("nan")


# ---- the profile ----------------------------------------------------------------------------------


def skeleton(threads: int, cpu: str) -> dict:
    """Give the profile fields the fit does not touch (memory, kernels, formats, priors)."""
    total, avail = meminfo_GB()
    try:  # the llama.cpp CPU prior: its numerics and head format
        prior = load_profile(CPU_PRIOR)
        numerics, head = prior.numerics, prior.head_format
    except ProfileError:  # a profile folder without it ($AUTOCOMPRESS_HW_PROFILES)
        numerics, head = "exact", "Q6_K"
    return {
        "schema_version": 1,
        "id": PROFILE_ID,
        "aliases": [],
        "display_name": f"This machine: {cpu} ({threads} thread(s), llama.cpp CPU)",
        "device_class": "server_cpu" if any(s in cpu for s in ("EPYC", "Xeon")) else "client_cpu",
        "runtime": "llama.cpp",
        "formats": [f.name for f in formats.for_runtime("llama.cpp")],
        "head_format": head,
        "numerics": numerics,
        "power_mode": f"{threads} thread(s)",
        "calibrated": True,
        "memory_GB": round(total, 2),
        "usable_memory_GB": round(min(avail, total), 2),
        "runtime_overhead_MB": 60.0,
        "kv_cache_bits": 16,  # llama.cpp's default F16 KV cache
        "dense_bits": 16,
        "kernels": {
            "weight_only_bits": [2, 3, 4, 5, 6, 8],
            "int8_compute": True,  # quantized dot products on 8-bit activations (Q8_0 / Q8_K)
            "sparse_2_4": False,
            "sparse_2_4_speedup": 1.0,
            "unstructured_sparse_storage": False,
            "low_rank": False,  # llama.cpp builds its own graph: no factorized linear
        },
        "alignment": 32,
        "misaligned_penalty": 0.9,
        "idle_W": 5.0,
        "active_W": 15.0,
    }


def markdown_table(raw: dict) -> str:
    """Give the measurements file's per-file table (measured vs predicted) and errors as Markdown."""
    threads = raw["threads"]
    others = [t for t in raw["threads_recorded"] if t != threads]
    head = ["file", "role", "MB", "blocks", f"decode ms ({threads}t)", "predicted", "error"]
    head += [f"prefill ms ({threads}t)", "predicted", "error", *(f"decode ms ({t}t)" for t in others)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in raw["files"]:
        cells = [r["name"], r["role"], f"{r['file_bytes'] / 1e6:.1f}", str(r["blocks"])]
        cells += [
            f"{r['decode_ms']:.3f}",
            f"{r['decode_ms_predicted']:.3f}",
            f"{r['decode_ms_predicted'] / r['decode_ms'] - 1:+.1%}",
        ]
        cells += [
            f"{r['prefill_ms']:.1f}",
            f"{r['prefill_ms_predicted']:.1f}",
            f"{r['prefill_ms_predicted'] / r['prefill_ms'] - 1:+.1%}",
        ]
        cells += [f"{r['measured'][str(t)]['decode_ms']:.3f}" for t in others]
        lines.append("| " + " | ".join(cells) + " |")
    e, n = raw["errors"], raw["fit_parameters"]
    lines.append("")
    lines.append(
        f"Decode MAPE {e['decode_fit_mape']:.1%} on the fitted files ({n['decode']} parameters), "
        f"{e['decode_holdout_mape']:.1%} on the held-out ones; prefill {e['prefill_fit_mape']:.1%} / "
        f"{e['prefill_holdout_mape']:.1%} ({n['prefill']} parameters)."
    )
    return "\n".join(lines)


if (
    __name__ == "__main__"
):  # python -m autocompress.hardware.llamacpp_calibrate hw_profiles/local-llamacpp.measurements.json
    import json
    import sys

    print(markdown_table(json.loads(Path(sys.argv[1]).read_text())))
