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
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from autocompress.calibration.onnx import _chain_model, _time_cold
from autocompress.compress.apply import apply_plan_to
from autocompress.export.onnx import export_onnx, quantize_groups, target_format
from autocompress.hardware.machine import Flusher
from autocompress.hardware.measure import _next_cache, _step_feed, empty_cache, measure_decode, ort_session
from autocompress.model import load_model
from autocompress.plan import LayerChoice, ModelRef, Plan

RESULTS = Path(__file__).parent / "results" / "onnx_rates.json"
WORK = Path.home() / ".cache" / "autocompress-bench" / "onnx_rates"
FORMATS = ("fp32", "int8-ch-sym", "int8-ch-asym", "int4-g32-sym", "int4-g32-asym", "int4-g128-sym", "int4-g128-asym")
CHAINS = ((1536, 4096, 6), (576, 192, 24))
CONTEXT = 64


def _choice(fmt: str) -> LayerChoice:
    return LayerChoice() if fmt == "fp32" else LayerChoice(format=fmt)


def _export(job: tuple[str, Path]) -> str:
    """Export the model with every linear in ``fmt`` as the KV-cache decoder (one torch thread)."""
    torch.set_num_threads(1)
    fmt, work = job
    path = work / f"{fmt}.onnx"
    if not path.exists():
        lm = load_model(work.name)
        plan = Plan(model=ModelRef.of(lm.anatomy), default=_choice(fmt))
        model = apply_plan_to(lm.model.float().eval(), lm.anatomy, plan)
        export_onnx(model, lm.anatomy, plan, path, kv_cache=True)
    return fmt


def _weight_bytes(proto: onnx.ModelProto) -> dict[str, int]:
    """Give node name -> bytes of the stored tensors it reads (its initializer inputs)."""
    sizes = {i.name: len(i.raw_data) or onnx.numpy_helper.to_array(i).nbytes for i in proto.graph.initializer}
    return {n.name: sum(sizes.get(x, 0) for x in n.input) for n in proto.graph.node if n.op_type.startswith("MatMul")}


def node_profile(path: Path, steps: int = 20) -> dict[str, float | dict[str, float]]:
    """Give onnxruntime's per-node profile of ``steps`` decode steps (context ``CONTEXT``): the block
    linears' time (ms per step) and stored MB, the head's, everything else's."""
    proto = onnx.load(str(path), load_external_data=True)
    wbytes = _weight_bytes(proto)
    head = max(wbytes, key=wbytes.get)  # the vocab x hidden table
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.enable_profiling = True
    opts.profile_file_prefix = str(path.parent / f"profile-{path.stem}")
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 100, size=(1, CONTEXT + 1), dtype=np.int64)
    prompt = _step_feed(ids[:, :CONTEXT], empty_cache(sess, 1), 0)
    step = _step_feed(ids[:, CONTEXT:], _next_cache(sess, sess.run(None, prompt)), CONTEXT)
    for _ in range(5):
        sess.run(None, step)
    runs_before = 6
    for _ in range(steps):
        sess.run(None, step)
    events = json.loads(Path(sess.end_profiling()).read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    first = runs[runs_before]["ts"]  # the profiled decode steps (after the prefill and the warm-up)
    per: dict[str, float] = defaultdict(float)
    by_op: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") != "Node" or e["ts"] < first or not e["name"].endswith("_kernel_time"):
            continue
        name = e["name"].removesuffix("_kernel_time")
        per[name] += e["dur"] / 1e3 / steps
        by_op[e["args"].get("op_name", "?")] += e["dur"] / 1e3 / steps
    linears = [n for n in wbytes if n != head and n in per]
    lin_ms = sum(per[n] for n in linears)
    lin_mb = sum(wbytes[n] for n in linears) / 1e6
    total = sum(per.values())
    return {
        "linears_ms": lin_ms,
        "linears_mb": lin_mb,
        "linears_GBps": lin_mb / lin_ms,
        "linear_nodes": len(linears),
        "head_ms": per[head],
        "head_mb": wbytes[head] / 1e6,
        "other_ms": total - lin_ms - per[head],
        "nodes_ms": total,
        "by_op_ms": dict(sorted(by_op.items(), key=lambda kv: -kv[1])),
    }


def _chain(fmt: str, shape: tuple[int, int, int], batched: bool, tmp: Path) -> tuple[ort.InferenceSession, int]:
    k, n, layers = shape
    proto = _chain_model(k, n, layers, batched=batched)
    if fmt != "fp32":
        layout, _ = target_format(_choice(fmt))
        proto = quantize_groups(proto, {layout: [x.name for x in proto.graph.node]}, tmp)
    return ort_session(proto.SerializeToString(), 1), sum(_weight_bytes(proto).values())


def main() -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=1, help="export in this many forked processes")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--model", default="default", help="the model (tiny-llama for a smoke run)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    fmts = args.formats.split(",")
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
                chain_ms[(f, shape, batched)].append(_time_cold(lambda s=sess, x=x: s.run(None, {"x": x}), flush, 9))
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    rows = []
    for f in fmts:
        prof = node_profile(work / f"{f}.onnx")
        row = {"format": f, "decode_ms": min(decode[f]), "file_mb": (work / f"{f}.onnx").stat().st_size / 1e6, **prof}
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
    big, small = (f"{s[0]}x{s[1]}x{s[2]}" for s in CHAINS)
    print()
    print(
        f"{'format':<16}{'decode ms':>10}{'linears ms':>11}{'MB':>7}{'GB/s in decoder':>16}"
        f"{'chain ' + big + ' 2d/3d GB/s':>30}{'chain ' + small + ' 2d/3d GB/s':>28}{'head ms':>9}{'other ms':>9}"
    )
    for r in rows:
        print(
            f"{r['format']:<16}{r['decode_ms']:>10.2f}{r['linears_ms']:>11.2f}{r['linears_mb']:>7.1f}"
            f"{r['linears_GBps']:>16.2f}"
            f"{r[f'chain_{big}_2d_GBps']:>22.2f} / {r[f'chain_{big}_3d_GBps']:<5.2f}"
            f"{r[f'chain_{small}_2d_GBps']:>20.2f} / {r[f'chain_{small}_3d_GBps']:<5.2f}"
            f"{r['head_ms']:>9.2f}{r['other_ms']:>9.2f}"
        )
    for r in rows:
        ops = ", ".join(f"{k} {v:.2f}" for k, v in list(r["by_op_ms"].items())[:6])
        print(f"  {r['format']}: ms per step by op: {ops}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
