"""The ONNX decoder with a KV cache: it generates PyTorch's greedy tokens token by token, its cache
inputs and outputs have each kept block's shape (pruned heads, dropped blocks), and a quantized plan
(MatMulNBits linears, quantized embedding / head) computes our model's logits."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from autocompress.compress import apply_plan_to
from autocompress.errors import AutocompressError
from autocompress.export.onnx import export_onnx
from autocompress.export.onnx_graph import cache_names
from autocompress.export.verify import EXACT, GREEDY_TOKENS, TOLERANCE, check_onnx
from autocompress.hardware.measure import empty_cache, measure_decode, ort_generate, ort_session
from autocompress.model import load_model
from autocompress.plan import BlockChoice, LayerChoice
from tests.conftest import plan_for

PROMPT = np.array([[7, 100, 31, 250, 4, 66]], np.int64)


@pytest.fixture(scope="module")
def llama():
    return load_model("tiny-llama")


@pytest.fixture(scope="module")
def fp32_decoder(llama, tmp_path_factory):
    a = llama.anatomy
    path = tmp_path_factory.mktemp("kv") / "m.onnx"
    return export_onnx(llama.model, a, plan_for(a), path, quantize=False, kv_cache=True)


def test_decoder_generates_transformers_greedy_tokens(llama, fp32_decoder) -> None:
    gen = ort_generate(ort_session(fp32_decoder.path), PROMPT, GREEDY_TOKENS)
    with torch.no_grad():  # transformers' own generation loop and cache, an independent reference
        ref = llama.model.generate(
            torch.from_numpy(PROMPT), max_new_tokens=GREEDY_TOKENS, do_sample=False, pad_token_id=0
        )
    assert gen.tokens.shape == (1, GREEDY_TOKENS) and len(gen.step_ms) == GREEDY_TOKENS - 1
    assert np.array_equal(gen.tokens[0], ref[0, PROMPT.shape[1] :].numpy())
    check = check_onnx(fp32_decoder.path, llama.model, llama.anatomy, fp32_decoder.formats)
    assert check["passed"] and check["greedy"]["tokens_equal"] == GREEDY_TOKENS
    assert check["greedy"]["logits_error"] <= EXACT


def test_present_grows_the_past_by_the_new_tokens(llama, fp32_decoder) -> None:
    a = llama.anatomy
    sess = ort_session(fp32_decoder.path)
    past, present = cache_names(a.num_blocks)
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask", "position_ids", *past]
    assert [o.name for o in sess.get_outputs()] == ["logits", *present]
    heads, dim = a.blocks[0].num_kv_heads, llama.model.config.head_dim
    ids = np.array([[5, 9, 33, 2, 70], [1, 2, 3, 4, 5]], np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.tile(np.arange(5), (2, 1))}
    out = sess.run(None, {**feed, **empty_cache(sess, 2)})
    assert out[0].shape == (2, 1, a.vocab_size)
    assert all(t.shape == (2, heads, 5, dim) for t in out[1:])
    step = {"input_ids": ids[:, :1], "attention_mask": np.ones((2, 6), np.int64), "position_ids": np.full((2, 1), 5)}
    again = sess.run(None, {**step, **dict(zip(past, out[1:], strict=True))})
    assert all(t.shape == (2, heads, 6, dim) for t in again[1:])
    for old, new in zip(out[1:], again[1:], strict=True):
        np.testing.assert_array_equal(new[:, :, :5], old)  # the cache is extended, never rewritten
    with torch.no_grad():  # the cached step equals a forward over all six tokens
        full = llama.model(input_ids=torch.from_numpy(np.concatenate([ids, ids[:, :1]], 1))).logits[:, -1]
    np.testing.assert_allclose(again[0][:, -1], full.numpy(), atol=1e-4, rtol=0)


def test_quantized_plan_with_dropped_blocks_and_uneven_heads(llama, fp32_decoder, tmp_path) -> None:
    """Block 0 keeps 1 KV head, block 2 is dropped; the tied table is int4 in blocks of 128 (wider than
    the hidden size 64: the lookup reads padded rows and cuts them back)."""
    a = llama.anatomy
    first = a.blocks[0].linears[0].name
    plan = plan_for(
        a,
        default=LayerChoice(bits=4, group_size=32, symmetric=False),
        layers={first: LayerChoice(bits=8), "model.embed_tokens": LayerChoice(bits=4, group_size=128)},
        blocks={0: BlockChoice(keep_heads=2)},  # 4 heads over 2 KV groups -> 1 KV head left
        drop_blocks=(2,),
    )
    stored: dict = {}
    model = apply_plan_to(llama.model, a, plan, stored=stored)
    exp = export_onnx(model, a, plan, tmp_path / "q.onnx", kv_cache=True, stored=stored)
    dim = llama.model.config.head_dim
    assert exp.cache == ((1, dim), (2, dim), (2, dim))  # blocks 0, 1, 3 renumbered 0..2
    sess = ort_session(exp.path)
    declared = {i.name: i.shape for i in sess.get_inputs()}
    assert declared["past_key_values.0.key"][1:] == [1, "past", dim]
    assert declared["past_key_values.2.value"][1:] == [2, "past", dim]
    assert "past_key_values.3.key" not in declared

    proto = onnx.load(str(exp.path))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("MatMulNBits") == 3 * 7 + 1  # every kept linear and the tied head
    assert ops.count("GatherBlockQuantized") == 1 and "Gather" not in ops  # the lookup reads the codes
    table = (a.vocab_size, a.hidden_size)
    floats = [i for i in proto.graph.initializer if i.data_type == onnx.TensorProto.FLOAT]
    assert not any(tuple(i.dims) in (table, table[::-1]) for i in floats)  # no fp32 copy of the table left
    packed = [numpy_helper.to_array(i).nbytes for i in proto.graph.initializer if i.data_type == onnx.TensorProto.UINT8]
    assert len([n for n in packed if n >= a.vocab_size * a.hidden_size // 2]) == 1  # the tied codes, stored once
    assert exp.size_mb < fp32_decoder.size_mb / 2  # a block fewer; 4-bit codes and their scales

    check = check_onnx(exp.path, model, a, exp.formats)
    assert check["passed"], check
    assert check["stored_weights_error"] <= EXACT  # the plan's codes, fp32 compute
    assert check["relative_l2_error"] <= TOLERANCE["int4"]  # as deployed (int8 activations)
    assert check["greedy"]["tokens_equal"] == GREEDY_TOKENS and check["greedy"]["logits_error"] <= EXACT

    other = apply_plan_to(llama.model, a, plan_for(a, drop_blocks=(2,)))  # same shapes, unquantized weights
    bad = check_onnx(exp.path, other, a, exp.formats)
    assert not bad["passed"] and bad["greedy"]["logits_error"] > EXACT


def test_decode_measurement_runs_a_cached_step_at_the_context(fp32_decoder) -> None:
    m = measure_decode(fp32_decoder.path, context=24, repeats=3, warmup=1, prefill_repeats=2)
    d = m.to_dict()
    assert d["context_tokens"] == 24 and d["prefill"]["seq_len"] == 24 and d["decode"]["seq_len"] == 1
    assert d["decode"]["repeats"] >= 3 and d["prefill"]["repeats"] >= 2


def test_refuses_a_cache_for_an_encoder_and_a_graph_without_one(tmp_path) -> None:
    bert = load_model("tiny-bert")
    with pytest.raises(AutocompressError, match="KV cache needs a causal LM"):
        export_onnx(bert.model, bert.anatomy, plan_for(bert.anatomy), tmp_path / "b.onnx", kv_cache=True)
    ids = onnx.helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, ["batch", "seq"])
    out = onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.INT64, ["batch", "seq"])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["input_ids"], ["logits"])], "g", [ids], [out])
    plain = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    with pytest.raises(ValueError, match="KV cache"):
        measure_decode(plain.SerializeToString(), context=4)


def test_untied_embedding_and_head_keep_their_own_formats(tmp_path) -> None:
    mistral = load_model("tiny-mistral")  # untied table and head, sliding-window attention
    a = mistral.anatomy
    tables = {"model.embed_tokens": LayerChoice(bits=8, group_size=32, symmetric=False)}
    tables["lm_head"] = LayerChoice(bits=4, group_size=16)
    plan = plan_for(a, default=LayerChoice(bits=4, group_size=32), layers=tables)
    stored: dict = {}
    model = apply_plan_to(mistral.model, a, plan, stored=stored)
    exp = export_onnx(model, a, plan, tmp_path / "m.onnx", kv_cache=True, stored=stored)
    assert exp.formats["model.embed_tokens"] == "int8-g32-asym" and exp.formats["lm_head"] == "int4-g16-sym"
    proto = onnx.load(str(exp.path))
    nodes = {n.op_type: n for n in proto.graph.node}
    assert [n.op_type for n in proto.graph.node].count("MatMulNBits") == a.num_blocks * 7 + 1
    lookup = {x.name: x.i for x in nodes["GatherBlockQuantized"].attribute}
    assert lookup["bits"] == 8 and lookup["block_size"] == 32  # the embedding's own format, not the head's
    floats = [i for i in proto.graph.initializer if i.data_type == onnx.TensorProto.FLOAT]
    assert not any(a.vocab_size in i.dims and a.hidden_size in i.dims for i in floats)
    check = check_onnx(exp.path, model, a, exp.formats)
    assert check["passed"] and check["stored_weights_error"] <= EXACT, check
    assert check["greedy"]["tokens_equal"] == GREEDY_TOKENS
