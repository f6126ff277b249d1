"""HF and ONNX exports: plain transformers loads what a config can describe, our loader the rest,
and 4-bit ONNX weights keep the plan's exact values."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from autocompress.compress import apply_plan_to, collect_hessians
from autocompress.compress.hessian import Hessians, input_key
from autocompress.export import export_hf, load_compressed
from autocompress.export.onnx import export_onnx, grid_codes
from autocompress.export.verify import TOLERANCE, check_onnx, runtime_rounding
from autocompress.model import load_model
from autocompress.plan import BlockChoice, LayerChoice
from tests.conftest import as_stored, plan_for

IDS = torch.tensor([[1, 5, 6, 7, 8, 30, 2]])


@pytest.fixture(scope="module")
def llama():
    return load_model("tiny-llama")


@pytest.fixture(scope="module")
def gpt2():
    return load_model("tiny-gpt2")


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _uniform(a, **kw) -> dict[int, BlockChoice]:
    return {i: BlockChoice(**kw) for i in range(a.num_blocks)}


@pytest.mark.parametrize(
    ("kind", "config_field", "value"),
    [
        ("quant+sparsity+drop", "num_hidden_layers", 3),
        ("uniform mlp", "intermediate_size", 64),
        ("uniform heads", "num_attention_heads", 2),
    ],
)
def test_plain_transformers_loads_what_a_config_describes(llama, tmp_path, kind, config_field, value) -> None:
    from transformers import AutoModelForCausalLM

    a = llama.anatomy
    plans = {
        "quant+sparsity+drop": plan_for(
            a, default=LayerChoice(bits=4, group_size=32, sparsity=0.3, prune_method="magnitude"), drop_blocks=(2,)
        ),
        "uniform mlp": plan_for(a, blocks=_uniform(a, keep_mlp_channels=64), default=LayerChoice(bits=8)),
        "uniform heads": plan_for(a, blocks=_uniform(a, keep_heads=2), drop_blocks=(0,)),
    }
    plan = plans[kind]
    model = apply_plan_to(llama.model, a, plan)
    export_hf(model, plan, tmp_path / "hf", llama.tokenizer)
    info = json.loads((tmp_path / "hf" / "autocompress.json").read_text())
    assert info["loadable_with_plain_transformers"] and not info["not_loadable_because"]
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg[config_field] == value
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert plain.dtype == torch.bfloat16  # the base dtype, never fp32
    want = as_stored(model).state_dict()
    got = plain.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k].float(), want[k]) for k in want)  # exactly the plan's weights, in bf16
    torch.testing.assert_close(_logits(plain.float()), _logits(as_stored(model)), rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_load_compressed_rebuilds_what_no_config_can_say(llama, gpt2, tmp_path, arch) -> None:
    from transformers import AutoModelForCausalLM

    lm = {"llama": llama, "gpt2": gpt2}[arch]
    a = lm.anatomy
    first = a.blocks[0].linears[0].name
    plan = plan_for(
        a,
        default=LayerChoice(bits=8, rank_ratio=0.5),
        layers={first: LayerChoice(bits=4, group_size=16, act_bits=8)},
        blocks={0: BlockChoice(keep_heads=2, keep_mlp_channels=40), 2: BlockChoice(keep_mlp_channels=24)},
        drop_blocks=(1,),
    )
    model = apply_plan_to(lm.model, a, plan)
    export_hf(model, plan, tmp_path / "hf", lm.tokenizer)
    info = json.loads((tmp_path / "hf" / "autocompress.json").read_text())
    assert not info["loadable_with_plain_transformers"]
    assert "low-rank (rank_ratio)" in info["not_loadable_because"]
    assert info["load_with"] == "autocompress.export.load_compressed(dir)"
    back = load_compressed(tmp_path / "hf")
    torch.testing.assert_close(_logits(back), _logits(as_stored(model)), rtol=0, atol=0)
    with pytest.raises(Exception, match="(?i)size|shape|mismatch|unexpected|missing"):  # the claim holds
        AutoModelForCausalLM.from_pretrained(tmp_path / "hf")


def test_load_compressed_refuses_a_folder_that_is_not_an_export(tmp_path) -> None:
    from autocompress.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="not an autocompress export"):
        load_compressed(tmp_path)


@pytest.mark.parametrize(
    ("bits", "symmetric", "width"),
    [(4, True, 4), (4, False, 4), (3, True, 4), (2, False, 4), (8, True, 8), (8, False, 8), (6, False, 8)],
)
def test_grid_codes_recover_on_grid_values_exactly(bits: int, symmetric: bool, width: int) -> None:
    rng = np.random.default_rng(bits)
    n, kb, bs = 6, 3, 32
    step = rng.uniform(0.01, 0.1, size=(n, kb, 1))
    if symmetric:
        q = rng.integers(-(2 ** (bits - 1) - 1), 2 ** (bits - 1), size=(n, kb, bs))
        w = q * step
    else:
        z = rng.integers(0, 2**bits, size=(n, kb, 1))
        w = (rng.integers(0, 2**bits, size=(n, kb, bs)) - z) * step
    codes, scales, zero = grid_codes(w.astype(np.float32), symmetric, width)
    back = (codes.astype(np.float64) - zero[..., None]) * scales[..., None]
    np.testing.assert_allclose(back, w, rtol=1e-5, atol=1e-7)
    assert codes.max() <= 2**width - 1
    off = w + rng.normal(0, 1e-2, size=w.shape) * step  # not on any grid
    assert grid_codes(off.astype(np.float32), symmetric, width) is None


def _dequantized_matmulnbits(path) -> dict[str, np.ndarray]:
    """Give node name -> the [K, N] weight each MatMulNBits node computes with."""
    m = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    out = {}
    for node in m.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: a.i for a in node.attribute}
        k, n, bs, bits = attrs["K"], attrs["N"], attrs["block_size"], attrs["bits"]

        def unpack(a: np.ndarray, bits: int = bits) -> np.ndarray:
            return a if bits == 8 else np.stack([a & 0x0F, a >> 4], axis=-1)

        codes = unpack(inits[node.input[1]]).reshape(n, -1, bs).astype(np.float64)
        kb = codes.shape[1]
        scales = inits[node.input[2]].reshape(n, kb, 1)
        if len(node.input) > 3 and node.input[3]:
            zero = unpack(inits[node.input[3]].reshape(n, -1)).reshape(n, -1)[:, :kb, None]
        else:
            zero = np.full((n, kb, 1), 2.0 ** (bits - 1))
        out[node.name] = ((codes - zero) * scales).reshape(n, -1)[:, :k].T
    return out


@pytest.mark.parametrize(
    "choice",
    [
        LayerChoice(bits=4, group_size=32),
        LayerChoice(bits=3, group_size=48, symmetric=False),
        LayerChoice(bits=8, quant_method="gptq"),
        LayerChoice(bits=6, group_size=64, symmetric=False),
    ],
)
def test_onnx_nbits_weights_are_the_plans_weights(llama, tmp_path, choice) -> None:
    a = llama.anatomy
    plan = plan_for(a, default=choice)
    hess = None
    if choice.quant_method == "gptq":  # error feedback moves weights, the grid stays the plan's
        ids = torch.randint(3, 250, (2, 64), generator=torch.Generator().manual_seed(0))
        keys = {s.name: input_key(s) for s in a.linears}
        hess = Hessians(a.model_hash, plan.provenance.data_hash, keys, collect_hessians(llama.model, a, ids))
    model = apply_plan_to(llama.model, a, plan, hessians=hess)
    exp = export_onnx(model, a, plan, tmp_path / "m.onnx")
    deq = _dequantized_matmulnbits(exp.path)
    assert len(deq) == len(a.linears)
    for site in a.linears:
        node = next(k for k in deq if k.strip("/").rsplit("/", 1)[0].replace("/", ".") == f"model.{site.name}")
        want = model.get_submodule(site.name).weight.detach().numpy().T
        np.testing.assert_allclose(deq[node], want, rtol=1e-5, atol=1e-6)
    check = check_onnx(exp.path, model, a, exp.formats)
    assert check["passed"] and check["compared"] == "stored weights (fp32 compute)"


def test_check_fails_when_onnx_and_torch_disagree(llama, tmp_path) -> None:
    a = llama.anatomy
    plan = plan_for(a)
    exp = export_onnx(llama.model, a, plan, tmp_path / "m.onnx", quantize=False)
    other = apply_plan_to(llama.model, a, plan_for(a, default=LayerChoice(bits=2, group_size=16)))
    assert check_onnx(exp.path, llama.model, a, exp.formats)["passed"]
    bad = check_onnx(exp.path, other, a, exp.formats)
    assert not bad["passed"] and bad["relative_l2_error"] > bad["tolerance"]


def test_check_isolates_stored_weights_from_activation_rounding(llama, tmp_path) -> None:
    a = llama.anatomy
    plan = plan_for(a, default=LayerChoice(bits=8))
    model = apply_plan_to(llama.model, a, plan)
    exp = export_onnx(model, a, plan, tmp_path / "m.onnx")
    good = check_onnx(exp.path, model, a, exp.formats)
    assert good["passed"] and good["stored_weights_error"] < 1e-5 < good["relative_l2_error"]
    m = onnx.load(str(exp.path))  # a 5 % error in one layer's scales: a broken export, small in the logits
    node = [n for n in m.graph.node if n.op_type == "MatMulNBits"][-1]
    scales = next(i for i in m.graph.initializer if i.name == node.input[2])
    scales.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scales) * 1.05, scales.name))
    onnx.save(m, str(exp.path))
    bad = check_onnx(exp.path, model, a, exp.formats)
    assert bad["relative_l2_error"] < TOLERANCE["int8"]  # the as-deployed comparison alone would miss it
    assert not bad["passed"] and bad["stored_weights_error"] > bad["tolerance"]


def test_runtime_rounding_is_zero_for_fp32_and_measured_for_int8(llama, tmp_path) -> None:
    a = llama.anatomy
    text = torch.randint(3, 250, (2, 64), generator=torch.Generator().manual_seed(1))
    fp32 = export_onnx(llama.model, a, plan_for(a), tmp_path / "f.onnx", quantize=False)
    same = runtime_rounding(fp32.path, llama.model, llama.model, text, a)
    assert same["kl_runtime"] < 1e-8 and same["kl_plan"] == 0 and not same["runtime_dominates"]
    plan = plan_for(a, default=LayerChoice(bits=4, group_size=32))
    model = apply_plan_to(llama.model, a, plan)
    q = runtime_rounding(export_onnx(model, a, plan, tmp_path / "q.onnx").path, model, llama.model, text, a)
    assert q["kl_runtime"] > 1e-8 and q["kl_plan"] > 1e-6  # both rounding steps change the distributions
    assert "skipped" in runtime_rounding(fp32.path, llama.model, llama.model, text[:, :32], a)
