"""Intel Neural Compressor's accuracy-driven autotune over an RTN weight-only config set.

Runs in the benchmark's own venv (``bench/.venv-inc``: torch 2.13.0 CPU, neural-compressor-pt 3.10,
accelerate, transformers), never in the project's. Called by ``bench/search.py``:

    bench/.venv-inc/bin/python bench/inc_autotune.py MODEL_DIR TOKENS.safetensors OUT.json

INC's ``eval_fn`` is top-1 agreement with the fp32 model on the proxy tokens (higher is better;
``tolerable_loss`` 0.01, INC's default, relative to the fp32 score of 1.0). The chosen model's KL
to the base model is then measured the same way the project measures it (mean over tokens of the
full-vocabulary KL(base || quantized), nats/token), on the same tokens.
"""

from __future__ import annotations

import json
import sys
import time

import torch
from neural_compressor.torch.quantization import RTNConfig, TuningConfig, autotune
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

BATCH = 4
CONFIG_SET = {"bits": [4, 8], "group_size": [32, 128], "use_sym": [True, False]}


def logprobs(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = [model(tokens[i : i + BATCH]).logits.float().log_softmax(-1) for i in range(0, len(tokens), BATCH)]
    return torch.cat(out)


def main(model_dir: str, tokens_path: str, out_path: str) -> None:
    torch.manual_seed(0)
    tokens = load_file(tokens_path)["proxy"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    base = logprobs(model, tokens)
    calls = []

    def eval_fn(m: torch.nn.Module) -> float:
        agree = float((logprobs(m, tokens).argmax(-1) == base.argmax(-1)).float().mean())
        calls.append(agree)
        return agree

    t0 = time.time()
    tc = TuningConfig(config_set=[RTNConfig(**CONFIG_SET)], tolerable_loss=0.01, max_trials=8)
    q = autotune(model, tc, eval_fn=eval_fn)
    seconds = time.time() - t0
    quantized = [m for m in q.modules() if type(m).__name__ == "INCWeightOnlyLinear"]
    picked = {
        "bits": quantized[0].bits,
        "group_size": quantized[0].group_size,
        "symmetric": not bool(getattr(quantized[0], "zp", False)),
        "quantized_linears": len(quantized),
    }
    lq = logprobs(q, tokens)
    kl = float((base.exp() * (base - lq)).sum(-1).double().mean())
    top1 = float((lq.argmax(-1) == base.argmax(-1)).float().mean())
    result = {
        "picked": picked,
        "kl": max(kl, 0.0),
        "top1_agreement": top1,
        "eval_calls": calls,  # first = fp32 baseline, then one per trial (and a re-check of the pick)
        "seconds": seconds,
        "config_set": CONFIG_SET,
        "tolerable_loss": 0.01,
    }
    with open(out_path, "w") as fh:
        json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:4])
