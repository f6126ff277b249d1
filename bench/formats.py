"""Every storage format of the registry on the default model: bits per weight, KL to the base and
perplexity on held-out text, for each quantizer (rtn, imatrix, gptq).

    flock ~/.cache/ac-cpu.lock python bench/formats.py [--formats Q4_0,Q4_K] [--methods rtn]

Two targets per format:

- ``block linears``: every linear of every block in the format. Where a tensor's rows cannot hold
  it (K-quants need rows that are a multiple of 256; SmolLM2's are 576 wide except ffn_down's 1536),
  the tensor takes llama.cpp's fallback for that width (``formats.fallback``: Q4_K -> Q5_0, ...), as
  ``llama-quantize`` does; ``fallback_share`` says for how many of the weights, ``bpw`` is the real
  average over the block linears.
- ``embedding/head``: the tied 49,152 x 576 token embedding / output head table alone, rest dense
  (rtn only: imatrix and GPTQ need statistics of the head's input that the calibration does not
  collect yet).

KL (nats/token) is on the proxy split, perplexity on the evaluation split (held-out documents;
neither is the calibration text). The default model's base is itself a dequantized Q4_1 GGUF:
Q4_1 reproduces it exactly and Q5_1 can hold it exactly too (the same affine 32-blocks; its 32
codes include Q4_1's 16) — those rows are marked ``holds_base_grid`` and no conclusion rests on them.

Results are written incrementally (resumable) to bench/results/formats.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from autocompress import formats
from autocompress.evaluate.metrics import kl_to_base, output_logprobs, perplexity
from autocompress.hardware.cost import CostModel
from autocompress.hardware.profile import load_profile
from autocompress.plan import LayerChoice, ModelRef, Plan
from autocompress.workbench import Workbench

RESULTS = Path(__file__).parent / "results" / "formats.json"
GGUF = ("Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0", "IQ4_NL", "Q3_K", "Q2_K")
OTHERS = ("int8-ch-sym", "int4-g128-sym", "int4-g128-asym", "q4f16_1", "q3f16_1")
DEFAULT_FORMATS = ("F16", *GGUF, *OTHERS)
METHODS = ("rtn", "imatrix", "gptq")
HOLDS_BASE_GRID = ("Q4_1", "Q5_1")


def _fitted(name: str, in_features: int) -> str:
    """Give the format a row of this width is stored in: ``name``, else llama.cpp's fallback for it."""
    return formats.fallback(name, in_features) or name


def block_plan(wb: Workbench, name: str, method: str) -> tuple[Plan, float, float]:
    """Give the plan storing every block linear in ``name`` (fallbacks where rows cannot hold it),
    its bits per weight over the block linears and the share of weights that fell back."""
    a = wb.lm.anatomy
    layers, nbytes, fell = {}, 0, 0
    for s in a.linears:
        fmt = _fitted(name, s.in_features)
        method_here = method if fmt is not None and not formats.get(fmt).is_float else "rtn"
        layers[s.name] = LayerChoice(format=fmt, quant_method=method_here)
        nbytes += formats.get(fmt).bytes((s.out_features, s.in_features)) if fmt else 2 * s.params
        fell += s.params if fmt != name else 0
    plan = Plan(model=ModelRef.of(a), layers=layers, provenance=wb.provenance())
    return plan, nbytes * 8 / a.block_linear_params, fell / a.block_linear_params


def table_plan(wb: Workbench, name: str) -> tuple[Plan, float, float]:
    """Give the plan storing the embedding / head table(s) in ``name`` (or its fallback), the rest dense."""
    a = wb.lm.anatomy
    layers, nbytes, params, fell = {}, 0, 0, 0
    for e in a.embeddings:
        fmt = _fitted(name, e.cols)
        layers[e.name] = LayerChoice(format=fmt)
        nbytes += formats.get(fmt).bytes((e.rows, e.cols)) if fmt else 2 * e.params
        params += e.params
        fell += e.params if fmt != name else 0
    return Plan(model=ModelRef.of(a), layers=layers, provenance=wb.provenance()), nbytes * 8 / params, fell / params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", default=",".join(DEFAULT_FORMATS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--targets", default="block linears,embedding/head")
    args = ap.parse_args()
    wb = Workbench.open(log=print)
    a = wb.lm.anatomy
    jetson = CostModel(load_profile("jetson"), a)
    base_lp = output_logprobs(wb.lm.model, wb.data.proxy)
    base_ppl = perplexity(wb.lm.model, wb.data.eval, wb.data.eval_chars).ppl
    done = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    rows = {(r["format"], r["target"]): r for r in done.get("rows", [])}
    for target in args.targets.split(","):
        for name in args.formats.split(","):
            row = rows.setdefault(
                (name, target), {"format": name, "target": target, "holds_base_grid": name in HOLDS_BASE_GRID}
            )
            methods = args.methods.split(",") if target == "block linears" else ["rtn"]
            for method in methods:
                if formats.get(name).is_float and method != "rtn":
                    continue
                if method in row and row[method] is not None:
                    continue
                t0 = time.perf_counter()
                plan, bpw, fell = block_plan(wb, name, method) if target == "block linears" else table_plan(wb, name)
                model = wb.apply(plan)
                kl = kl_to_base(model, wb.data.proxy, base_lp).kl
                ppl = perplexity(model, wb.data.eval, wb.data.eval_chars).ppl
                row.update(bpw=round(bpw, 4), fallback_share=round(fell, 4))
                row["weights_mb_jetson"] = round(jetson.predict(plan).weights_mb, 3)
                row[method] = {"kl": kl, "ppl": ppl, "seconds": round(time.perf_counter() - t0, 1)}
                print(f"{target:15s} {name:15s} {method:8s} bpw {bpw:6.3f} KL {kl:.4f} ppl {ppl:8.3f}", flush=True)
                del model
                out = {
                    "model": a.name,
                    "base_ppl": base_ppl,
                    "proxy_tokens": int(wb.data.proxy.numel()),
                    "eval_tokens": int(wb.data.eval.numel()),
                    "rows": list(rows.values()),
                }
                RESULTS.parent.mkdir(parents=True, exist_ok=True)
                RESULTS.write_text(json.dumps(out, indent=1) + "\n")
    print(f"\nbase perplexity {base_ppl:.3f}")
    print(
        f"{'target':15s} {'format':15s} {'bpw':>6s} " + " ".join(f"{m + ' KL':>11s} {m + ' ppl':>10s}" for m in METHODS)
    )
    for r in rows.values():
        cells = []
        for m in METHODS:
            v = r.get(m)
            cells.append(f"{v['kl']:11.4f} {v['ppl']:10.3f}" if v else f"{'-':>11s} {'-':>10s}")
        mark = "  (holds the base's Q4_1 grid)" if r["holds_base_grid"] else ""
        print(f"{r['target']:15s} {r['format']:15s} {r.get('bpw', 0):6.3f} " + " ".join(cells) + mark)


if __name__ == "__main__":
    main()
