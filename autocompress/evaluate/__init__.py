"""Quality evaluation: full metrics, the KL proxy, and the Evaluator that the search calls."""

from autocompress.evaluate.evaluator import Evaluator
from autocompress.evaluate.metrics import (
    CompactLogprobs,
    EvaluationError,
    Fidelity,
    Perplexity,
    kl_to_base,
    output_logprobs,
    perplexity,
)

__all__ = [
    "CompactLogprobs",
    "EvaluationError",
    "Evaluator",
    "Fidelity",
    "Perplexity",
    "kl_to_base",
    "output_logprobs",
    "perplexity",
]
