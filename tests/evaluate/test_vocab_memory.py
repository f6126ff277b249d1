"""Large vocabularies stay within memory: the base model's log-probs for the KL proxy are kept as
top-k plus draws from the rest (``CompactLogprobs``) when the full tensor would be large, logits
are computed a few rows and positions at a time, and the KL agrees with the exact one."""

from __future__ import annotations

import copy

import pytest
import torch

from autocompress.calib import load_token_data
from autocompress.evaluate import Evaluator, kl_to_base, output_logprobs, perplexity
from autocompress.evaluate import metrics as M
from tests.conftest import TINY_DATA


def _perturbed(model, scale=0.05, seed=1):
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return other


@pytest.fixture
def llama_pair(tiny_llama):
    data = load_token_data(tiny_llama.tokenizer, TINY_DATA)
    return tiny_llama.model, _perturbed(tiny_llama.model), data.proxy


def test_compact_base_covering_the_vocabulary_gives_the_exact_kl(llama_pair):
    base_model, other, tokens = llama_pair
    vocab = base_model.config.vocab_size
    exact = kl_to_base(other, tokens, output_logprobs(base_model, tokens))
    compact = output_logprobs(base_model, tokens, full_bytes=0, k=vocab)
    assert isinstance(compact, M.CompactLogprobs) and float(compact.rest.max()) < 1e-5
    got = kl_to_base(other, tokens, compact)
    assert got.kl == pytest.approx(exact.kl, rel=1e-4)
    assert got.topk_kl == pytest.approx(exact.topk_kl, rel=1e-5)
    assert got.top1_agreement == exact.top1_agreement


@pytest.mark.parametrize("k", [32, 128])
def test_compact_kl_estimate_agrees_with_the_exact_kl(llama_pair, k):
    """Random-init outputs are nearly flat, so most of the mass is outside the top-k: the drawn rest carries the KL."""
    base_model, other, tokens = llama_pair
    exact = kl_to_base(other, tokens, output_logprobs(base_model, tokens))
    compact = output_logprobs(base_model, tokens, full_bytes=0, k=k)
    assert float(compact.rest.mean()) > 0.2  # the estimate is not the top-k alone
    got = kl_to_base(other, tokens, compact)
    assert exact.kl > 1e-3
    assert got.kl == pytest.approx(exact.kl, rel=0.05)
    assert got.topk_kl == pytest.approx(exact.topk_kl, rel=1e-5)  # exact: the stored top-k covers the top-32
    assert got.top1_agreement == exact.top1_agreement
    assert kl_to_base(base_model, tokens, compact).kl == pytest.approx(0.0, abs=1e-6)


def test_top_k_kl_wider_than_the_stored_top_k_is_refused(llama_pair):
    base_model, other, tokens = llama_pair
    with pytest.raises(ValueError, match="top-32 KL"):
        kl_to_base(other, tokens, output_logprobs(base_model, tokens, full_bytes=0, k=8))


