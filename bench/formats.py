"""Every storage format of the registry on the default model: bits per weight, KL to the base and
perplexity on held-out text, for each quantizer (rtn, imatrix, gptq).

    flock ~/.cache/ac-cpu.lock python -P bench/formats.py [--formats Q4_0,Q4_K] [--methods rtn] [--markdown]

(``-P``: the script's folder is not put on the path, so no file in bench/ can shadow a package.)

``--methods rtn,imatrix,gptq,gptq-imatrix`` adds the fourth plan quantizer, run only when asked for:
GPTQ codes on a grid fitted with the calibration inputs' Σx² as importance (as llama.cpp fits an
imatrix quantization's scales), ``quant_method: gptq-imatrix``.

Two targets per format:

- ``block linears``: every linear of every block in the format. Where a tensor's rows cannot hold
  it (K-quants need rows that are a multiple of 256; SmolLM2's are 576 wide except ffn_down's 1536),
  the tensor takes llama.cpp's fallback for that width (``formats.fallback``: Q4_K -> Q5_0, ...), as
  ``llama-quantize`` does; ``fallback_share`` says for how many of the weights, ``bpw`` is the real
  average over the block linears.
- ``embedding/head``: the tied 49,152 x 576 token embedding / output head table alone, rest dense.
  imatrix and GPTQ take the statistics of the head's input (the final norm's output: Σx² per input
  and Σ x xᵀ on the calibration tokens, one forward pass), as llama.cpp's imatrix collects the tied
  table's from the output matmul; the embedding lookup reads the same rows, unweighted.

KL (nats/token) is on the proxy split, perplexity on the evaluation split (held-out documents;
neither is the calibration text). The default model's base is itself a dequantized Q4_1 GGUF:
Q4_1 reproduces it exactly and Q5_1 can hold it exactly too (the same affine 32-blocks; its 32
codes include Q4_1's 16) — those rows are marked ``holds_base_grid`` and no conclusion rests on them.

Runs go in priority order: the GGUF formats on the block linears (every method), the table with
every format, then the other formats. Results are written after each run (a rerun resumes) to
bench/results/formats.json; ``seconds`` is one run's wall time (quantize, apply, KL and perplexity).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from autocompress import formats
from autocompress.calib import run_with_hooks
from autocompress.compress import gptq
from autocompress.evaluate.metrics import kl_to_base, output_logprobs, perplexity
from autocompress.formats.registry import FALLBACK
from autocompress.hardware.cost import CostModel
from autocompress.hardware.profile import load_profile
from autocompress.plan import LayerChoice, ModelRef, Plan
from autocompress.workbench import Workbench

RESULTS = Path(__file__).parent / "results" / "formats.json"
GGUF = ("Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0", "IQ4_NL", "Q3_K", "Q2_K")
OTHERS = ("int8-ch-sym", "int4-g128-sym", "int4-g128-asym", "q4f16_1", "q3f16_1")
DEFAULT_FORMATS = ("F16", *GGUF, *OTHERS)
METHODS = ("rtn", "imatrix", "gptq")
# GPTQ on a grid fitted with the inputs' Σx² as importance: run only when asked for (--methods ...,gptq-imatrix),
# reported beside the three methods
EXTRA_METHODS = ("gptq-imatrix",)
HOLDS_BASE_GRID = ("Q4_1", "Q5_1")
GGUF_FIRST = ("F16", *GGUF)
IGNORES_IMPORTANCE = ("Q8_0",)  # llama.cpp's Q8_0 has no importance-weighted quantizer
NOTES = (
    "KL (nats/token) to the base on the proxy split, perplexity on the evaluation split; bpw over the "
    "target's weights as stored (fallbacks included). Block linears: imatrix = the input's Σx² per column "
    "(calibration split), gptq = the format's reference grid fixed, then GPTQ codes (act-order, damp 0.01). "
    "Embedding/head (tied): imatrix and gptq use the head's input statistics (final norm output), as "
    "llama.cpp's imatrix does for a tied table. holds_base_grid: the base is a dequantized Q4_1 GGUF, "
    "which Q4_1 (and Q5_1) can reproduce exactly: no conclusion on those rows."
)


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


def head_statistics(wb: Workbench) -> tuple[torch.Tensor, torch.Tensor]:
    """Give (Σx² per input [d], Σ x xᵀ [d, d]) of the output head's input on the calibration tokens."""
    head = wb.lm.model.get_output_embeddings()
    d = head.weight.shape[1]
    sq, hess = torch.zeros(d, dtype=torch.float64), torch.zeros(d, d, dtype=torch.float64)

    def hook(_m: torch.nn.Module, args: tuple) -> None:
        x = args[0].detach().double().reshape(-1, d)
        sq.add_((x * x).sum(0))
        hess.add_(x.T @ x)

    run_with_hooks(wb.lm.model, wb.data.calib, [head.register_forward_pre_hook(hook)])
    return sq.float(), hess.float()


