"""Quality metrics: perplexity / bits per character (full metric) and KL to the base model (proxy)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from autocompress.errors import AutocompressError


class EvaluationError(AutocompressError):
    """A model produced non-finite outputs (the trial is failed with this reason)."""


def _logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=input_ids)
    return out.logits.float()


def _check_finite(t: torch.Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        raise EvaluationError(f"the compressed model produced NaN/inf {what}")


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    bpc: float
    nll_per_token: float
    tokens: int


def perplexity(model: nn.Module, tokens: torch.Tensor, chars: int, batch_size: int = 4) -> Perplexity:
    """Give perplexity and bits per character of next-token prediction over ``tokens`` [n, L]."""
    total = 0.0
    count = 0
    with torch.inference_mode():
        for start in range(0, tokens.shape[0], batch_size):
            ids = tokens[start : start + batch_size]
            logp = torch.log_softmax(_logits(model, ids)[:, :-1], dim=-1)
            nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
            _check_finite(nll, "log-likelihoods")
            total += float(nll.double().sum())
            count += nll.numel()
    mean = total / count
    return Perplexity(
        ppl=math.exp(min(mean, 700.0)), bpc=total / math.log(2) / max(chars, 1), nll_per_token=mean, tokens=count
    )


def output_logprobs(model: nn.Module, tokens: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """Give the model's output log-probabilities: [n, L, vocab] for LMs, [n, classes] for classifiers."""
    parts = []
    with torch.inference_mode():
        for start in range(0, tokens.shape[0], batch_size):
            parts.append(torch.log_softmax(_logits(model, tokens[start : start + batch_size]), dim=-1))
    return torch.cat(parts)


@dataclass(frozen=True)
class Fidelity:
    kl: float  # mean KL(base || compressed) in nats per position
    top1_agreement: float  # fraction of positions where the argmax matches the base model


def kl_to_base(model: nn.Module, tokens: torch.Tensor, base_logprobs: torch.Tensor, batch_size: int = 4) -> Fidelity:
    """Give the mean KL divergence from the base model's output distribution, and top-1 agreement."""
    kl_sum = 0.0
    agree = 0
    n = 0
    with torch.inference_mode():
        for start in range(0, tokens.shape[0], batch_size):
            logq = torch.log_softmax(_logits(model, tokens[start : start + batch_size]), dim=-1)
            _check_finite(logq, "logits")
            logp = base_logprobs[start : start + batch_size]
            kl = (logp.exp() * (logp - logq)).sum(-1)
            kl_sum += float(kl.double().sum())
            agree += int((logp.argmax(-1) == logq.argmax(-1)).sum())
            n += kl.numel()
    return Fidelity(kl=max(kl_sum / n, 0.0), top1_agreement=agree / n)
