"""Where onnxruntime's quantized linears lose speed inside the KV-cache decoder, against the calibration's chains.

    flock ~/.cache/ac-cpu.lock python bench/onnx_rates.py [--jobs 2] [--rounds 3]

``bench/cost_model.py`` found the full default model's decode about 1.8x slower than the calibrated
profile predicts, and a fit of its 30 plans put int8 / int4 linears at about half the GB/s that the
calibration's MatMulNBits chains reach. This benchmark takes the question apart, on one machine in
one run:

1. **Decoder**: the default model with every linear in one format (each onnxruntime format the
   ``local`` profile offers, and fp32; embedding and head fp32), exported as the KV-cache decoder
   (``export_onnx(kv_cache=True)``, what ``autocompress export`` writes); one decode step with 64
   tokens in the cache, timed in interleaved rounds (lowest median kept), then onnxruntime's own
   per-node profile of decode steps: each weight node's time and stored bytes, hence the GB/s the
   block linears stream at inside the decoder, and the time of everything else.
2. **Chains**: the calibration's GEMV chains (``calibration.onnx``: 6 x 1536->4096, 151 MB in fp32,
   and the small 24 x 576->192) in the same format, cold, with the activations 2-D ``[1, K]`` as
   calibrated and 3-D ``[1, 1, K]`` as the decoder feeds them.

Exports are kept under ``~/.cache/autocompress-bench/onnx_rates/`` (a rerun reuses them). Writes
bench/results/onnx_rates.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from autocompress.calibration.onnx import chain_model, time_cold
from autocompress.compress.apply import apply_plan_to
from autocompress.export.onnx import export_onnx, quantize_groups, target_format
from autocompress.hardware import CostModel, load_profile
from autocompress.hardware.machine import Flusher
from autocompress.hardware.measure import decode_feed, measure_decode, ort_session
from autocompress.model import load_model
from autocompress.plan import BlockChoice, LayerChoice, ModelRef, Plan

RESULTS = Path(__file__).parent / "results" / "onnx_rates.json"
WORK = Path.home() / ".cache" / "autocompress-bench" / "onnx_rates"
FORMATS = ("fp32", "int8-ch-sym", "int8-ch-asym", "int4-g32-sym", "int4-g32-asym", "int4-g128-sym", "int4-g128-asym")
CHAINS = ((1536, 4096, 6), (576, 192, 24))
CONTEXT = 64


# what random plans of the default space add to a uniform format (``bench/cost_model.py``): low-rank
# factors, a quantized embedding / head table, pruned heads; each on top of one base format
VARIANTS = {
    "int4-g32-asym+lowrank": "int4-g32-asym",
    "int4-g32-asym+table": "int4-g32-asym",
    "int8-ch-sym+heads": "int8-ch-sym",
}


def _choice(fmt: str) -> LayerChoice:
    return LayerChoice() if fmt == "fp32" else LayerChoice(format=fmt)


def make_plan(name: str, a) -> Plan:
    """Give the plan ``name``: a uniform format, or a ``VARIANTS`` entry (every block linear low-rank at
    half the break-even rank; the tied embedding / head table in the same format; 6 of 9 heads kept)."""
    ref = ModelRef.of(a)
    fmt = VARIANTS.get(name, name)
    if name.endswith("+lowrank"):
        return Plan(model=ref, default=LayerChoice(format=fmt, rank_ratio=0.5))
    if name.endswith("+table"):
        return Plan(model=ref, default=_choice(fmt), layers={e.name: _choice(fmt) for e in a.embeddings})
    if name.endswith("+heads"):
        keep = 2 * a.blocks[0].heads_per_kv  # two of the three KV groups
        return Plan(model=ref, default=_choice(fmt), blocks={b.index: BlockChoice(keep_heads=keep) for b in a.blocks})
    return Plan(model=ref, default=_choice(fmt))


def _export(job: tuple[str, Path]) -> str:
    """Export the model with every linear in ``fmt`` as the KV-cache decoder (one torch thread)."""
    torch.set_num_threads(1)
    fmt, work = job
    path = work / f"{fmt}.onnx"
    if not path.exists():
        lm = load_model(work.name)
        plan = make_plan(fmt, lm.anatomy)
        model = apply_plan_to(lm.model.float().eval(), lm.anatomy, plan)
        export_onnx(model, lm.anatomy, plan, path, kv_cache=True)
    return fmt


def _weight_bytes(proto: onnx.ModelProto) -> dict[str, int]:
    """Give node name -> bytes of the stored tensors it reads (its initializer inputs)."""
    sizes = {i.name: len(i.raw_data) or onnx.numpy_helper.to_array(i).nbytes for i in proto.graph.initializer}
    return {n.name: sum(sizes.get(x, 0) for x in n.input) for n in proto.graph.node if n.op_type.startswith("MatMul")}


def node_profile(path: Path, steps: int = 20) -> dict[str, float | dict[str, float]]:
    """Give onnxruntime's per-node profile of ``steps`` decode steps (context ``CONTEXT``), in ms per
    step: the block linears (nodes that read stored weights) with their MB, the output head (the
    matmul giving the vocabulary's logits), the attention matmuls, everything else per block."""
    proto = onnx.load(str(path), load_external_data=True)
    wbytes = {n: b for n, b in _weight_bytes(proto).items() if b}
    vocab = proto.graph.output[0].type.tensor_type.shape.dim[-1].dim_value
    blocks = sum(1 for i in proto.graph.input if i.name.startswith("past_key_values.") and i.name.endswith(".key"))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.enable_profiling = True
    opts.profile_file_prefix = str(path.parent / f"profile-{path.stem}")
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    step = decode_feed(sess, CONTEXT)  # runs the prefill once
    for _ in range(5):
        sess.run(None, step)
    runs_before = 6
    for _ in range(steps):
        sess.run(None, step)
    events = json.loads(Path(sess.end_profiling()).read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    first = runs[runs_before]["ts"]  # the profiled decode steps (after the prefill and the warm-up)
    run_ms = statistics.median(r["dur"] / 1e3 for r in runs[runs_before:])
    per: dict[str, float] = defaultdict(float)
    by_op: dict[str, float] = defaultdict(float)
    heads, attention = set(), set()
    for e in events:
        if e.get("cat") != "Node" or e["ts"] < first or not e["name"].endswith("_kernel_time"):
            continue
        name, op = e["name"].removesuffix("_kernel_time"), e["args"].get("op_name", "?")
        per[name] += e["dur"] / 1e3 / steps
        by_op[op] += e["dur"] / 1e3 / steps
        if op.startswith("MatMul"):
            shapes = e["args"].get("output_type_shape") or [{}]
            dims = next(iter(shapes[0].values()), [])
            if dims and dims[-1] == vocab:
                heads.add(name)
            elif name not in wbytes:
                attention.add(name)
    linears = [n for n in wbytes if n in per and n not in heads]
    lin_ms = sum(per[n] for n in linears)
    lin_mb = sum(wbytes[n] for n in linears) / 1e6
    head_ms = sum(per[n] for n in heads)
    attn_ms = sum(per[n] for n in attention)
    total = sum(per.values())
    other = total - lin_ms - head_ms - attn_ms
    return {
        "profiled_run_ms": run_ms,
        "nodes_ms": total,
        "linears_ms": lin_ms,
        "linears_mb": lin_mb,
        "linears_GBps": lin_mb / lin_ms,
        "linear_nodes": len(linears),
        "head_ms": head_ms,
        "attention_matmul_ms": attn_ms,
        "other_ms": other,
        "blocks": blocks,
        "other_per_block_us": other / blocks * 1e3,
        "by_op_ms": dict(sorted(by_op.items(), key=lambda kv: -kv[1])),
    }


def predicted(fmt: str, model: str) -> dict[str, float]:
    """Give the calibrated ``local`` profile's price of the uniform plan, in ms per decode step: in all,
    the block linears, the head, the blocks' fixed cost (kernels per block x per-kernel overhead),
    and the rest (per-token overhead, attention over the cache); {} without a calibrated profile."""
    prof = load_profile("cpu")
    if not prof.calibrated:
        return {}
    a = load_model(model).anatomy
    plan = make_plan(fmt, a)
    cm = CostModel(prof, a, prompt_tokens=CONTEXT, context_tokens=CONTEXT)
    total = cm.predict(plan).latency_ms
    linears = 0.0
    for b in a.blocks:
        head_frac, mlp_frac = b.fractions(plan.block_choice(b.index).keep_heads, None)
        for site in b.linears:
            linears += sum(cm._linear(site.shape_after(head_frac, mlp_frac), plan.choice_for(site.name))[:2])
    head = sum(cm._embedding_parts(plan)[:2])
    fixed = prof.kernels_per_block * prof.per_kernel_overhead_us * 1e-3 * a.num_blocks
    return {
        "pred_decode_ms": total,
        "pred_linears_ms": linears,
        "pred_head_ms": head,
        "pred_block_fixed_ms": fixed,
        "pred_rest_ms": total - linears - head - fixed,
    }


def _chain(fmt: str, shape: tuple[int, int, int], batched: bool, tmp: Path) -> tuple[ort.InferenceSession, int]:
    k, n, layers = shape
    proto = chain_model(k, n, layers, batched=batched)
    if fmt != "fp32":
        layout, _ = target_format(_choice(fmt))
        proto = quantize_groups(proto, {layout: [x.name for x in proto.graph.node]}, tmp)
    return ort_session(proto.SerializeToString(), 1), sum(_weight_bytes(proto).values())


def _pair(row: dict, chain: str) -> str:
    """Give a chain's 2-D / 3-D GB/s as printed ("-" for a variant, whose chains are its base format's)."""
    if f"chain_{chain}_2d_GBps" not in row:
        return "-"
    return f"{row[f'chain_{chain}_2d_GBps']:.2f} / {row[f'chain_{chain}_3d_GBps']:.2f}"


def print_table(rows: list[dict]) -> None:
    big, small = (f"{s[0]}x{s[1]}x{s[2]}" for s in CHAINS)
    print()
    print(
        f"{'format':<16}{'decode ms':>10}{'profiled':>9}{'linears ms':>11}{'MB':>7}{'GB/s in decoder':>16}"
        f"{'chain ' + big + ' 2d/3d GB/s':>30}{'chain ' + small + ' 2d/3d GB/s':>28}"
        f"{'head ms':>9}{'attn ms':>9}{'other ms':>9}{'µs/block':>9}"
    )
    for r in rows:
        print(
            f"{r['format']:<16}{r['decode_ms']:>10.2f}{r['profiled_run_ms']:>9.2f}{r['linears_ms']:>11.2f}"
            f"{r['linears_mb']:>7.1f}{r['linears_GBps']:>16.2f}"
            f"{_pair(r, big):>30}{_pair(r, small):>28}"
            f"{r['head_ms']:>9.2f}{r['attention_matmul_ms']:>9.2f}{r['other_ms']:>9.2f}{r['other_per_block_us']:>9.0f}"
        )
    if all("pred_decode_ms" in r for r in rows):
        print()
        print("the calibrated `local` profile's price against the measurement (ms per decode step):")
        print(
            f"{'format':<16}{'decode meas':>12}{'pred':>8}{'linears meas':>13}{'pred':>8}{'head meas':>10}{'pred':>8}"
            f"{'rest meas':>10}{'pred':>8}"
        )
        for r in rows:
            scale = r["decode_ms"] / r["profiled_run_ms"]  # the profiler's own cost taken out, pro rata
            rest = (r["attention_matmul_ms"] + r["other_ms"]) * scale
            pred_rest = r["pred_block_fixed_ms"] + r["pred_rest_ms"]
            print(
                f"{r['format']:<16}{r['decode_ms']:>12.2f}{r['pred_decode_ms']:>8.2f}{r['linears_ms'] * scale:>13.2f}"
                f"{r['pred_linears_ms']:>8.2f}{r['head_ms'] * scale:>10.2f}{r['pred_head_ms']:>8.2f}{rest:>10.2f}{pred_rest:>8.2f}"
            )
    for r in rows:
        ops = ", ".join(f"{k} {v:.2f}" for k, v in list(r["by_op_ms"].items())[:6])
        print(f"  {r['format']}: ms per step by op: {ops}")


def main() -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=1, help="export in this many forked processes")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--formats", default=",".join((*FORMATS, *VARIANTS)), help="formats and VARIANTS measured")
    ap.add_argument("--model", default="default", help="the model (tiny-llama for a smoke run)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument(
        "--profile-only", action="store_true", help="redo only the per-node profiles of the decoders in --out"
    )
    args = ap.parse_args()
    fmts = args.formats.split(",")
    if args.profile_only:
        out = json.loads(args.out.read_text())
        for row in out["rows"]:
            row.update(
                node_profile(WORK / args.model / f"{row['format']}.onnx"), **predicted(row["format"], args.model)
            )
        args.out.write_text(json.dumps(out, indent=2) + "\n")
        print_table(out["rows"])
        return out
    work = WORK / args.model
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    todo = [f for f in fmts if not (work / f"{f}.onnx").exists()]
    if todo:
        print(f"exporting {len(todo)} decoders ({', '.join(todo)}) ...", flush=True)
        with ProcessPoolExecutor(max(1, args.jobs), mp_context=multiprocessing.get_context("fork")) as pool:
            for f in pool.map(_export, [(f, work) for f in todo]):
                print(f"  {f} exported ({time.perf_counter() - t0:.0f} s)", flush=True)
    export_s = time.perf_counter() - t0
    flush = Flusher()
    sessions = {f: ort_session(work / f"{f}.onnx", 1) for f in fmts}
    chains = {}
    tmp = work / "tmp"
    tmp.mkdir(exist_ok=True)
    for f in fmts:
        if f in VARIANTS:  # the chains are the base format's
            continue
        for shape in CHAINS:
            for batched in (False, True):
                chains[(f, shape, batched)] = _chain(f, shape, batched, tmp)
    decode: dict[str, list[float]] = defaultdict(list)
    chain_ms: dict[tuple, list[float]] = defaultdict(list)
    for r in range(args.rounds):  # interleaved: a slow spell of the VM hits every format alike
        for f in fmts:
            m = measure_decode(sessions[f], context=CONTEXT, threads=1, warmup=5, repeats=15, min_time_s=0.3)
            decode[f].append(m.decode.median_ms)
            for (cf, shape, batched), (sess, _) in chains.items():
                if cf != f:
                    continue
                x = np.ones((1, 1, shape[0]) if batched else (1, shape[0]), np.float32)
                chain_ms[(f, shape, batched)].append(time_cold(lambda s=sess, x=x: s.run(None, {"x": x}), flush, 9))
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    rows = []
    for f in fmts:
        prof = node_profile(work / f"{f}.onnx")
        row = {"format": f, "decode_ms": min(decode[f]), "file_mb": (work / f"{f}.onnx").stat().st_size / 1e6, **prof}
        row.update(predicted(f, args.model))
        for (cf, shape, batched), (_, nbytes) in chains.items():
            if cf == f:
                ms = min(chain_ms[(cf, shape, batched)])
                key = f"chain_{shape[0]}x{shape[1]}x{shape[2]}_{'3d' if batched else '2d'}"
                row[key + "_ms"], row[key + "_GBps"] = ms, nbytes / 1e6 / ms
        rows.append(row)
    out = {
        "model": f"{args.model} (full depth), every block linear in one format, embedding and head fp32",
        "metric": f"one decode step with {CONTEXT} tokens in the KV cache, onnxruntime CPU, 1 thread",
        "onnxruntime": ort.__version__,
        "rounds": args.rounds,
        "export_s": export_s,
        "measure_s": time.perf_counter() - t0 - export_s,
        "rows": rows,
    }
    print_table(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
