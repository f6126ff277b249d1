"""Does llama.cpp compute what we evaluate? GGUF exports of the default model scored by llama-perplexity
beside our own perplexity of the same plan on the same tokens (llama.cpp's tokenization, its chunking).

    flock ~/.cache/ac-cpu.lock python bench/gguf_agreement.py

Plans: uniform Q8_0, uniform Q4_0, and a K-quant mix (ffn_down Q6_K every third block else Q4_K,
attn_v Q8_0, the rest Q5_0), embedding Q8_0 in all three. Our side is computed without emulating
llama.cpp's activation rounding (``numerics: exact``): the gap is what that rounding (and llama.cpp's
accumulation order) costs. Writes bench/results/gguf_agreement.json.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from autocompress.calib import held_out_text
from autocompress.export import gguf as G
from autocompress.plan import LayerChoice, ModelRef, Plan
from autocompress.workbench import Workbench

RESULTS = Path(__file__).parent / "results" / "gguf_agreement.json"
CTX, CHUNKS, CHARS = 256, 16, 60_000
PLANS = {
    "Q8_0": lambda s: "Q8_0",
    "Q4_0": lambda s: "Q4_0",
    "K-mix": lambda s: {"down": "Q6_K" if s.block % 3 == 0 else "Q4_K", "v": "Q8_0"}.get(s.role, "Q5_0"),
}


def main() -> None:
    wb = Workbench.open(log=print)
    a = wb.lm.anatomy
    text = held_out_text(wb.data_config)[:CHARS]
    rows = []
    with tempfile.TemporaryDirectory(prefix="gguf-agreement-") as tmp:
        for label, pick in PLANS.items():
            layers = {s.name: LayerChoice(format=pick(s)) for s in a.linears}
            layers[a.embeddings[0].name] = LayerChoice(format="Q8_0")
            plan = Plan(model=ModelRef.of(a), layers=layers, provenance=wb.provenance())
            path = Path(tmp) / f"{label}.gguf"
            t0 = time.perf_counter()
            rec = G.export_gguf(wb, plan, path)
            seconds = time.perf_counter() - t0
            chk = G.check_with_llamacpp(path, wb.apply(plan), text, ctx=CTX, chunks=CHUNKS)
            row = {"plan": label, "mb": rec["file_bytes"] / 1e6, "export_s": round(seconds, 1), **chk}
            rows.append(row)
            print(
                f"{label:6s} {row['mb']:6.1f} MB  llama-perplexity {chk['ppl_llamacpp']:.3f}  ours {chk['ppl_ours']:.3f}"
                f"  ({chk['ppl_rel_diff']:+.2%}, {chk['ppl_tokens']} tokens)  export {seconds:.0f} s",
                flush=True,
            )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"ctx": CTX, "chunks": CHUNKS, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
