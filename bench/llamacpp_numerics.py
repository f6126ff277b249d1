"""Does emulating llama.cpp's CPU numerics make our perplexity match llama-perplexity on the exported GGUF?

For each plan on the default model: export the GGUF, run ``llama-perplexity`` on held-out text
(ctx 256, threads 2), and score our compressed model on llama.cpp's own tokens, chunked and scored the
same way (``evaluate.metrics.chunked_perplexity``), under these numerics:

- ``exact``: fp32, no activation rounding (what the search used before ``llama.cpp-cpu``);
- ``llama.cpp-cpu``: every linear's and the head's input rounded to its weight type's vec_dot_type,
  K and V to fp16 (llama.cpp's F16 cache; K before rope here);
- ablations: the same without the KV rounding; the same without the output head.

It also compares llama.cpp's own log-probabilities (``--kl-divergence-base`` file: every scored position,
every token) with ours on the first chunks, a far finer measure than perplexity, and reports each plan's KL to the fp32 base model (the search's quality measure) with and without
the emulation, on the first chunks.

The base weights are rounded to bf16 first (GGUF stores the dense tensors, the tied head among them,
in BF16; the bundled weights are fp32), so file and model hold the same weights. Prints a table and writes ``bench/results/llamacpp_numerics.json`` (each plan saved as it finishes; a
rerun resumes). The default model's weights are a dequantized Q4_1 GGUF: Q4_1 holds them exactly, so
its row shows the Q8_1 path, not a conclusion about the format. Run under the CPU lock:

    flock ~/.cache/ac-cpu.lock .venv/bin/python -m bench.llamacpp_numerics [--chunks 32] [--fresh]

(also runs as a module)
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import gguf
import torch

from autocompress.calib import held_out_text
from autocompress.compress.numerics import attach_llamacpp, llamacpp_logprobs
from autocompress.evaluate.metrics import chunked_perplexity, kl_to_base, model_logits, output_logprobs
from autocompress.export.gguf import export_gguf
from autocompress.plan import LayerChoice, ModelRef, Plan
from autocompress.runtime import llamacpp
from autocompress.workbench import Workbench

OUT = Path(__file__).parent / "results" / "llamacpp_numerics.json"
CTX = 256
THREADS = 2
TEXT_CHARS = 80_000  # held-out text; more than enough tokens for the chunks asked for
LOGPROB_CHUNKS = 8  # chunks on which llama.cpp's own log-probabilities (every position, every token) are compared
KL_CHUNKS = 4  # chunks on which KL to the fp32 base model (what the search ranks by) is also reported
VARIANTS = {  # name -> attach_llamacpp options (None: no emulation)
    "exact": None,
    "llama.cpp-cpu": {"head": True, "kv_cache": True},  # as the numerics ships
    "no kv f16": {"head": True, "kv_cache": False},
    "no head": {"head": False, "kv_cache": True},
}


def plans(wb: Workbench) -> dict[str, Plan]:
    """Give the plans compared: uniform legacy types, a K-quant mix, the dense base, and Q4_1."""
    a = wb.lm.anatomy

    def plan(fmt_of, embedding: str | None = None) -> Plan:
        layers = {s.name: LayerChoice(format=fmt_of(s)) for s in a.linears if fmt_of(s)}
        if embedding:
            layers[a.embeddings[0].name] = LayerChoice(format=embedding)
        return Plan(model=ModelRef.of(a), layers=layers, provenance=wb.provenance())

    def kmix(s):  # the 1536-wide ffn_down takes K-quants (576 is no multiple of 256)
        return {"down": "Q6_K" if s.block % 3 == 0 else "Q4_K", "v": "Q8_0"}.get(s.role, "Q5_0")

    return {
        "Q8_0": plan(lambda s: "Q8_0"),
        "Q5_0": plan(lambda s: "Q5_0"),
        "Q4_0": plan(lambda s: "Q4_0"),
        "K-mix (Q4_K/Q6_K down, Q5_0/Q8_0, emb Q8_0)": plan(kmix, embedding="Q8_0"),
        "dense BF16": plan(lambda s: None),
        "Q4_1 (base format: no conclusion)": plan(lambda s: "Q4_1"),
    }


def bos_of(path: Path) -> int | None:
    """Give the BOS id llama-perplexity puts at each chunk's start (None when the vocabulary adds none)."""
    fields = gguf.GGUFReader(path).fields
    add, bos = fields.get("tokenizer.ggml.add_bos_token"), fields.get("tokenizer.ggml.bos_token_id")
    return int(bos.contents()) if add is not None and bos is not None and add.contents() else None


