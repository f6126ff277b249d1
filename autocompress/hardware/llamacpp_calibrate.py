"""Calibrate a llama.cpp profile for this machine: llama-bench on GGUF files of one model, fitted so
that the cost model predicts each file's decode and prefill time.

``calibrate_llamacpp()`` writes a set of GGUF files of the model (the bundled default unless told
otherwise) with ``llama-quantize`` from the model's F32 GGUF (``recipes.write_base``): every 2-D tensor
in one type (F16, BF16, Q8_0, Q5_0, Q5_1, Q4_0, Q4_1, IQ4_NL), Q4_0 with ``ffn_down`` in each K-quant
(only ``ffn_down`` has rows of a multiple of 256 on a 576-wide model), three of them again at half
depth and two with half the MLP channels, so per-token, per-block and per-weight costs separate. Held
out from the fit: llama.cpp's own Q4_K_M and Q3_K_M recipes and a half-depth hand mix. Each file is
read back into the plan that stores exactly its tensor types, and measured by ``llama-bench`` at a
fixed thread count (decode ``GEN_TOKENS`` tokens from an empty context, one ``PROMPT_TOKENS`` prefill,
medians of the repeats; one thread is measured in the same run and recorded beside).

The fit is of the cost model itself. With every weight matmul memory-bound at one token, the
``CostModel``'s decode time of a plan is linear in the unknowns::

    t = per_token_overhead + blocks x (kernels_per_block + linears) x per_kernel_overhead
        + sum over formats f of  x_f / eff_f  + (activations, KV cache: fixed)

where ``x_f`` is the time of the plan's bytes in format f at full bandwidth. The features ``x_f``
and the per-kernel count are read off the cost model by finite differences (so the embedding / head,
shape fallbacks and everything else it prices are included exactly as it will predict), and a
bounded least-squares fit on relative error gives the overheads and the per-format bandwidth
efficiencies (keyed by format name). Prefill likewise, with the overheads fixed, gives the per-format
compute efficiencies. The result is reported as the cost model's own predictions with the written
profile: the fit's mean absolute percentage error on the fitted files and on the held-out files.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from autocompress import formats
from autocompress.errors import AutocompressError, ProfileError
from autocompress.hardware.calibrate import _cpu_flags, _cpu_mhz, _cpu_name, _Flusher, _meminfo_GB, _read_bandwidth_GBps
from autocompress.hardware.cost import CostModel
from autocompress.hardware.measure import GEN_TOKENS, PROMPT_TOKENS, measure_gguf_threads
from autocompress.hardware.profile import HardwareProfile, load_profile, profile_from_dict
from autocompress.plan import BlockChoice, LayerChoice, ModelRef, Plan

PROFILE_ID = "local-llamacpp"
CPU_PRIOR = "x86-avx2-laptop"  # the shipped llama.cpp CPU profile: numerics and head format come from it
KERNELS_PER_BLOCK = 6  # the llama.cpp laptop prior; only the per-block total (with the linears) is fitted
DENSE_TYPES = ("F32", "F16", "BF16")
# what the attention's and other unlisted matmuls reach of the fp path's peak (not separable here: a prior)
DEFAULT_COMPUTE_EFFICIENCY = 0.5
MIN_SCALE = 1e-3  # lower bound of a fitted 1/efficiency (an efficiency 1000x the reference is no fit)


@dataclass(frozen=True)
class FileSpec:
    """One GGUF file to measure: how ``llama-quantize`` writes it, and whether it enters the fit."""

    name: str
    ftype: str  # llama-quantize's type / recipe argument (F16, Q8_0, Q4_K_M...)
    role: Literal["fit", "holdout"]
    base: Literal["full", "half", "narrow"] = "full"  # the F32 file it is quantized from (``base_plan``)
    pure: bool = True  # every tensor in ``ftype`` unless named below (False: llama.cpp's recipe rules)
    tensor_types: tuple[tuple[str, str], ...] = ()  # --tensor-type pattern=type
    embedding: str | None = None  # --token-embedding-type

    def quantize_args(self) -> list[str]:
        args = ["--pure"] if self.pure else []
        for pattern, typ in self.tensor_types:
            args += ["--tensor-type", f"{pattern}={typ.lower()}"]
        if self.embedding:
            args += ["--token-embedding-type", self.embedding.lower()]
        return args


UNIFORM = ("F16", "BF16", "Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1", "IQ4_NL")
K_QUANTS = ("Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K")
FILES: tuple[FileSpec, ...] = (
    *(FileSpec(t, t, "fit") for t in UNIFORM),
    *(FileSpec(f"Q4_0+down-{k}", "Q4_0", "fit", tensor_types=(("ffn_down", k),)) for k in K_QUANTS),
    *(FileSpec(f"{t}-half", t, "fit", base="half") for t in ("F16", "Q8_0", "Q4_0")),
    *(FileSpec(f"{t}-narrow", t, "fit", base="narrow") for t in ("Q8_0", "Q4_0")),
    FileSpec("recipe-Q4_K_M", "Q4_K_M", "holdout", pure=False),
    FileSpec("recipe-Q3_K_M", "Q3_K_M", "holdout", pure=False),
    FileSpec(
        "mix-half",
        "Q5_1",
        "holdout",
        base="half",
        tensor_types=(("attn_v", "Q8_0"), ("attn_q", "IQ4_NL"), ("ffn_down", "Q5_K")),
        embedding="Q4_0",
    ),
)


class CalibrationError(AutocompressError):
    """The llama.cpp calibration cannot run or cannot fit its measurements."""


# ---- files --------------------------------------------------------------------------------------


def base_plan(anatomy: Any, base: str, provenance: Any = None) -> Plan:
    """Give the uncompressed plan a file's F32 base is written from: ``full``; ``half`` drops the last half
    of the blocks (the file's blk.N are then the model's first blocks); ``narrow`` keeps half of every
    block's MLP channels. Depth alone cannot tell a per-block fixed cost from a per-weight one (both scale
    with the blocks); narrower blocks with the same kernels can."""
    ref = ModelRef.of(anatomy)
    if base == "half":
        n = anatomy.num_blocks
        return Plan(model=ref, drop_blocks=tuple(range(max(1, n // 2), n)), provenance=provenance)
    if base == "narrow":
        blocks = {b.index: BlockChoice(keep_mlp_channels=max(32, b.mlp_dim // 64 * 32)) for b in anatomy.blocks}
        return Plan(model=ref, blocks=blocks, provenance=provenance)
    if base != "full":
        raise CalibrationError(f"unknown base {base!r}: full, half or narrow")
    return Plan(model=ref, provenance=provenance)


def plan_for_file(path: Path, wb: Any, base: Plan | None = None) -> Plan:
    """Give the plan storing every block linear and the embedding / head in the type the GGUF file gives
    it, dense ones (F16 / BF16) named too, so the cost model prices them by their own efficiency;
    ``base``: the depth and widths the file was written with."""
    from autocompress.runtime import recipes

    types = recipes.tensor_types(path)
    a = wb.lm.anatomy
    if any(t not in DENSE_TYPES for t in types.values()):
        plan = recipes.plan_from_types(types, wb)
    else:
        plan = Plan(model=ModelRef.of(a), provenance=wb.provenance())
    dense = {t for n, t in types.items() if t in ("F16", "BF16") and n.startswith(("blk.", "token_embd", "output."))}
    if len(dense) > 1:
        raise CalibrationError(f"{path.name}: dense tensors in both {' and '.join(sorted(dense))}")
    if dense:
        (dtype,) = dense
        layers = dict(plan.layers)
        if types.get("token_embd.weight") == dtype:
            layers[next(e.name for e in a.embeddings if e.role == "embed")] = LayerChoice(format=dtype)
        if types.get("output.weight") == dtype:
            layers[next(e.name for e in a.embeddings if e.role == "head")] = LayerChoice(format=dtype)
        plan = replace(plan, default=LayerChoice(format=dtype), layers=layers)
    if base is not None:
        plan = replace(plan, drop_blocks=base.drop_blocks, blocks=base.blocks)
    return plan


def write_files(
    wb: Any, work: Path, specs: Sequence[FileSpec], *, threads: int, log: Callable[[str], None]
) -> dict[str, tuple[Path, Plan]]:
    """Write (or reuse, when present in ``work``) every file; give name -> (path, plan)."""
    from autocompress.export.gguf import export_gguf
    from autocompress.runtime import llamacpp

    a = wb.lm.anatomy
    work.mkdir(parents=True, exist_ok=True)
    bases = {kind: base_plan(a, kind, wb.provenance()) for kind in dict.fromkeys(s.base for s in specs)}
    for kind, plan in bases.items():
        path = work / f"base-{kind}-f32.gguf"
        if not path.is_file():
            log(f"writing {path.name} ({a.num_blocks - len(plan.drop_blocks)} blocks, F32)")
            export_gguf(wb, plan, path, dense="F32")
    tools = llamacpp.require()
    out: dict[str, tuple[Path, Plan]] = {}
    for spec in specs:
        path = work / f"{spec.name}.gguf"
        if not path.is_file():
            tmp = path.with_name(f".{path.name}.tmp")
            args = [*spec.quantize_args(), work / f"base-{spec.base}-f32.gguf", tmp, spec.ftype, threads]
            tools.run("llama-quantize", args, what=f"for {spec.name}")
            tmp.replace(path)
        out[spec.name] = (path, plan_for_file(path, wb, bases[spec.base]))
    log(f"{len(out)} GGUF files in {work}")
    return out


# ---- fit ----------------------------------------------------------------------------------------


def _peaks(threads: int) -> tuple[float, float]:
    """Give the datasheet-style peaks (fp32 FLOP/s, int8 OP/s) of this CPU at ``threads`` threads:
    two FMA pipes x 16 (AVX-512) or 8 (AVX2) fp32 lanes x 2 per clock; int8 dot products 4x (VNNI) or 2x."""
    flags = _cpu_flags()
    fp32 = (64.0 if "avx512f" in flags else 32.0) * _cpu_mhz() * 1e6 * threads
    return fp32, fp32 * (4.0 if {"avx512_vnni", "avx_vnni"} & flags else 2.0)


def _with(profile: dict, **change: Any) -> HardwareProfile:
    return profile_from_dict({**profile, **change}, "llama.cpp calibration")


def _predict(profile: HardwareProfile, cases: Sequence[tuple[Plan, Any]], scenario: dict[str, int]) -> np.ndarray:
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
    t0 = _predict(w.profile(**{**at, vary: rates}), cases, scenario)[:, col]
    feats = np.zeros((len(cases), len(fmts)))
    for j, f in enumerate(fmts):
        t = _predict(w.profile(**{**at, vary: {**rates, f: level / 2}}), cases, scenario)[:, col]
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
    t0 = _predict(w.profile(0.0, 0.0, dict.fromkeys(fmts, 1.0), fast), cases, scenario)[:, 0]
    kcol = _predict(w.profile(0.0, 1.0, dict.fromkeys(fmts, 1.0), fast), cases, scenario)[:, 0] - t0
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
        pred = _predict(w.profile(*unpack(v)), cases, scenario)
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
    pred = _predict(profile_from_dict(final, "llama.cpp calibration"), cases, scenario)
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


# ---- the whole calibration ----------------------------------------------------------------------


def _skeleton(threads: int, cpu: str) -> dict:
    """Give the profile fields the fit does not touch (memory, kernels, formats, priors)."""
    total, avail = _meminfo_GB()
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


def calibrate_llamacpp(
    model: str | None = None,
    threads: int = 2,
    repeats: int = 3,
    *,
    work: Path | None = None,
    specs: Sequence[FileSpec] | None = None,
    also_threads: Sequence[int] = (1,),
    log: Callable[[str], None] | None = None,
) -> tuple[dict, dict]:
    """Write the GGUF files, measure them with llama-bench and fit; give (profile dict, raw measurements).

    ``work`` keeps the files (reused by a rerun); by default they go to a temporary folder.
    ``specs``: the files (default ``FILES``). ``also_threads``: thread counts measured in the same
    llama-bench runs and recorded, not fitted."""
    from autocompress.calib import DataConfig
    from autocompress.runtime import llamacpp
    from autocompress.workbench import Workbench

    say = log or (lambda _m: None)
    specs = FILES if specs is None else tuple(specs)
    if threads < 1 or repeats < 1:
        raise CalibrationError("threads and repeats must be positive")
    if sum(s.role == "fit" for s in specs) < 2 or not any(s.role == "holdout" for s in specs):
        raise CalibrationError("the calibration needs at least two fitted files and one held-out file")
    llamacpp.require()
    t_start = time.perf_counter()
    counts = tuple(dict.fromkeys([threads, *(t for t in also_threads if t != threads)]))
    # the files only need the weights and tokenizer: the smallest data set keeps opening quick
    wb = Workbench.open(model, DataConfig(seq_len=64, calib_tokens=512, proxy_tokens=128, eval_tokens=256))
    a = wb.lm.anatomy
    with tempfile.TemporaryDirectory(prefix="autocompress-llamacpp-") as tmp:
        folder = Path(work) if work is not None else Path(tmp)
        files = write_files(wb, folder, specs, threads=threads, log=say)
        say(
            f"llama-bench: decode {GEN_TOKENS} tokens, prefill {PROMPT_TOKENS} tokens, {repeats} repeats, "
            f"threads {', '.join(map(str, counts))}"
        )
        measured: dict[str, dict[int, dict[str, Any]]] = {}
        for i, spec in enumerate(specs):
            path = files[spec.name][0]
            measured[spec.name] = measure_gguf_threads(path, counts, repeats)
            m = measured[spec.name][threads]
            say(
                f"  {i + 1}/{len(specs)} {spec.name}: {m['decode_tok_s']:.1f} tok/s decode, {m['prefill_tok_s']:.0f} prefill"
            )
        sizes = {s.name: files[s.name][0].stat().st_size for s in specs}
    say("streaming-read bandwidth (the activations' and KV cache's reference)")
    read_bw = _read_bandwidth_GBps(_Flusher())
    fp_peak, int8_peak = _peaks(threads)
    cpu = _cpu_name()
    skeleton = _skeleton(threads, cpu)
    scenario = {"prompt_tokens": PROMPT_TOKENS, "context_tokens": max(1, GEN_TOKENS // 2)}
    cases = [(files[s.name][1], a) for s in specs]
    fit_idx = [i for i, s in enumerate(specs) if s.role == "fit"]
    dec = [measured[s.name][threads]["decode_ms"] for s in specs]
    pre = [measured[s.name][threads]["prefill_ms"] for s in specs]
    fit = fit_profile(
        {**skeleton, "sources": ["-"], "calibration": None, "calibrated": False},
        [cases[i] for i in fit_idx],
        [dec[i] for i in fit_idx],
        [pre[i] for i in fit_idx],
        reference_bw_GBps=read_bw,
        fp_peak=fp_peak,
        int8_peak=int8_peak,
        scenario=scenario,
        dense_format=_dense_format(wb),
    )
    fitted = profile_from_dict(fit.profile, "llama.cpp calibration")
    pred = _predict(fitted, cases, scenario)
    rows = []
    for i, spec in enumerate(specs):
        m = measured[spec.name]
        rows.append(
            {
                "name": spec.name,
                "role": spec.role,
                "llama_quantize": [*spec.quantize_args(), spec.ftype],
                "blocks": a.num_blocks - len(files[spec.name][1].drop_blocks),
                "file_bytes": sizes[spec.name],
                "tensor_types": _type_counts(files[spec.name][1], a),
                "measured": {str(t): v for t, v in m.items()},
                "decode_ms": dec[i],
                "decode_ms_predicted": float(pred[i, 0]),
                "prefill_ms": pre[i],
                "prefill_ms_predicted": float(pred[i, 1]),
            }
        )
    held = [r for r in rows if r["role"] == "holdout"]
    fitted_rows = [r for r in rows if r["role"] == "fit"]

    def err(rs: list[dict], key: str) -> float:
        return mape([r[f"{key}_predicted"] for r in rs], [r[key] for r in rs])

    errors = {
        "decode_fit_mape": err(fitted_rows, "decode_ms"),
        "decode_holdout_mape": err(held, "decode_ms"),
        "prefill_fit_mape": err(fitted_rows, "prefill_ms"),
        "prefill_holdout_mape": err(held, "prefill_ms"),
    }
    n_params = fit.decode_parameters
    seconds = time.perf_counter() - t_start
    commit = next(iter(measured.values()))[threads]["build_commit"]
    today = _dt.date.today().isoformat()
    profile = {
        **fit.profile,
        "sources": [
            f"measured on this machine by `autocompress hw calibrate --runtime llama.cpp` on {today} "
            "(raw measurements beside this file)",
            f"llama-bench (llama.cpp {commit}, llama-cpp-python {llamacpp.LLAMA_CPP_PYTHON} sdist): decode "
            f"{GEN_TOKENS} tokens from an empty context, prefill {PROMPT_TOKENS} tokens, {threads} thread(s), "
            f"median of {repeats} repeats, on {len(specs)} GGUF files of {a.name}",
            f"peaks [D]: fp32 {fp_peak / 1e9:.0f} GFLOP/s, int8 {int8_peak / 1e9:.0f} GOP/s at {threads} thread(s) "
            "(raised to the fastest format measured where one beats them); bandwidth reference: a one-core "
            f"streaming read, {read_bw:.1f} GB/s",
        ],
        "notes": (
            f"decode MAPE {errors['decode_fit_mape']:.1%} on {len(fitted_rows)} fitted files ({n_params} parameters), "
            f"{errors['decode_holdout_mape']:.1%} on {len(held)} held-out files ({', '.join(r['name'] for r in held)}); "
            f"prefill {errors['prefill_fit_mape']:.1%} / {errors['prefill_holdout_mape']:.1%}. Measured on a shared, "
            "noisy machine: rerun when the load changes. Efficiencies are per format, against the peaks above; "
            f"kernels_per_block is a prior ({KERNELS_PER_BLOCK}): only the per-block total is fitted. Power fields, "
            "runtime_overhead_MB and misaligned_penalty are priors."
        ),
        "calibrated": True,
        "calibration": {
            "date": today,
            "host": f"{platform.node()} / {cpu}",
            "threads": threads,
            "seconds": round(seconds, 1),
            "samples": len(specs) * len(counts) * 2 * repeats,  # files x thread counts x (decode, prefill) x repeats
            "measurements": "",
            "fit_mape": round(errors["decode_fit_mape"], 4),
            "tool": f"autocompress hw calibrate --runtime llama.cpp; llama-bench {commit}",
        },
    }
    raw = {
        "runtime": "llama.cpp",
        "model": a.name,
        "threads": threads,
        "threads_recorded": list(counts),
        "repeats": repeats,
        "prompt_tokens": PROMPT_TOKENS,
        "gen_tokens": GEN_TOKENS,
        "scenario": scenario,
        "read_bandwidth_GBps": read_bw,
        "peaks": {"fp32_flops": fp_peak, "int8_ops": int8_peak},
        "fit_parameters": {"decode": n_params, "prefill": fit.prefill_parameters},
        "files": rows,
        "errors": errors,
        "seconds": seconds,
        "cpu_count": os.cpu_count(),
    }
    say(
        f"decode MAPE {errors['decode_fit_mape']:.1%} fitted, {errors['decode_holdout_mape']:.1%} held out; "
        f"prefill {errors['prefill_fit_mape']:.1%} / {errors['prefill_holdout_mape']:.1%}"
    )
    return profile, raw


def _dense_format(wb: Any) -> str:
    """Give the GGUF type GGUF export stores a plan's dense tensors in (the base model's storage dtype)."""
    from autocompress.export.gguf import _STORAGE
    from autocompress.export.hf import storage_dtype

    return _STORAGE[storage_dtype(wb.lm.model)]


def _type_counts(plan: Plan, anatomy: Any) -> dict[str, int]:
    """Give how many block linears and tables the plan stores in each format."""
    counts: dict[str, int] = {}
    names = [s.name for s in anatomy.linears if s.block not in plan.drop_blocks]
    choices = [plan.choice_for(n) for n in names] + [plan.embedding_choice(e.name) for e in anatomy.embeddings]
    for c in choices:
        key = c.format or "F16"
        counts[key] = counts.get(key, 0) + 1
    return counts


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
