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
