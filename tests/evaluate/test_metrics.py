from __future__ import annotations

import copy
import math

import pytest
import torch

from autocompress.calib import load_token_data
from autocompress.evaluate import EvaluationError, Evaluator, kl_to_base, output_logprobs, perplexity
from tests.conftest import TINY_DATA


def test_kl_is_zero_for_the_base_and_positive_for_a_perturbed_model(tiny_llama):
    data = load_token_data(tiny_llama.tokenizer, TINY_DATA)
    ev = Evaluator(tiny_llama.model, data, "causal-lm")
    same = ev.proxy(tiny_llama.model)
    assert same.kl == pytest.approx(0.0, abs=1e-6) and same.top1_agreement == 1.0
    other = copy.deepcopy(tiny_llama.model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    worse = ev.proxy(other)
    assert worse.kl > 1e-4 and worse.top1_agreement < 1.0


def test_perplexity_matches_cross_entropy(tiny_llama):
    data = load_token_data(tiny_llama.tokenizer, TINY_DATA)
    res = perplexity(tiny_llama.model, data.eval, data.eval_chars)
    logits = tiny_llama.model(input_ids=data.eval).logits
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), data.eval[:, 1:].reshape(-1))
    assert res.ppl == pytest.approx(math.exp(float(ce)), rel=1e-4)
    assert res.tokens == data.eval.shape[0] * (data.eval.shape[1] - 1)
    assert res.bpc == pytest.approx(float(ce) * res.tokens / math.log(2) / data.eval_chars, rel=1e-4)


def test_non_finite_outputs_raise(tiny_llama):
    data = load_token_data(tiny_llama.tokenizer, TINY_DATA)
    base = output_logprobs(tiny_llama.model, data.proxy)
    broken = copy.deepcopy(tiny_llama.model)
    with torch.no_grad():
        broken.model.layers[0].mlp.down_proj.weight.fill_(float("nan"))
    with pytest.raises(EvaluationError, match="NaN"):
        kl_to_base(broken, data.proxy, base)


def test_encoder_has_kl_but_no_perplexity():
    from autocompress.model import load_model

    lm = load_model("tiny-bert")
    data = load_token_data(lm.tokenizer, TINY_DATA)
    ev = Evaluator(lm.model, data, "encoder")
    assert ev.base_logprobs.shape == (data.proxy.shape[0], 4)
    assert ev.proxy(lm.model).kl == pytest.approx(0.0, abs=1e-6)
    assert ev.full(lm.model) is None


class _Uniform(torch.nn.Module):
    """Gives equal logits for every token of a vocabulary of ``vocab`` entries."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids):
        from types import SimpleNamespace

        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab))


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    tokens = torch.randint(0, 97, (3, 17))
    res = perplexity(_Uniform(97), tokens, chars=100)
    assert res.ppl == pytest.approx(97.0, rel=1e-6)  # log-softmax in fp32
    assert res.bpc == pytest.approx(3 * 16 * math.log2(97) / 100, rel=1e-6)


def _probs(conf: list[float], classes: int = 4) -> torch.Tensor:
    """Rows whose top class is 0 with probability ``conf``, the rest spread evenly."""
    rows = [[c] + [(1 - c) / (classes - 1)] * (classes - 1) for c in conf]
    return torch.tensor(rows, dtype=torch.float64)


def test_ece_is_zero_when_confidence_equals_accuracy_in_every_bin():
    from autocompress.evaluate.metrics import expected_calibration_error

    probs = _probs([0.75] * 4 + [0.5] * 2)
    labels = torch.tensor([0, 0, 0, 1, 0, 2])  # 3 of 4 right at 0.75, 1 of 2 right at 0.5
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-12)


def test_ece_of_a_miscalibrated_toy_matches_the_hand_computed_value():
    from autocompress.evaluate.metrics import expected_calibration_error

    probs = _probs([0.9, 0.9, 0.6, 0.6])
    labels = torch.tensor([1, 2, 0, 0])  # overconfident: wrong at 0.9; underconfident: right at 0.6
    # bins: half the rows |0 - 0.9|, half |1 - 0.6|
    assert expected_calibration_error(probs, labels) == pytest.approx(0.5 * 0.9 + 0.5 * 0.4)
    # one bin holding everything: |accuracy 0.5 - mean confidence 0.75|
    assert expected_calibration_error(probs, labels, n_bins=1) == pytest.approx(0.25)


def test_accuracy_macro_f1_and_agreement_on_a_hand_computable_toy():
    from autocompress.evaluate.metrics import classification_metrics

    labels = torch.tensor([0, 0, 1, 1, 2])
    pred = torch.tensor([0, 1, 1, 1, 2])
    logits = torch.nn.functional.one_hot(pred, 3).double() * 5.0
    res = classification_metrics(logits, labels, base_pred=torch.tensor([0, 1, 1, 2, 2]))
    assert res.accuracy == pytest.approx(0.8)
    # per-class F1: class 0 P=1 R=1/2 -> 2/3; class 1 P=2/3 R=1 -> 4/5; class 2 -> 1
    assert res.macro_f1 == pytest.approx((2 / 3 + 4 / 5 + 1) / 3)
    assert res.top1_agreement == pytest.approx(0.8) and res.n == 5
    conf = torch.softmax(torch.tensor([5.0, 0.0, 0.0]), 0)[0].item()
    assert res.ece == pytest.approx(abs(0.8 - conf))  # every row in the top bin