def measure(wb: Workbench, plan: Plan, text: str, chunks: int) -> dict:
    """Give llama-perplexity on the plan's GGUF and ours under each numerics variant, on the same tokens."""
    with tempfile.TemporaryDirectory(prefix="llamacpp-numerics-") as tmp:
        path, text_file = Path(tmp) / "m.gguf", Path(tmp) / "text.txt"
        text_file.write_text(text)
        rec = export_gguf(wb, plan, path)
        ids = llamacpp.tokenize(path, text_file)
        n = min(chunks, len(ids) // CTX)
        t0 = time.perf_counter()
        ppl_llama = llamacpp.perplexity(path, text_file, ctx=CTX, chunks=n, threads=THREADS)
        llama_s = time.perf_counter() - t0
        bos = bos_of(path)
        lp_tokens, theirs = llamacpp_logprobs(path, text_file, ctx=CTX, chunks=min(n, LOGPROB_CHUNKS))
    model = wb.apply(plan, stored={}).eval()  # built as the export built it (no cached layers)
    tokens = torch.tensor(ids[: n * CTX])
    kl_tokens = tokens[: KL_CHUNKS * CTX].reshape(KL_CHUNKS, CTX)
    base_lp = output_logprobs(wb.lm.model, kl_tokens)
    lp_chunks = torch.from_numpy(lp_tokens.copy())
    if bos is not None:
        lp_chunks[:, 0] = bos
    targets = lp_chunks[:, CTX // 2 + 1 :]

    def logprob_gap() -> dict[str, float]:
        """Mean |our log p - llama.cpp's| over every scored position: of the target token, of every token."""
        target_sum = all_sum = 0.0
        with torch.no_grad():
            for c in range(lp_chunks.shape[0]):
                ours_lp = torch.log_softmax(
                    model_logits(model, lp_chunks[c : c + 1])[0, CTX // 2 : CTX - 1].double(), -1
                )
                gap = ours_lp - torch.from_numpy(theirs[c]).double()
                target_sum += float(gap.gather(1, targets[c][:, None]).abs().mean())
                all_sum += float(gap.abs().mean())
        return {"target": target_sum / lp_chunks.shape[0], "all": all_sum / lp_chunks.shape[0]}

    ours, kl, gaps = {}, {}, {}
    for name, options in VARIANTS.items():
        handles = [] if options is None else attach_llamacpp(model, wb.lm.anatomy, plan, **options)
        try:
            ours[name] = chunked_perplexity(model, tokens, CTX, bos)
            gaps[name] = logprob_gap()
            if name in ("exact", "llama.cpp-cpu"):
                kl[name] = kl_to_base(model, kl_tokens, base_lp).kl
        finally:
            for h in handles:
                h.remove()
    return {
        "tensor_types": rec["tensor_types"],
        "file_bytes": rec["file_bytes"],
        "chunks": n,
        "scored_tokens": n * (CTX - 1 - CTX // 2),
        "ppl_llamacpp": ppl_llama,
        "llamacpp_s": llama_s,
        "ppl_ours": ours,
        "rel_diff": {k: v / ppl_llama - 1 for k, v in ours.items()},
        "kl_to_fp32_base": kl,
        "logprob_gap": gaps,
        "logprob_chunks": int(lp_chunks.shape[0]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=32)
    ap.add_argument("--fresh", action="store_true", help="ignore saved results")
    args = ap.parse_args()
    tools = llamacpp.require()
    results = {} if args.fresh or not OUT.is_file() else json.loads(OUT.read_text())
    rows = results.setdefault("plans", {})
    results.update(
        model="default (SmolLM2-135M-Instruct)",
        ctx=CTX,
        threads=THREADS,
        text=f"held-out split, first {TEXT_CHARS} characters",
        llama_cpp=str(tools.bin),
        cpu=platform.processor() or platform.machine(),
        variants={k: v or "no emulation" for k, v in VARIANTS.items()},
    )
    wb = Workbench.open()
    # The bundled weights are fp32 (a dequantized Q4_1 GGUF), but GGUF stores dense tensors (the tied
    # embedding / head, unquantized linears) in BF16: round them first, so the file holds exactly our
    # weights and only the arithmetic differs.
    with torch.no_grad():
        for p in wb.lm.model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    text = held_out_text()[:TEXT_CHARS]
    for name, plan in plans(wb).items():
        if rows.get(name, {}).get("chunks_asked") == args.chunks:
            print(f"{name}: saved", file=sys.stderr)
            continue
        print(f"{name}: exporting and measuring...", file=sys.stderr)
        rows[name] = {"chunks_asked": args.chunks, **measure(wb, plan, text, args.chunks)}
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps(results, indent=1))
    agree = [r for n, r in rows.items() if "no conclusion" not in n]
    results["mean_abs_rel_diff"] = {v: sum(abs(r["rel_diff"][v]) for r in agree) / len(agree) for v in VARIANTS}
    OUT.write_text(json.dumps(results, indent=1))
    head = f"{'plan':46} {'llama.cpp':>9} " + " ".join(f"{v:>14}" for v in VARIANTS)
    print(f"perplexity, ctx {CTX}, {next(iter(rows.values()))['chunks']} chunks; ours as rel. diff to llama-perplexity")
    print(head)
    for name, r in rows.items():
        cells = " ".join(f"{r['ppl_ours'][v]:7.3f} {r['rel_diff'][v]:+6.2%}" for v in VARIANTS)
        print(f"{name[:46]:46} {r['ppl_llamacpp']:9.3f} {cells}")
    means = " ".join(f"{'':7} {results['mean_abs_rel_diff'][v]:6.2%}" for v in VARIANTS)
    print(f"{'mean |rel diff| (Q4_1 left out)':46} {'':9} {means}")
    print("\nmean |our log p - llama.cpp's| per scored position (its logits file), target token / every token")
    print(f"{'plan':46} " + " ".join(f"{v:>17}" for v in VARIANTS))
    for name, r in rows.items():
        cells = " ".join(f"{r['logprob_gap'][v]['target']:8.5f} {r['logprob_gap'][v]['all']:8.5f}" for v in VARIANTS)
        print(f"{name[:46]:46} {cells}")
    print(f"\nKL to the fp32 base model on {KL_CHUNKS} x {CTX} tokens (what the search ranks by)")
    print(f"{'plan':46} {'exact':>10} {'llama.cpp-cpu':>14}")
    for name, r in rows.items():
        print(f"{name[:46]:46} {r['kl_to_fp32_base']['exact']:10.5f} {r['kl_to_fp32_base']['llama.cpp-cpu']:14.5f}")


if __name__ == "__main__":
    main()
