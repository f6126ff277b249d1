"""Six of bench/cost_model.py's 30 mixed plans and four of bench/onnx_rates.py's uniform decoders,
timed in the same 5 interleaved rounds (one decode step at context 64, 1 thread, lowest median),
beside their earlier times and their price in the JSONs (a check that an offset is the machine's
state and not the plans' mix). Needs both benchmarks' exports in ~/.cache/autocompress-bench/.

    flock ~/.cache/ac-cpu.lock python bench/mixed_vs_uniform.py
"""

import json
from pathlib import Path

from autocompress.hardware.measure import measure_decode, ort_session

ROOT = Path(__file__).parents[1]


def main() -> None:
    cm = json.loads((ROOT / "bench/results/recalibrations/c-blocks1-8.cost_model.json").read_text())
    orr = json.loads((ROOT / "bench/results/recalibrations/c-blocks1-8.onnx_rates.json").read_text())
    W = Path.home() / ".cache/autocompress-bench/cost_model/smollm2-135m-kv64-seed0-n30-t1"
    U = Path.home() / ".cache/autocompress-bench/onnx_rates/default"
    items = []
    for i in (0, 1, 10, 14, 21, 28):
        p = cm["plans"][i]
        items.append((f"plan{i}", W / f"plan{i}.onnx", p["pred_decode_ms_calibrated"], p["decode_ms"]))
    for r in orr["rows"]:
        if r["format"] in ("int8-ch-sym", "int4-g32-asym", "int4-g128-sym", "int4-g32-asym+table"):
            f = U / f"{r['format']}.onnx"
            items.append((r["format"], f, r["pred_decode_ms"], r["decode_ms"]))
    best = {}
    sess = {n: ort_session(f, 1) for n, f, _, _ in items}
    for rnd in range(5):
        for n, _f, _pred, _old in items:
            m = measure_decode(sess[n], context=64, threads=1, warmup=5, repeats=15, min_time_s=0.3).decode.median_ms
            best[n] = min(best.get(n, 1e9), m)
        print("round", rnd + 1, flush=True)
    for n, _f, pred, old in items:
        print(
            f"{n:22s} now {best[n]:6.2f} ms  earlier {old:6.2f}  pred {pred:6.2f}  pred/now {pred / best[n]:.3f}  pred/earlier {pred / old:.3f}"
        )


if __name__ == "__main__":
    main()
