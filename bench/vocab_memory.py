"""Peak memory of scoring a plan (KL proxy + perplexity) as the vocabulary grows, old path vs new.

    python bench/vocab_memory.py [--vocabs 49152 128256 262144] [--redo]
    # prints the table, writes bench/results/vocab_memory.json (resumes: settings already there are skipped)

Model: a random-init Gemma 3 text decoder (tied embeddings, as in Gemma 3) from its real config
class, hidden 64, 2 blocks, with each vocabulary size: 49,152 (SmolLM2), 128,256 (Llama 3) and
262,144 (Gemma 3). Data: random token ids with the default budgets (``DataConfig``: sequences of
256, 1,024 proxy tokens, 4,096 evaluation tokens). Plan: 4-bit groups of 32 for every linear and
Q8_0 for the embedding (which is also the output head); the bench checks it applied.

Each setting runs in its own process: build the model, apply the plan, then reset the peak RSS
(``/proc/self/clear_refs``) and score: the base model's log-probs for the KL proxy (kept, as the
``Evaluator`` keeps them), the plan's KL to them, and perplexity on the evaluation tokens. The
figure is the peak RSS during scoring above the RSS before it.

"old" is the code as of commit 78088db (copied below, unchanged: the full [proxy tokens x vocab]
float32 base log-probs, logits for 4 sequences at a time); "new" is ``autocompress.evaluate``
(base log-probs kept whole up to ``FULL_BASE_BYTES``, else top-k plus draws from the rest;
logits a few rows and positions at a time). The KL columns compare the two on the same plan
(a random-init model's outputs are nearly flat over 262k tokens: the hardest case for top-k).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).parent / "results" / "vocab_memory.json"
VOCABS = (49152, 128256, 262144)
PATHS = ("old", "new")


# ---- the old path, as of commit 78088db (autocompress/evaluate/metrics.py) -------------------------
def old_output_logprobs(model, tokens, batch_size=4):
    import torch

    from autocompress.evaluate.metrics import model_logits

    parts = []
    with torch.inference_mode():
        for start in range(0, tokens.shape[0], batch_size):
            parts.append(torch.log_softmax(model_logits(model, tokens[start : start + batch_size]), dim=-1))
    return torch.cat(parts)


def old_kl_to_base(model, tokens, base_logprobs, batch_size=4, k=32):
    import torch

    from autocompress.evaluate.metrics import check_finite, model_logits, topk_kl

    kl_sum = topk_sum = 0.0
    agree = n = 0
    with torch.inference_mode():
        for start in range(0, tokens.shape[0], batch_size):
            logq = torch.log_softmax(model_logits(model, tokens[start : start + batch_size]), dim=-1)
            check_finite(logq, "logits")
            logp = base_logprobs[start : start + batch_size]
            kl = (logp.exp() * (logp - logq)).sum(-1)
            kl_sum += float(kl.double().sum())
            topk_sum += float(topk_kl(logp, logq, k).double().sum())
            agree += int((logp.argmax(-1) == logq.argmax(-1)).sum())
            n += kl.numel()
    return {"kl": max(kl_sum / n, 0.0), "top1_agreement": agree / n, "topk_kl": topk_sum / n}


def old_perplexity(model, tokens, batch_size=4):
    import torch

    from autocompress.evaluate.metrics import check_finite, model_logits

    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, tokens.shape[0], batch_size):
            ids = tokens[start : start + batch_size]
            logp = torch.log_softmax(model_logits(model, ids)[:, :-1], dim=-1)
            nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
            check_finite(nll, "log-likelihoods")
            total += float(nll.double().sum())
            count += nll.numel()
    return math.exp(min(total / count, 700.0))


# ---- one setting, in its own process ----------------------------------------------------------------
def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def one(vocab: int, path: str) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from autocompress.calib import DataConfig
    from autocompress.compress import apply_plan_to
    from autocompress.evaluate import metrics as M
    from autocompress.model.inspect import anatomy_of
    from autocompress.model.loading import state_dict_hash
    from autocompress.plan import LayerChoice, ModelRef, Plan, Provenance

    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    cfg = AutoConfig.for_model(
        "gemma3_text", vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(cfg).eval()
    anatomy = anatomy_of(model, f"gemma3-v{vocab}", state_dict_hash(model))
    embed = anatomy.embeddings[0].name
    plan = Plan(
        model=ModelRef.of(anatomy),
        default=LayerChoice(bits=4, group_size=32),
        layers={embed: LayerChoice(format="Q8_0")},
        provenance=Provenance(data_hash="v" * 16),
    )
    plan.validate(anatomy)
    small = apply_plan_to(model, anatomy, plan)
    w0, w1 = model.get_submodule(embed).weight, small.get_submodule(embed).weight
    embed_err = float((w1.float() - w0.float()).norm() / w0.float().norm())

    d = DataConfig()
    gen = torch.Generator().manual_seed(0)
    proxy = torch.randint(3, vocab, (d.proxy_tokens // d.seq_len, d.seq_len), generator=gen)
    evals = torch.randint(3, vocab, (d.eval_tokens // d.seq_len, d.seq_len), generator=gen)

    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    rss0 = _status_kb("VmRSS")
    t0 = time.perf_counter()
    if path == "old":
        base = old_output_logprobs(model, proxy)
        stored = base.numel() * base.element_size()
        fid = old_kl_to_base(small, proxy, base)
        ppl = old_perplexity(small, evals)
    else:
        base = M.output_logprobs(model, proxy)
        stored = base.nbytes
        f = M.kl_to_base(small, proxy, base)
        fid = {"kl": f.kl, "top1_agreement": f.top1_agreement, "topk_kl": f.topk_kl}
        ppl = M.perplexity(small, evals, 1).ppl
    seconds = time.perf_counter() - t0
    peak = _status_kb("VmHWM")
    return {
        "vocab": vocab,
        "path": path,
        "compact_base": path == "new" and isinstance(base, M.CompactLogprobs),
        "proxy_tokens": int(proxy.numel()),
        "eval_tokens": int(evals.numel()),
        "stored_base_mb": stored / 2**20,
        "scoring_peak_mb": (peak - rss0) / 1024,
        "rss_before_mb": rss0 / 1024,
        "seconds": seconds,
        "embedding_rel_error": embed_err,
        "embedding_quantized": 0 < embed_err < 0.05,
        **fid,
        "ppl": ppl,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocabs", type=int, nargs="+", default=list(VOCABS))
    ap.add_argument("--redo", action="store_true", help="measure again settings already in the results")
    ap.add_argument("--one", nargs=2, metavar=("VOCAB", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(int(args.one[0]), args.one[1])))
        return
    results = json.loads(OUT.read_text()) if OUT.is_file() and not args.redo else {}
    for vocab in args.vocabs:
        for path in PATHS:
            key = f"{vocab}-{path}"
            if key in results:
                continue
            proc = subprocess.run(
                [sys.executable, __file__, "--one", str(vocab), path], capture_output=True, text=True, check=False
            )
            if proc.returncode != 0:
                print(f"{key}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            results[key] = json.loads(proc.stdout.strip().splitlines()[-1])
            OUT.parent.mkdir(parents=True, exist_ok=True)
            OUT.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")  # incremental: a rerun resumes
            print(f"{key}: done", file=sys.stderr)
    head = (
        f"{'vocab':>7} {'path':>4} {'base kept':>10} {'stored MB':>9} {'peak MB':>8} {'s':>6} "
        f"{'KL':>9} {'KL rel.':>8} {'top32 KL':>9} {'top1':>6} {'ppl':>9} {'embed Q8_0':>10}"
    )
    print(head)
    for vocab in args.vocabs:
        old = results.get(f"{vocab}-old")
        for path in PATHS:
            r = results.get(f"{vocab}-{path}")
            if r is None:
                continue
            rel = (r["kl"] - old["kl"]) / old["kl"] if old and path == "new" and old["kl"] > 0 else 0.0
            kept = "top-k+rest" if r["compact_base"] else "full"
            print(
                f"{vocab:>7} {path:>4} {kept:>10} {r['stored_base_mb']:>9.1f} {r['scoring_peak_mb']:>8.0f} "
                f"{r['seconds']:>6.1f} {r['kl']:>9.5f} {rel:>+8.4f} {r['topk_kl']:>9.5f} "
                f"{r['top1_agreement']:>6.3f} {r['ppl']:>9.1f} {'applied' if r['embedding_quantized'] else 'NO':>10}"
            )


if __name__ == "__main__":
    main()
