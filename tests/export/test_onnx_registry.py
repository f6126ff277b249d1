"""The ONNX export writes MatMulNBits from the format registry: given the tensors as their format
stores them, each linear's codes and scales are the registry's, so the file computes exactly the
plan's weights; without them (or when the weights changed since) the grid is read off the weights."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from autocompress import formats
from autocompress.compress import apply_plan_to
from autocompress.export.onnx import export_onnx, target_format
from autocompress.model import load_model
from autocompress.plan import LayerChoice
from tests.conftest import plan_for


@pytest.fixture(scope="module")
def llama():
    return load_model("tiny-llama")


def _nbits(path) -> dict[str, tuple[dict, np.ndarray, np.ndarray, np.ndarray | None]]:
    """Give MatMul node name -> (attributes, codes [N, blocks, blob], scales [N, blocks], zero points or None)."""
    m = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    out = {}
    for node in m.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in node.attribute}
            zero = inits[node.input[3]] if len(node.input) > 3 and node.input[3] else None
            scales = inits[node.input[2]].reshape(attrs["N"], -1)
            out[node.name] = (attrs, inits[node.input[1]], scales, zero)
    return out


def _weight(attrs, codes, scales, zero) -> np.ndarray:
    """Give the [N, K] float32 weight MatMulNBits computes: (code - zero) · scale per block."""
    n, k, bs, bits = attrs["N"], attrs["K"], attrs["block_size"], attrs["bits"]
    unpack = (lambda a: a) if bits == 8 else (lambda a: np.stack([a & 15, a >> 4], axis=-1))
    c = unpack(codes).reshape(n, -1, bs).astype(np.float32)
    kb = c.shape[1]
    z = np.full((n, kb, 1), 2.0 ** (bits - 1), np.float32)
    if zero is not None:
        z = unpack(zero.reshape(n, -1)).reshape(n, -1)[:, :kb, None].astype(np.float32)
    return ((c - z) * scales[:, :, None]).reshape(n, -1)[:, :k]


def _site_of(node: str, a) -> str:
    path = node.strip("/").rsplit("/", 1)[0].replace("/", ".").removeprefix("model.")
    return next(s.name for s in a.linears if s.name == path)


CHOICES = [
    LayerChoice(format="int4-g32-sym"),
    LayerChoice(format="int3-g48-asym"),
    LayerChoice(format="int8-ch-sym"),
    LayerChoice(format="int4-g128-asym", sparsity=0.5, prune_method="magnitude"),
]


@pytest.mark.parametrize("choice", CHOICES, ids=lambda c: c.format + ("-pruned" if c.sparsity else ""))
def test_matmulnbits_holds_the_registry_codes_and_scales(llama, tmp_path, choice) -> None:
    a = llama.anatomy
    plan = plan_for(a, default=choice)
    stored: dict = {}
    model = apply_plan_to(llama.model, a, plan, stored=stored)
    assert set(stored) == {s.name for s in a.linears}
    nodes = _nbits(export_onnx(model, a, plan, tmp_path / "m.onnx", stored=stored).path)
    assert len(nodes) == len(a.linears)
    for node, (attrs, codes, scales, zero) in nodes.items():
        site = _site_of(node, a)
        q = stored[site]
        fmt = formats.get(q.format)
        group = q.shape[1] if fmt.group_size is None else min(fmt.group_size, q.shape[1])
        of_block = np.arange(scales.shape[1]) * attrs["block_size"] // group
        assert np.array_equal(scales, q.params["scale"].numpy()[:, of_block])  # the registry's, bit for bit
        want = model.get_submodule(site).weight.detach().numpy()
        assert np.array_equal(_weight(attrs, codes, scales, zero), want)


def test_same_codes_as_reading_the_grid_off_the_weights(llama, tmp_path) -> None:
    """On weights the grid recovery reads exactly, both routes store the same codes and zero points."""
    a = llama.anatomy
    plan = plan_for(a, default=LayerChoice(format="int4-g32-asym"))
    stored: dict = {}
    model = apply_plan_to(llama.model, a, plan, stored=stored)
    via_registry = _nbits(export_onnx(model, a, plan, tmp_path / "r.onnx", stored=stored).path)
    via_weights = _nbits(export_onnx(model, a, plan, tmp_path / "w.onnx").path)
    assert via_registry.keys() == via_weights.keys()
    for node, (_, codes, scales, zero) in via_registry.items():
        _, codes_w, scales_w, zero_w = via_weights[node]
        assert np.array_equal(codes, codes_w) and np.array_equal(zero, zero_w)
        np.testing.assert_allclose(scales, scales_w, rtol=1e-6)


def test_weights_changed_after_apply_are_read_off_the_weights(llama, tmp_path) -> None:
    a = llama.anatomy
    plan = plan_for(a, default=LayerChoice(format="int4-g32-sym"))
    stored: dict = {}
    model = apply_plan_to(llama.model, a, plan, stored=stored)
    site = a.linears[0].name
    with torch.no_grad():
        model.get_submodule(site).weight.mul_(2.0)  # still on a grid, no longer the stored tensor's values
    nodes = _nbits(export_onnx(model, a, plan, tmp_path / "m.onnx", stored=stored).path)
    node = next(n for n in nodes if _site_of(n, a) == site)
    want = model.get_submodule(site).weight.detach().numpy()
    np.testing.assert_allclose(_weight(*nodes[node]), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["Q4_K", "Q4_0", "IQ4_NL", "q4f16_1"])
def test_formats_without_a_matmulnbits_grid_are_reported(name) -> None:
    _, lost = target_format(LayerChoice(format=name))
    assert any(name in note and "not a generic integer grid" in note for note in lost)
    _, lost = target_format(LayerChoice(format="int4-g32-asym"))
    assert not any("generic" in note for note in lost)
