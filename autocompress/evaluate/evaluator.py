"""The Evaluator: the two quality rungs used by the search (KL proxy, then the full metric)."""

from __future__ import annotations

from torch import nn

from autocompress.calib import TokenData
from autocompress.evaluate.metrics import Fidelity, Perplexity, kl_to_base, output_logprobs, perplexity


class Evaluator:
    """Scores compressed models against the base model on fixed held-out sequences.

    Rung 1 (``proxy``): KL to the base model's outputs on a few sequences — seconds per trial.
    Rung 2 (``full``): perplexity and bits per character on the evaluation split (causal LMs).
    Base outputs are computed once at construction.
    """

    def __init__(self, base_model: nn.Module, data: TokenData, task: str) -> None:
        self.data = data
        self.task = task
        self.base_logprobs = output_logprobs(base_model, data.proxy)
        self._base_full: Perplexity | None = None
        self._base_model = base_model

    def proxy(self, model: nn.Module) -> Fidelity:
        return kl_to_base(model, self.data.proxy, self.base_logprobs)

    def full(self, model: nn.Module) -> Perplexity | None:
        """Give perplexity on the evaluation split, or None for encoders (no LM head)."""
        if self.task != "causal-lm":
            return None
        return perplexity(model, self.data.eval, self.data.eval_chars)

    def base_full(self) -> Perplexity | None:
        if self._base_full is None:
            self._base_full = self.full(self._base_model)
        return self._base_full
