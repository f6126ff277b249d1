"""Calibrate a llama.cpp profile for this machine: llama-bench on GGUF files of one model, fitted by
``hardware.llamacpp_calibrate.fit_profile`` so that the cost model predicts each file's decode and prefill time.

``calibrate_llamacpp()`` writes a set of GGUF files of the model (the bundled default unless told
otherwise) with ``llama-quantize`` from the model's F32 GGUF (``export_gguf``): every 2-D tensor
in one type (F16, BF16, Q8_0, Q5_0, Q5_1, Q4_0, Q4_1, IQ4_NL), Q4_0 with ``ffn_down`` in each K-quant
(only ``ffn_down`` has rows of a multiple of 256 on a 576-wide model), three of them again at half
depth and two with half the MLP channels, so per-token, per-block and per-weight costs separate. Held
out from the fit: llama.cpp's own Q4_K_M and Q3_K_M recipes and a half-depth hand mix. Each file is
read back into the plan that stores exactly its tensor types, and measured by ``llama-bench`` at a
fixed thread count (decode ``GEN_TOKENS`` tokens from an empty context, one ``PROMPT_TOKENS`` prefill,
medians of the repeats; one thread is measured in the same run and recorded beside).
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

from autocompress.calib import DataConfig
from autocompress.errors import AutocompressError
from autocompress.export.gguf import dense_type, export_gguf
from autocompress.hardware.llamacpp_calibrate import KERNELS_PER_BLOCK, fit_profile, mape, predict_ms, skeleton
from autocompress.hardware.machine import Flusher, cpu_name, peaks, read_bandwidth_GBps
from autocompress.hardware.profile import profile_from_dict
from autocompress.plan import BlockChoice, LayerChoice, ModelRef, Plan
from autocompress.runtime import llamacpp, recipes
from autocompress.runtime.llama_bench import GEN_TOKENS, PROMPT_TOKENS, measure_gguf_threads
from autocompress.workbench import Workbench

DENSE_TYPES = ("F32", "F16", "BF16")


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
    read_bw = read_bandwidth_GBps(Flusher())
    fp_peak, int8_peak = peaks(threads)
    cpu = cpu_name()
    fields = skeleton(threads, cpu)
    scenario = {"prompt_tokens": PROMPT_TOKENS, "context_tokens": max(1, GEN_TOKENS // 2)}
    cases = [(files[s.name][1], a) for s in specs]
    fit_idx = [i for i, s in enumerate(specs) if s.role == "fit"]
    dec = [measured[s.name][threads]["decode_ms"] for s in specs]
    pre = [measured[s.name][threads]["prefill_ms"] for s in specs]
    fit = fit_profile(
        {**fields, "sources": ["-"], "calibration": None, "calibrated": False},
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
    pred = predict_ms(fitted, cases, scenario)
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
    return dense_type(wb.lm.model)


def _type_counts(plan: Plan, anatomy: Any) -> dict[str, int]:
    """Give how many block linears and tables the plan stores in each format."""
    counts: dict[str, int] = {}
    names = [s.name for s in anatomy.linears if s.block not in plan.drop_blocks]
    choices = [plan.choice_for(n) for n in names] + [plan.embedding_choice(e.name) for e in anatomy.embeddings]
    for c in choices:
        key = c.format or "F16"
        counts[key] = counts.get(key, 0) + 1
    return counts
