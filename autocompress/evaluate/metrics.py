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


def model_logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Give the model's logits for ``input_ids`` as float32 on the CPU (the model may compute on a GPU)."""
    out = model(input_ids=input_ids.to(model_device(model)))
    return out.logits.float().cpu()


def check_finite(t: torch.Tensor, what: str) -> None:
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


LOGIT_BUDGET = 1 << 26  # logits elements [rows x positions x vocab] one forward may give (256 MiB as fp32)
POSITION_CHUNK = 1 << 24  # elements [positions x vocab] each log-softmax / KL step works on (64 MiB as fp32)
FULL_BASE_BYTES = 256 << 20  # base log-probs up to this size are kept whole (exact KL); larger: ``CompactLogprobs``
BASE_TOPK = 256  # base tokens kept per position by ``CompactLogprobs``
REST_SAMPLES = 64  # tokens drawn per position from the base distribution outside its top-k


def _vocab(model: nn.Module) -> int:
    """Give the number of logits per position of a language model's head (1 for a classifier)."""
    try:
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        head = None
    return int(getattr(model.config, "vocab_size", 1) or 1) if head is not None else 1


def _batch_rows(model: nn.Module, tokens: torch.Tensor, batch_size: int) -> int:
    """Give rows per forward: ``batch_size``, fewer (at least one) while their logits pass ``LOGIT_BUDGET``."""
    per_row = max(int(tokens.shape[-1]) * _vocab(model), 1)
    return max(1, min(batch_size, LOGIT_BUDGET // per_row))


def _position_chunks(logits: torch.Tensor) -> list[slice]:
    """Cut the positions of ``logits`` [P, V] into slices of at most ``POSITION_CHUNK`` elements."""
    step = max(1, POSITION_CHUNK // max(int(logits.shape[-1]), 1))
    return [slice(s, s + step) for s in range(0, int(logits.shape[0]), step)]


def perplexity(model: nn.Module, tokens: torch.Tensor, chars: int, batch_size: int = 4) -> Perplexity:
    """Give perplexity and bits per character of next-token prediction over ``tokens`` [n, L]."""
    total = 0.0
    count = 0
    rows = _batch_rows(model, tokens, batch_size)
    with torch.inference_mode():
        for start in range(0, tokens.shape[0], rows):
            ids = tokens[start : start + rows]
            logits = model_logits(model, ids)[:, :-1]
            logits = logits.reshape(-1, logits.shape[-1])
            target = ids[:, 1:].reshape(-1)
            for c in _position_chunks(logits):
                nll = -torch.log_softmax(logits[c], dim=-1).gather(-1, target[c, None]).squeeze(-1)
                check_finite(nll, "log-likelihoods")
                total += float(nll.double().sum())
                count += nll.numel()
    mean = total / count
    return Perplexity(
        ppl=math.exp(min(mean, 700.0)), bpc=total / math.log(2) / max(chars, 1), nll_per_token=mean, tokens=count
    )


@dataclass(frozen=True)
class CompactLogprobs:
    """A language model's output distributions kept in O(k) per position instead of O(vocabulary).

    Per position: the ``k`` most likely tokens with their log-probabilities, the probability mass
    outside them (``rest``), and ``m`` tokens drawn (with replacement, fixed seed) from the
    distribution restricted to the rest, with their log-probabilities. ``kl_to_base`` then gives
    the top-k part of KL(base || compressed) exactly and the rest's part by importance sampling
    (with the control variate q/p, whose mean over the rest is known exactly): an unbiased
    estimate of the full KL (its expectation over the draws is the exact KL), exact when the top-k
    covers the distribution. The top-k KL (k <= ``k`` here) is exact, as from the full log-probs.
    """

    top_lp: torch.Tensor  # [..., k] float32, descending
    top_idx: torch.Tensor  # [..., k] int32
    rest: torch.Tensor  # [...] float32: probability mass outside the top-k
    sample_idx: torch.Tensor  # [..., m] int32: tokens drawn from the distribution outside the top-k
    sample_lp: torch.Tensor  # [..., m] float32: their log-probabilities
    vocab: int

    def __getitem__(self, rows: slice) -> CompactLogprobs:
        return CompactLogprobs(
            self.top_lp[rows],
            self.top_idx[rows],
            self.rest[rows],
            self.sample_idx[rows],
            self.sample_lp[rows],
            self.vocab,
        )

    def __len__(self) -> int:
        return int(self.rest.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        """Give the shape of the full log-probabilities this stands for ([n, L, vocab])."""
        return (*self.rest.shape, self.vocab)

    @property
    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for t in (self.top_lp, self.top_idx, self.rest, self.sample_idx, self.sample_lp)
        )

    @classmethod
    def cat(cls, parts: list[CompactLogprobs]) -> CompactLogprobs:
        fields = ("top_lp", "top_idx", "rest", "sample_idx", "sample_lp")
        return cls(*(torch.cat([getattr(p, f) for p in parts]) for f in fields), vocab=parts[0].vocab)


def _compact(logp: torch.Tensor, k: int, samples: int, gen: torch.Generator) -> CompactLogprobs:
    """Give the compact form of log-probabilities ``logp`` [P, V]."""
    k = min(k, logp.shape[-1])
    top_lp, top_idx = logp.topk(k, dim=-1)
    p_rest = logp.exp().scatter_(-1, top_idx, 0.0)
    rest = p_rest.sum(-1, dtype=torch.float64).float()
    p_rest[rest <= 0, 0] = 1.0  # nothing outside the top-k: any draw (its weight, rest, is 0)
    sample_idx = torch.multinomial(p_rest, samples, replacement=True, generator=gen)
    sample_lp = logp.gather(-1, sample_idx)
    return CompactLogprobs(top_lp, top_idx.int(), rest, sample_idx.int(), sample_lp, int(logp.shape[-1]))


def output_logprobs(
    model: nn.Module,
    tokens: torch.Tensor,
    batch_size: int = 4,
    *,
    full_bytes: int | None = None,
    k: int = BASE_TOPK,
    samples: int = REST_SAMPLES,
) -> torch.Tensor | CompactLogprobs:
    """Give the model's output log-probabilities: [n, L, vocab] for LMs, [n, classes] for classifiers.

    Where the full float32 log-probabilities of an LM would pass ``full_bytes`` (default
    ``FULL_BASE_BYTES``; large vocabularies, many proxy tokens), give ``CompactLogprobs`` (top-``k``
    plus ``samples`` drawn from the rest per position) instead; logits are computed a few rows
    (``LOGIT_BUDGET``) and positions (``POSITION_CHUNK``) at a time either way.
    """
    vocab = _vocab(model)
    limit = FULL_BASE_BYTES if full_bytes is None else full_bytes
    compact = vocab > 1 and tokens.numel() * vocab * 4 > limit
    rows = _batch_rows(model, tokens, batch_size)
    gen = torch.Generator().manual_seed(0)
    parts: list = []
    with torch.inference_mode():
        for start in range(0, tokens.shape[0], rows):
            logits = model_logits(model, tokens[start : start + rows])
            flat = logits.reshape(-1, logits.shape[-1])
            if not compact or logits.dim() < 3:
                for c in _position_chunks(flat):  # in place: no second tensor of the batch's size
                    flat[c] = torch.log_softmax(flat[c], dim=-1)
                parts.append(flat.reshape(logits.shape))  # (``flat`` is a copy where ``logits`` was not contiguous)
                continue
            chunk = [_compact(torch.log_softmax(flat[c], dim=-1), k, samples, gen) for c in _position_chunks(flat)]
            joined = CompactLogprobs.cat(chunk)
            shape = logits.shape[:2]
            parts.append(
                CompactLogprobs(
                    joined.top_lp.reshape(*shape, -1),
                    joined.top_idx.reshape(*shape, -1),
                    joined.rest.reshape(shape),
                    joined.sample_idx.reshape(*shape, -1),
                    joined.sample_lp.reshape(*shape, -1),
                    joined.vocab,
                )
            )
            del logits, flat
    return CompactLogprobs.cat(parts) if isinstance(parts[0], CompactLogprobs) else torch.cat(parts)


TOPK = 32  # tokens kept by the top-k KL


@dataclass(frozen=True)
class Fidelity:
    kl: float  # mean KL(base || compressed) in nats per position (an unbiased estimate from CompactLogprobs)
    top1_agreement: float  # fraction of positions where the argmax matches the base model
    topk_kl: float = math.nan  # KL on the base model's top-k tokens plus one bucket for the rest (<= kl)


def _bucket_kl(top_lp: torch.Tensor, top_lq: torch.Tensor) -> torch.Tensor:
    """Give KL per position on the given tokens plus one "any other" outcome (log-probs of both models)."""
    rest_p = torch.log1p(-top_lp.exp().sum(-1).clamp(max=1 - 1e-7))
    rest_q = torch.log1p(-top_lq.exp().sum(-1).clamp(max=1 - 1e-7))
    kl = (top_lp.exp() * (top_lp - top_lq)).sum(-1) + rest_p.exp() * (rest_p - rest_q)
    return kl.clamp(min=0.0)


def topk_kl(logp: torch.Tensor, logq: torch.Tensor, k: int = TOPK) -> torch.Tensor:
    """Give KL(base || compressed) per position on k+1 outcomes: the base model's top-k tokens and "any other".

    Coarsening both distributions the same way can only lower a KL divergence, so this never
    exceeds the full KL and equals it when k covers the vocabulary; it needs only the base
    model's top-k log-probabilities, not its full output.
    """
    k = min(k, logp.shape[-1])
    top_lp, idx = logp.topk(k, dim=-1)
    return _bucket_kl(top_lp, logq.gather(-1, idx))


def _kl_terms(logp: torch.Tensor | CompactLogprobs, logq: torch.Tensor, k: int) -> tuple[float, float, int]:
    """Give (sum of KL, sum of top-k KL, positions whose argmax agrees) for ``logq`` [P, V] and its base."""
    if isinstance(logp, torch.Tensor):
        kl = (logp.exp() * (logp - logq)).sum(-1)
        return (
            float(kl.double().sum()),
            float(topk_kl(logp, logq, k).double().sum()),
            int((logp.argmax(-1) == logq.argmax(-1)).sum()),
        )
    if k > logp.top_lp.shape[-1] and logp.top_lp.shape[-1] < logp.vocab:
        raise ValueError(f"top-{k} KL asked of base log-probabilities that keep the top {logp.top_lp.shape[-1]}")
    top_lq = logq.gather(-1, logp.top_idx.long())
    head = (logp.top_lp.exp() * (logp.top_lp - top_lq)).sum(-1)
    # the rest: sum over it of p (log p - log q) = rest * E[log p/q] under draws from p restricted to
    # it; estimated with the control variate r = q/p (E[r] = q_rest / rest, known exactly) as
    # rest * mean(r - 1 - log r) - (q_rest - rest), whose terms are >= 0 and small where q ~ p
    log_r = (logq.gather(-1, logp.sample_idx.long()) - logp.sample_lp).double()
    q_rest = (1.0 - top_lq.double().exp().sum(-1)).clamp(min=0.0)
    rest = logp.rest.double()
    tail = torch.where(rest > 0, rest * (log_r.exp() - 1.0 - log_r).mean(-1) - (q_rest - rest), 0.0)
    k = min(k, logp.top_lp.shape[-1])
    top = _bucket_kl(logp.top_lp[:, :k], top_lq[:, :k])
    agree = int((logp.top_idx[:, 0].long() == logq.argmax(-1)).sum())
    return float((head.double() + tail).sum()), float(top.double().sum()), agree


def kl_to_base(
    model: nn.Module,
    tokens: torch.Tensor,
    base_logprobs: torch.Tensor | CompactLogprobs,
    batch_size: int = 4,
    k: int = TOPK,
) -> Fidelity:
    """Give the mean KL divergence from the base model's output distribution, its top-k form, and top-1 agreement.

    ``base_logprobs`` comes from ``output_logprobs`` on the same ``tokens``; with ``CompactLogprobs``
    the KL is an unbiased estimate (see there), the top-k KL and agreement are exact.
    """
    kl_sum = 0.0
    topk_sum = 0.0
    agree = 0
    n = 0
    rows = _batch_rows(model, tokens, batch_size)
    with torch.inference_mode():
        for start in range(0, tokens.shape[0], rows):
            logits = model_logits(model, tokens[start : start + rows])
            base = base_logprobs[start : start + rows]
            if logits.dim() > 2:
                logits = logits.reshape(-1, logits.shape[-1])
                base = _flat(base)
            for c in _position_chunks(logits):
                logq = torch.log_softmax(logits[c], dim=-1)
                check_finite(logq, "logits")
                s_kl, s_top, s_agree = _kl_terms(base[c], logq, k)
                kl_sum += s_kl
                topk_sum += s_top
                agree += s_agree
                n += logq.shape[0]
    return Fidelity(kl=max(kl_sum / n, 0.0), top1_agreement=agree / n, topk_kl=topk_sum / n)


def _flat(base: torch.Tensor | CompactLogprobs) -> torch.Tensor | CompactLogprobs:
    """Give base log-probabilities [n, L, ...] with rows and positions merged ([n*L, ...])."""
    if isinstance(base, torch.Tensor):
        return base.reshape(-1, base.shape[-1])
    lead = base.top_lp.shape[0] * base.top_lp.shape[1]
    return CompactLogprobs(
        base.top_lp.reshape(lead, -1),
        base.top_idx.reshape(lead, -1),
        base.rest.reshape(lead),
        base.sample_idx.reshape(lead, -1),
        base.sample_lp.reshape(lead, -1),
        base.vocab,
    )


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
            parts.append(model_logits(model, tokens[start : start + batch_size]))
    out = torch.cat(parts)
    check_finite(out, "logits")
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
            logits = model_logits(model, row[None])[0, first : ctx - 1]
            target = row[first + 1 :]
            for c in _position_chunks(logits):  # float64 a few positions at a time (large vocabularies)
                logp = torch.log_softmax(logits[c].double(), dim=-1)
                check_finite(logp, "log-probabilities")
                nll -= float(logp.gather(1, target[c, None]).sum())
            count += target.numel()
    return math.exp(nll / count)
