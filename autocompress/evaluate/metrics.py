"""Quality metrics: perplexity / bits per character and, for classifiers, accuracy / macro-F1 /
expected calibration error (full metrics); KL to the base model's outputs (proxy)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from autocompress.device import model_device
from autocompress.errors import AutocompressError


class EvaluationError(AutocompressError):
    """A model produced non-finite outputs (the trial is failed with this reason)."""


def _logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Give the model's logits for ``input_ids`` as float32 on the CPU (the model may compute on a GPU)."""
    out = model(input_ids=input_ids.to(model_device(model)))
    return out.logits.float().cpu()


def _check_finite(t: torch.Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        raise EvaluationError(f"the compressed model produced NaN/inf {what}")


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    bpc: float
    nll_per_token: float
    tokens: int

    def metrics(self) -> dict[str, float]:
        """Give what the search stores for a plan (study user attrs, pareto.json)."""
        return {"ppl": self.ppl, "bpc": self.bpc}


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


TOPK = 32  # tokens kept by the top-k KL


@dataclass(frozen=True)
class Fidelity:
    kl: float  # mean KL(base || compressed) in nats per position
    top1_agreement: float  # fraction of positions where the argmax matches the base model
    topk_kl: float = math.nan  # KL on the base model's top-k tokens plus one bucket for the rest (<= kl)


def topk_kl(logp: torch.Tensor, logq: torch.Tensor, k: int = TOPK) -> torch.Tensor:
    """Give KL(base || compressed) per position on k+1 outcomes: the base model's top-k tokens and "any other".

    Coarsening both distributions the same way can only lower a KL divergence, so this never
    exceeds the full KL and equals it when k covers the vocabulary; it needs only the base
    model's top-k log-probabilities, not its full output.
    """
    k = min(k, logp.shape[-1])
    top_lp, idx = logp.topk(k, dim=-1)
    top_lq = logq.gather(-1, idx)
    rest_p = torch.log1p(-top_lp.exp().sum(-1).clamp(max=1 - 1e-7))
    rest_q = torch.log1p(-top_lq.exp().sum(-1).clamp(max=1 - 1e-7))
    kl = (top_lp.exp() * (top_lp - top_lq)).sum(-1) + rest_p.exp() * (rest_p - rest_q)
    return kl.clamp(min=0.0)


def kl_to_base(
    model: nn.Module, tokens: torch.Tensor, base_logprobs: torch.Tensor, batch_size: int = 4, k: int = TOPK
) -> Fidelity:
    """Give the mean KL divergence from the base model's output distribution, its top-k form, and top-1 agreement."""
    kl_sum = 0.0
    topk_sum = 0.0
    agree = 0
    n = 0
    with torch.inference_mode():
        for start in range(0, tokens.shape[0], batch_size):
            logq = torch.log_softmax(_logits(model, tokens[start : start + batch_size]), dim=-1)
            _check_finite(logq, "logits")
            logp = base_logprobs[start : start + batch_size]
            kl = (logp.exp() * (logp - logq)).sum(-1)
            kl_sum += float(kl.double().sum())
            topk_sum += float(topk_kl(logp, logq, k).double().sum())
            agree += int((logp.argmax(-1) == logq.argmax(-1)).sum())
            n += kl.numel()
    return Fidelity(kl=max(kl_sum / n, 0.0), top1_agreement=agree / n, topk_kl=topk_sum / n)


# ---- classification (encoder task) ----------------------------------------------------------------

ECE_BINS = 15  # equal-width confidence bins (Guo et al., 2017)


@dataclass(frozen=True)
class Classification:
    accuracy: float
    macro_f1: float  # unweighted mean of per-class F1 over the classes present in labels or predictions
    ece: float  # expected calibration error of the top-1 confidence, ECE_BINS equal-width bins
    top1_agreement: float  # fraction of rows whose predicted class matches the base model's (NaN: no base)
    n: int

    def metrics(self) -> dict[str, float]:
        """Give what the search stores for a plan (study user attrs, pareto.json)."""
        return {
            "accuracy": self.accuracy,
            "macro_f1": self.macro_f1,
            "ece": self.ece,
            "eval_top1_agreement": self.top1_agreement,
        }


def class_logits(model: nn.Module, tokens: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Give a classifier's logits [n, classes] for token rows [n, L] (padded rows: see ``evaluate.tasks``)."""
    parts = []
    with torch.inference_mode():
        for start in range(0, tokens.shape[0], batch_size):
            parts.append(_logits(model, tokens[start : start + batch_size]))
    out = torch.cat(parts)
    _check_finite(out, "logits")
    return out


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = ECE_BINS) -> float:
    """Give ECE = sum over bins of (bin share) * |accuracy - mean confidence| of the top-1 prediction.

    Bins are equal-width on [0, 1], each (lo, hi] (a confidence of exactly 0 goes to the first).
    """
    conf, pred = probs.double().max(-1)
    correct = (pred == labels).double()
    inner = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)[1:-1]
    bins = torch.bucketize(conf, inner)  # boundaries[i-1] < x <= boundaries[i]
    n = conf.numel()
    ece = 0.0
    for b in bins.unique():
        sel = bins == b
        ece += float(sel.sum()) / n * abs(float(correct[sel].mean() - conf[sel].mean()))
    return ece


def classification_metrics(
    logits: torch.Tensor, labels: torch.Tensor, base_pred: torch.Tensor | None = None, n_bins: int = ECE_BINS
) -> Classification:
    """Give accuracy, macro-F1 (scikit-learn), ECE and top-1 agreement with ``base_pred`` from logits."""
    from sklearn.metrics import accuracy_score, f1_score

    pred = logits.argmax(-1)
    y, p = labels.numpy(), pred.numpy()
    agreement = float((pred == base_pred).double().mean()) if base_pred is not None else math.nan
    return Classification(
        accuracy=float(accuracy_score(y, p)),
        macro_f1=float(f1_score(y, p, average="macro", zero_division=0)),
        ece=expected_calibration_error(torch.softmax(logits.double(), -1), labels, n_bins),
        top1_agreement=agreement,
        n=int(labels.numel()),
    )


def chunked_perplexity(model: nn.Module, ids: torch.Tensor, ctx: int, bos: int | None = None) -> float:
    """Give perplexity computed the way ``llama-perplexity`` does: ``ids`` (1-D) cut into whole chunks
    of ``ctx`` tokens (the first replaced by ``bos`` when the vocabulary adds one), each chunk scored
    on its second half only (positions ctx/2 .. ctx-2 predicting the next token)."""
    n = ids.numel() // ctx
    if n < 1:
        raise EvaluationError(f"{ids.numel()} tokens make no chunk of {ctx}")
    chunks = ids[: n * ctx].reshape(n, ctx).clone()
    if bos is not None:
        chunks[:, 0] = bos
    first = ctx // 2
    nll, count = 0.0, 0
    with torch.no_grad():
        for row in chunks:
            logp = torch.log_softmax(_logits(model, row[None])[0, first : ctx - 1].double(), dim=-1)
            _check_finite(logp, "log-probabilities")
            target = row[first + 1 :]
            nll -= float(logp.gather(1, target[:, None]).sum())
            count += target.numel()
    return math.exp(nll / count)
