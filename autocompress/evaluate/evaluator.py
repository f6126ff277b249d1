"""The Evaluator: the two quality rungs used by the search (KL proxy, then the full metric)."""

from __future__ import annotations

import torch
from torch import nn

from autocompress.calib import TokenData
from autocompress.evaluate.metrics import (
    Classification,
    Fidelity,
    Perplexity,
    class_logits,
    classification_metrics,
    kl_to_base,
    output_logprobs,
    perplexity,
)

ENCODER_BATCH = 16  # rows are whole articles (short): larger batches than for LM sequences


class Evaluator:
    """Scores compressed models against the base model on fixed held-out sequences.

    Rung 1 (``proxy``): KL to the base model's outputs on a few sequences — seconds per trial; for
    a classifier, KL between the base and compressed class distributions on the proxy articles.
    Rung 2 (``full``): perplexity and bits per character on the evaluation split (causal LMs);
    accuracy, macro-F1, ECE and top-1 agreement with the base model on the labelled evaluation
    articles (classifiers, data with ``eval_labels``). Base outputs are computed once (kept whole,
    or as top-k plus draws from the rest where a large vocabulary makes them large: ``CompactLogprobs``).
    """

    def __init__(self, base_model: nn.Module, data: TokenData, task: str) -> None:
        self.data = data
        self.task = task
        self.batch_size = ENCODER_BATCH if task == "encoder" else 4
        self.base_logprobs = output_logprobs(base_model, data.proxy, self.batch_size)
        self._base_full: Perplexity | Classification | None = None
        self._base_pred: torch.Tensor | None = None
        self._base_model = base_model

    @property
    def full_metric(self) -> str | None:
        """Give what ``full`` measures ("perplexity", "accuracy"), or None when it has nothing to measure."""
        if self.task == "causal-lm":
            return "perplexity"
        return "accuracy" if getattr(self.data, "eval_labels", None) is not None else None

    def proxy(self, model: nn.Module, rows: slice = slice(None)) -> Fidelity:
        """Give KL to the base model on the proxy sequences (``rows`` selects a subset of them)."""
        return kl_to_base(model, self.data.proxy[rows], self.base_logprobs[rows], self.batch_size)

    @property
    def proxy_rows(self) -> int:
        return int(self.data.proxy.shape[0])

    def full(self, model: nn.Module) -> Perplexity | Classification | None:
        """Give perplexity (causal LMs) or classification metrics (labelled encoder data), else None."""
        what = self.full_metric
        if what == "perplexity":
            return perplexity(model, self.data.eval, self.data.eval_chars)
        if what is None:
            return None
        logits = class_logits(model, self.data.eval, self.batch_size)
        if self._base_pred is None:
            same = model is self._base_model
            self._base_pred = (
                logits if same else class_logits(self._base_model, self.data.eval, self.batch_size)
            ).argmax(-1)
        return classification_metrics(logits, self.data.eval_labels, self._base_pred)

    def base_full(self) -> Perplexity | Classification | None:
        if self._base_full is None:
            self._base_full = self.full(self._base_model)
        return self._base_full