def _llama(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def test_stored_base_does_not_grow_with_the_vocabulary():
    tokens = torch.randint(0, 300, (3, 16), generator=torch.Generator().manual_seed(0))
    sizes = {}
    for vocab in (300, 8000):
        model = _llama(vocab)
        assert isinstance(output_logprobs(model, tokens), torch.Tensor)  # small: kept whole
        base = output_logprobs(model, tokens, full_bytes=tokens.numel() * vocab * 4 - 1)
        assert isinstance(base, M.CompactLogprobs) and base.shape == (3, 16, vocab)
        sizes[vocab] = base.nbytes
    per_token = M.BASE_TOPK * 8 + M.REST_SAMPLES * 8 + 4  # (log-prob, index) per kept token + the rest's mass
    assert sizes[300] == sizes[8000] <= tokens.numel() * per_token


def test_logits_are_computed_within_the_budget_and_give_the_same_results(tiny_llama, monkeypatch):
    data = load_token_data(tiny_llama.tokenizer, TINY_DATA)
    other = _perturbed(tiny_llama.model)
    ev = Evaluator(tiny_llama.model, data, "causal-lm")
    want = ev.proxy(other), ev.full(other)

    vocab, seq = tiny_llama.model.config.vocab_size, data.proxy.shape[1]
    budget, chunk = seq * vocab, 7 * vocab  # one row per forward, 7 positions per step
    monkeypatch.setattr(M, "LOGIT_BUDGET", budget)
    monkeypatch.setattr(M, "POSITION_CHUNK", chunk)
    seen, steps = [], []
    logits, log_softmax = M.model_logits, torch.log_softmax
    monkeypatch.setattr(M, "model_logits", lambda m, ids: seen.append(logits(m, ids).numel()) or logits(m, ids))
    monkeypatch.setattr(torch, "log_softmax", lambda x, dim: steps.append(x.numel()) or log_softmax(x, dim=dim))
    ev2 = Evaluator(tiny_llama.model, data, "causal-lm")
    got = ev2.proxy(other), ev2.full(other)
    assert seen and max(seen) <= budget
    assert steps and max(steps) <= chunk
    assert got[0].kl == pytest.approx(want[0].kl, rel=1e-5)
    assert got[0].topk_kl == pytest.approx(want[0].topk_kl, rel=1e-5)
    assert got[0].top1_agreement == want[0].top1_agreement
    assert got[1].ppl == pytest.approx(want[1].ppl, rel=1e-6)
    assert perplexity(other, data.eval, data.eval_chars).ppl == pytest.approx(want[1].ppl, rel=1e-6)


def test_proxy_rows_of_a_compact_base_add_up_to_the_whole(llama_pair):
    """The search scores the first proxy sequence, then the rest: slices of a compact base must line up."""
    base_model, other, tokens = llama_pair
    compact = output_logprobs(base_model, tokens, full_bytes=0)
    whole = kl_to_base(other, tokens, compact)
    first = kl_to_base(other, tokens[:1], compact[:1])
    rest = kl_to_base(other, tokens[1:], compact[1:])
    n = tokens.shape[0]
    assert (first.kl + rest.kl * (n - 1)) / n == pytest.approx(whole.kl, rel=1e-6)


def test_chunked_perplexity_in_position_chunks_matches_cross_entropy(tiny_llama, monkeypatch):
    model, vocab, ctx = tiny_llama.model, tiny_llama.model.config.vocab_size, 32
    ids = torch.randint(3, vocab, (3 * ctx + 5,), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(M, "POSITION_CHUNK", 5 * vocab)  # 5 positions at a time
    got = M.chunked_perplexity(model, ids, ctx)
    chunks = ids[: 3 * ctx].reshape(3, ctx)
    with torch.no_grad():
        logits = model(input_ids=chunks).logits[:, ctx // 2 : ctx - 1].double()
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), chunks[:, ctx // 2 + 1 :].reshape(-1))
    assert got == pytest.approx(float(ce.exp()), rel=1e-6)


class _Transposed(torch.nn.Module):
    """Gives logits that are a non-contiguous view (as a model computing [vocab, ...] and permuting would)."""

    config = type("Config", (), {"vocab_size": 7})()

    def get_output_embeddings(self):
        return self

    def forward(self, input_ids):
        x = torch.randn(7, *input_ids.shape, generator=torch.Generator().manual_seed(0)).permute(1, 2, 0)
        return type("Out", (), {"logits": x})()


def test_base_logprobs_are_normalised_for_non_contiguous_logits():
    lp = output_logprobs(_Transposed(), torch.zeros(2, 3, dtype=torch.long))
    assert isinstance(lp, torch.Tensor) and lp.shape == (2, 3, 7)
    assert torch.allclose(lp.exp().sum(-1), torch.ones(2, 3), atol=1e-6)