def table_model(wb: Workbench, plan: Plan, method: str, stats: tuple[torch.Tensor, torch.Tensor]) -> torch.nn.Module:
    """Give the base model with its embedding / head table(s) stored as the plan says, by imatrix or GPTQ
    on the head's input statistics (``apply`` quantizes tables by rtn only)."""
    model = copy.deepcopy(wb.lm.model)
    sq, hess = stats
    with torch.no_grad():
        for e in wb.lm.anatomy.embeddings:
            fmt = formats.get(plan.embedding_choice(e.name).format)
            weight = model.get_submodule(e.name).weight  # tied: the head's table too
            w = weight.detach().float()
            if method == "imatrix":
                q = fmt.quantize(w, importance=sq)
            else:
                weighted = sq if method == "gptq-imatrix" else None
                q = formats.gptq_quantize(w, hess, fmt, importance=weighted, **gptq.PLAN_SETTINGS.kwargs())
            weight.copy_(fmt.dequantize(q))
    return model


def jobs(targets: list[str], names: list[str], methods: list[str]) -> list[tuple[str, str, str]]:
    """Give (target, format, method) in run order: GGUF on the block linears, the table, then the rest."""
    order = []
    for target in ("block linears", "embedding/head"):
        for name in GGUF_FIRST:
            order += [(target, name, m) for m in METHODS]
    for target in ("block linears", "embedding/head"):
        order += [(target, name, m) for name in DEFAULT_FORMATS if name not in GGUF_FIRST for m in METHODS]
    order += [(t, n, m) for t in targets for n in names for m in methods]  # formats outside the defaults
    seen, out = set(), []
    for job in order:
        target, name, method = job
        if job in seen or target not in targets or name not in names or method not in methods:
            continue
        if formats.get(name).is_float and method != "rtn":
            continue
        seen.add(job)
        out.append(job)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", default=",".join(DEFAULT_FORMATS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--targets", default="block linears,embedding/head")
    ap.add_argument("--markdown", action="store_true", help="print the stored results as a README table and stop")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads(RESULTS.read_text())))
        return
    wb = Workbench.open(log=print)
    a = wb.lm.anatomy
    jetson = CostModel(load_profile("jetson"), a)
    base_lp = output_logprobs(wb.lm.model, wb.data.proxy)
    base_ppl = perplexity(wb.lm.model, wb.data.eval, wb.data.eval_chars).ppl
    done = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    rows = {(r["format"], r["target"]): r for r in done.get("rows", [])}
    head_stats = None
    for target, name, method in jobs(args.targets.split(","), args.formats.split(","), args.methods.split(",")):
        row = rows.setdefault(
            (name, target), {"format": name, "target": target, "holds_base_grid": name in HOLDS_BASE_GRID}
        )
        if row.get(method) is not None:
            continue
        if target == "embedding/head" and all(_fitted(name, e.cols) != name for e in a.embeddings):
            # the table's rows cannot hold it at all: llama.cpp stores the fallback, measured in its own row
            row["stored_as"] = _fitted(name, a.embeddings[0].cols)
            continue
        if method == "imatrix" and name in IGNORES_IMPORTANCE and row.get("rtn") is not None:
            # the same codes as rtn by construction (tests/formats: test_q8_0_ignores_importance_as_llama_cpp_does)
            row[method] = {**row["rtn"], "seconds": 0.0, "copied_from": "rtn (the format ignores importance)"}
            continue
        t0 = time.perf_counter()
        if target == "block linears":
            plan, bpw, fell = block_plan(wb, name, method)
            model = wb.apply(plan)
        else:
            plan, bpw, fell = table_plan(wb, name)
            if method == "rtn" or formats.get(name).is_float:
                model = wb.apply(plan)
            else:
                head_stats = head_stats or head_statistics(wb)
                model = table_model(wb, plan, method, head_stats)
        kl = kl_to_base(model, wb.data.proxy, base_lp).kl
        ppl = perplexity(model, wb.data.eval, wb.data.eval_chars).ppl
        row.update(bpw=round(bpw, 4), fallback_share=round(fell, 4))
        row["weights_mb_jetson"] = round(jetson.predict(plan).weights_mb, 3)
        row[method] = {"kl": kl, "ppl": ppl, "seconds": round(time.perf_counter() - t0, 1)}
        print(f"{target:15s} {name:15s} {method:8s} bpw {bpw:6.3f} KL {kl:.4f} ppl {ppl:8.3f}", flush=True)
        del model
        save(a.name, wb, base_ppl, rows)
    save(a.name, wb, base_ppl, rows)
    print_table(rows.values(), base_ppl)


