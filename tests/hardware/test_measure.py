"""Real measurement and the ONNX export it runs on: formats match the plan, outputs match torch."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from autocompress.calibration.onnx import _quantized, chain_model
from autocompress.compress.apply import apply_plan_to
from autocompress.export.onnx import export_onnx, target_format
from autocompress.hardware import measure
from autocompress.hardware.calibrate import FORMATS, Sample, _fit_bandwidth
from autocompress.hardware.measure import ort_session, timed
from autocompress.model import load_model
from autocompress.plan import BlockChoice, LayerChoice, ModelRef, Plan


@pytest.fixture(scope="module")
def llama():
    return load_model("tiny-llama")


def _plan(a, **kw) -> Plan:
    return Plan(model=ModelRef.of(a), **kw)


def _ops(path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def test_fp32_export_matches_torch_last_logits(llama, tmp_path) -> None:
    a = llama.anatomy
    exp = export_onnx(llama.model, a, _plan(a), tmp_path / "m.onnx", quantize=False)
    ids = np.array([[5, 9, 33, 2, 70, 11]], np.int64)
    (ort_logits,) = ort_session(exp.path).run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    with torch.no_grad():
        ref = llama.model(input_ids=torch.from_numpy(ids)).logits[:, -1:].numpy()
    assert ort_logits.shape == ref.shape  # last position only, as the cost model prices prefill
    assert np.abs(ort_logits - ref).max() < 1e-4
    for seq in (1, 17):  # dynamic sequence axis, batch 2
        ids2 = np.ones((2, seq), np.int64)
        (out,) = ort_session(exp.path).run(None, {"input_ids": ids2, "attention_mask": ids2})
        assert out.shape == (2, 1, a.vocab_size)


def test_quantized_export_follows_the_plan(llama, tmp_path) -> None:
    a = llama.anatomy
    b1 = [s.name for s in a.blocks[1].linears]
    layers = {b1[0]: LayerChoice(bits=8, act_bits=8), b1[1]: LayerChoice(bits=4, group_size=32, symmetric=False)}
    layers[b1[2]] = LayerChoice(bits=8)  # weight-only 8-bit
    layers[b1[-1]] = LayerChoice(bits=3, group_size=32, rank_ratio=0.5, sparsity=0.3, prune_method="magnitude")
    plan = _plan(a, layers=layers, drop_blocks=(0,), blocks={2: BlockChoice(keep_heads=2)})
    exp = export_onnx(apply_plan_to(llama.model, a, plan), a, plan, tmp_path / "q.onnx")
    ops = _ops(exp.path)
    assert ops.count("MatMulInteger") == 1  # the W8A8 layer only
    assert ops.count("MatMulNBits") == 4  # int4, weight-only int8, both low-rank factors of the 3-bit layer
    assert exp.formats[b1[0]] == "int8-dynamic" and exp.formats[b1[1]] == "int4-g32-asym"
    assert exp.formats[b1[2]] == "int8-row-sym"
    assert a.blocks[0].linears[0].name not in exp.formats  # dropped block
    text = " ".join(exp.not_represented)
    assert "3-bit stored as 4-bit" in text and "stored dense" in text
    ids = np.ones((1, 4), np.int64)
    (out,) = ort_session(exp.path).run(None, {"input_ids": ids, "attention_mask": ids})
    assert np.isfinite(out).all()


@pytest.mark.parametrize(
    ("choice", "fmt", "lost"),
    [
        (LayerChoice(), "fp32", None),
        (LayerChoice(bits=8), "int8-row-sym", None),
        (LayerChoice(bits=6), "int8-row-sym", "6-bit stored as 8-bit"),
        (LayerChoice(bits=8, group_size=32, symmetric=False), "int8-g32-asym", None),
        (LayerChoice(bits=8, act_bits=8), "int8-dynamic", "activations also rounded"),
        (LayerChoice(bits=4, group_size=128), "int4-g128-sym", None),
        (LayerChoice(bits=4, group_size=100, symmetric=False), "int4-g128-asym", "group size 100 stored as 128"),
        (LayerChoice(bits=2), "int4-row-sym", "2-bit stored as 4-bit"),
    ],
)
def test_target_format_never_claims_a_finer_format(choice: LayerChoice, fmt: str, lost: str | None) -> None:
    """Each choice maps to its format, and whatever the format cannot hold exactly is named, never hidden."""
    got, notes = target_format(choice)
    assert got == fmt
    if lost is None:
        assert notes == []
    else:
        assert len(notes) == 1 and lost in notes[0]


def test_measure_onnx_and_torch(llama, tmp_path) -> None:
    a = llama.anatomy
    exp = export_onnx(llama.model, a, _plan(a), tmp_path / "m.onnx", quantize=False)
    m1 = measure(exp.path, seq_len=1, threads=1, repeats=5)
    m64 = measure(exp.path, seq_len=64, threads=1, repeats=5)
    mine = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        t = measure(llama.model, seq_len=8, threads=1, repeats=3)
        assert torch.get_num_threads() == 3  # measuring on one thread leaves the caller's setting as it was
    finally:
        torch.set_num_threads(mine)
    assert m1.runtime == "onnxruntime" and t.runtime == "torch"
    assert m1.repeats >= 5 and m1.threads == 1 and m1.seq_len == 1
    assert 0 < m1.p10_ms <= m1.median_ms <= m1.p90_ms
    assert m64.median_ms > m1.median_ms  # 64 tokens cost more than one
    assert t.threads == 1 and t.seq_len == 8 and 0 < t.p10_ms <= t.median_ms <= t.p90_ms


def test_timed_honours_warmup_and_repeats() -> None:
    calls = []
    times = timed(lambda: calls.append(1), warmup=4, repeats=7)
    assert len(times) == 7 and len(calls) == 11


def test_bandwidth_fit_recovers_overhead_and_slope() -> None:
    call, over, slope = 0.004, 0.02, 1e-7  # ms per run, ms per linear, ms per byte (10 GB/s)
    shapes = ((4, 1e5), (32, 4e5), (8, 3e7), (6, 9e7), (18, 6e7))
    samples = [Sample("fp32", 1, n, b, 0.0, call + n * over + b * slope) for n, b in shapes]
    assert _fit_bandwidth(samples) == pytest.approx((call, over, slope), rel=1e-6)


@pytest.mark.parametrize("fmt", FORMATS)
def test_calibration_chains_run_in_every_format(fmt: str, tmp_path) -> None:
    proto = _quantized(chain_model(128, 256, 2), fmt, tmp_path)
    sess = ort_session(proto.SerializeToString())
    (y,) = sess.run(None, {"x": np.ones((3, 128), np.float32)})
    assert y.shape == (3, 128) and np.isfinite(y).all()
    ops = {n.op_type for n in proto.graph.node}
    assert {"fp32": "MatMul", "int8": "MatMulNBits", "int4": "MatMulNBits", "w8a8": "MatMulInteger"}[fmt] in ops
