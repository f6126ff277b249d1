"""The ONNX decoder with a KV cache beside the graph without one: file size, decode and prefill.

    python bench/onnx_kv.py                                   # tiny-llama (a minute)
    python bench/onnx_kv.py --model default --plan int4-tables --rounds 1 --out /tmp/onnx_kv.json   # one plan
    flock ~/.cache/ac-cpu.lock python bench/onnx_kv.py --model default --out bench/results/onnx_kv_smollm2.json

Three plans of the model, each exported both ways (``export_onnx(kv_cache=False)``: one forward
without a cache, what ``model.onnx`` was before; ``kv_cache=True``: the decoder with
``past_key_values`` / ``present``): uncompressed fp32; int4 group-32 linears with the embedding and
head left fp32 (what every plan's file held before); the same with the tied embedding / head int4
group-32 too (MatMulNBits head, GatherBlockQuantized lookup on the shared codes). Measured with
onnxruntime CPU on one thread, in one process, interleaved over ``--rounds`` (lowest median kept):
without a cache, "decode" is one 1-token forward and prefill one ``--context``-token forward; with a
cache, decode is one step with ``--context`` tokens cached and prefill those tokens from an empty
cache. The check column is ``verify.check_onnx`` on the KV file (32 greedy tokens through the cache).

Writes bench/results/onnx_kv.json (sizes in MB, times in ms).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from autocompress.compress import apply_plan_to
from autocompress.export.onnx import export_onnx
from autocompress.export.verify import check_onnx
from autocompress.hardware.measure import measure, measure_decode, ort_session
from autocompress.model import load_model
from autocompress.plan import LayerChoice, ModelRef, Plan

RESULTS = Path(__file__).parent / "results" / "onnx_kv.json"


def plans(anatomy) -> dict[str, Plan]:
    ref = ModelRef.of(anatomy)
    int4 = LayerChoice(bits=4, group_size=32)
    tables = {e.name: int4 for e in anatomy.embeddings}
    return {
        "fp32": Plan(model=ref),
        "int4-g32, fp32 embedding/head": Plan(model=ref, default=int4),
        "int4-g32, int4-g32 embedding/head": Plan(model=ref, default=int4, layers=tables),
    }


KEYS = ("fp32", "int4", "int4-tables")  # --plan names, in the order of plans()


def main() -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--plan", choices=KEYS, action="append", help="only these plans (repeatable; default: all)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.manual_seed(0)
    lm = load_model(args.model)
    a = lm.anatomy
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="autocompress-onnx-kv-") as tmp:
        chosen = [(k, lp) for k, lp in zip(KEYS, plans(a).items(), strict=True) if not args.plan or k in args.plan]
        for _, (label, plan) in chosen:
            stored: dict = {}
            model = apply_plan_to(lm.model, a, plan, stored=stored)
            quantize = not plan.is_uncompressed
            kw = {"quantize": quantize, "stored": stored}
            old = export_onnx(model, a, plan, Path(tmp) / f"{len(rows)}-old.onnx", **kw)
            new = export_onnx(model, a, plan, Path(tmp) / f"{len(rows)}-kv.onnx", kv_cache=True, **kw)
            check = check_onnx(new.path, model, a, new.formats)
            rows.append(
                {
                    "plan": label,
                    "size_mb_without_cache": old.size_mb,
                    "size_mb_kv_cache": new.size_mb,
                    "check_passed": check["passed"],
                    "greedy_tokens_equal": check["greedy"]["tokens_equal"],
                    "not_represented": list(new.not_represented),
                    "paths": (old.path, new.path),
                }
            )
            print(f"exported {label}: {old.size_mb:.2f} MB -> {new.size_mb:.2f} MB", flush=True)
        for _ in range(args.rounds):  # interleaved: contention hits every file alike
            for row in rows:
                old_path, new_path = row["paths"]
                sess = ort_session(old_path, args.threads)
                dec = measure(sess, seq_len=1, threads=args.threads, warmup=5, repeats=15, min_time_s=0.3).median_ms
                pre = measure(sess, seq_len=args.context, threads=args.threads, warmup=2, repeats=7).median_ms
                m = measure_decode(
                    new_path, context=args.context, threads=args.threads, warmup=5, repeats=15, min_time_s=0.3
                )
                for key, value in (
                    ("decode_ms_without_cache", dec),
                    ("prefill_ms_without_cache", pre),
                    ("decode_ms_kv_cache", m.decode.median_ms),
                    ("prefill_ms_kv_cache", m.prefill.median_ms),
                ):
                    row[key] = min(row.get(key, float("inf")), value)
    for row in rows:
        del row["paths"]
        row["kv_decode_over_forward"] = row["decode_ms_kv_cache"] / row["decode_ms_without_cache"]
    out = {
        "model": a.name,
        "threads": args.threads,
        "context_tokens": args.context,
        "rounds": args.rounds,
        "scenario": (
            f"without cache: decode = one 1-token forward, prefill = one {args.context}-token forward; KV cache: "
            f"decode = one step with {args.context} cached tokens, prefill = {args.context} tokens from an empty cache"
        ),
        "rows": rows,
    }
    print(f"\n{a.name}, onnxruntime CPU, {args.threads} thread(s), context {args.context}")
    head = f"{'plan':<36}{'MB before':>10}{'MB kv':>8}{'dec fwd':>9}{'dec kv':>8}{'kv/fwd':>8}{'pre fwd':>9}{'pre kv':>8}  check"
    print(head)
    for r in rows:
        print(
            f"{r['plan']:<36}{r['size_mb_without_cache']:>10.2f}{r['size_mb_kv_cache']:>8.2f}"
            f"{r['decode_ms_without_cache']:>9.3f}{r['decode_ms_kv_cache']:>8.3f}{r['kv_decode_over_forward']:>8.2f}"
            f"{r['prefill_ms_without_cache']:>9.3f}{r['prefill_ms_kv_cache']:>8.3f}  "
            f"{'passed' if r['check_passed'] else 'FAILED'} ({r['greedy_tokens_equal']}/32 greedy)"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