def save(model_name: str, wb: Workbench, base_ppl: float, rows: dict) -> None:
    """Write every row measured so far to RESULTS."""
    out = {
        "model": model_name,
        "base_ppl": base_ppl,
        "proxy_tokens": int(wb.data.proxy.numel()),
        "eval_tokens": int(wb.data.eval.numel()),
        "calib_tokens": int(wb.data.calib.numel()),
        "notes": NOTES,
        "rows": list(rows.values()),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=1) + "\n")
    tmp.replace(RESULTS)  # a run stopped mid-write leaves the previous file whole


def _methods(rows) -> tuple[str, ...]:
    """Give the methods to show: the three, then any other some row holds."""
    return (*METHODS, *(m for m in EXTRA_METHODS if any(m in r for r in rows)))


def markdown(results: dict) -> str:
    """Give the stored results as a markdown table (one line per target and format, fastest-first methods)."""
    methods = _methods(results["rows"])
    head = "| target | format | bpw | " + " | ".join(f"{m} KL | {m} ppl" for m in methods) + " | note |"
    lines = [head, "|" + "---|" * (3 + 2 * len(methods) + 1)]
    rows = sorted(results["rows"], key=lambda r: (r["target"] != "block linears", -r.get("bpw", 0), r["format"]))
    for r in rows:
        cells = []
        for m in methods:
            v = r.get(m)
            cells += [f"{v['kl']:.4f}", f"{v['ppl']:.2f}"] if v else ["-", "-"]
        notes = []
        if r.get("stored_as"):
            notes.append(f"rows too narrow: stored as {r['stored_as']}")
        elif r.get("fallback_share"):
            notes.append(f"{100 * r['fallback_share']:.0f} % of weights in llama.cpp's fallback")
        if r["holds_base_grid"]:
            notes.append("holds the base's Q4_1 grid: no conclusion")
        elif r.get("fallback_share") and FALLBACK.get(r["format"]) in HOLDS_BASE_GRID:
            notes.append(f"its fallback {FALLBACK[r['format']]} can hold the base's grid: no conclusion")
        if r.get("imatrix") and r.get("rtn") and r["imatrix"]["kl"] == r["rtn"]["kl"]:
            notes.append("its quantizer ignores importance (imatrix = rtn)")
        bpw = f"{r['bpw']:.2f}" if "bpw" in r else "-"
        lines.append(f"| {r['target']} | {r['format']} | {bpw} | " + " | ".join(cells) + f" | {'; '.join(notes)} |")
    return f"Base perplexity {results['base_ppl']:.2f}.\n\n" + "\n".join(lines)


def print_table(rows, base_ppl: float) -> None:
    """Print one line per (target, format): bpw, then KL and perplexity per method."""
    rows = list(rows)
    methods = _methods(rows)
    print(f"\nbase perplexity {base_ppl:.3f}")
    print(
        f"{'target':15s} {'format':15s} {'bpw':>6s} " + " ".join(f"{m + ' KL':>11s} {m + ' ppl':>10s}" for m in methods)
    )
    for r in sorted(rows, key=lambda r: (r["target"], -r.get("bpw", 0), r["format"])):
        cells = []
        for m in methods:
            v = r.get(m)
            cells.append(f"{v['kl']:11.4f} {v['ppl']:10.3f}" if v else f"{'-':>11s} {'-':>10s}")
        mark = "  (holds the base's Q4_1 grid)" if r["holds_base_grid"] else ""
        if r.get("stored_as"):
            mark = f"  (rows too narrow: stored as {r['stored_as']})"
        print(f"{r['target']:15s} {r['format']:15s} {r.get('bpw', 0):6.3f} " + " ".join(cells) + mark)


if __name__ == "__main__":
    main()
