"""``--device`` / ``device=``: parsing, the CPU path (bit-identical to no device at all), and the CUDA
path (skipped on machines without a GPU; CI is CPU-only)."""

from __future__ import annotations

import pytest
import torch

from autocompress.device import cache_tag, compute_dtype, resolve_device
from autocompress.errors import DeviceError
from autocompress.model.loading import state_dict_hash
from autocompress.plan import LayerChoice
from tests.conftest import TINY_DATA, plan_for

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine (CI is CPU-only)")


@pytest.mark.parametrize("spec", ["gpu", "cuda:", "cuda:x", "cpu:0", "auto:1", "", "cuda 0", "mps"])
def test_malformed_device_is_refused(spec):
    with pytest.raises(DeviceError, match="must be auto, cpu, cuda or cuda:N"):
        resolve_device(spec)


def test_auto_follows_whether_a_gpu_is_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == resolve_device(None) == torch.device("cpu")
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("AUTO") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(DeviceError, match="2 CUDA GPU"):
        resolve_device("cuda:2")
    assert resolve_device(" CPU ") == torch.device("cpu")


def test_compute_dtype_and_cache_names():
    assert compute_dtype(torch.device("cpu")) == torch.float32
    assert compute_dtype(torch.device("cuda", 0)) == torch.bfloat16
    assert cache_tag(torch.nn.Linear(2, 2)) == ""  # fp32: the cache names of earlier versions
    assert cache_tag(torch.nn.Linear(2, 2).to(torch.bfloat16)) == "-bfloat16"


def _plan(wb, **choice):
    return plan_for(wb.lm.anatomy, default=LayerChoice(**choice), provenance=wb.provenance())


def test_cpu_device_gives_the_weights_and_kl_of_the_default(monkeypatch):
    """On the CPU, device="cpu" is the code path without a device: the same weights, the same KL."""
    from autocompress.evaluate import Evaluator
    from autocompress.workbench import Workbench

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # auto means the CPU, even on a GPU box
    results = []
    for device in ("auto", "cpu"):
        wb = Workbench.open("tiny-llama", TINY_DATA, device=device)
        assert wb.device == torch.device("cpu")
        assert all(p.dtype == torch.float32 for p in wb.lm.model.parameters())
        plan = _plan(wb, bits=4, group_size=32, quant_method="gptq")
        model = wb.apply(plan, share_base=True)
        results.append((plan.hash(), state_dict_hash(model), Evaluator(wb.lm.model, wb.data, "causal-lm").proxy(model)))
    assert results[0] == results[1]


def test_workbench_cache_is_bounded_by_its_setting():
    from autocompress.workbench import Workbench

    wb = Workbench.open("tiny-llama", TINY_DATA, device="cpu", cache_bytes=0)
    wb.apply(_plan(wb, bits=4, group_size=32))
    assert wb.variants.info().entries == 0 and wb.variants.info().max_bytes == 0
    other = Workbench.open("tiny-llama", TINY_DATA, device="cpu")
    other.apply(_plan(other, bits=4, group_size=32))
    assert other.variants.info().entries > 0 and wb.variants is not other.variants


@CUDA
def test_cuda_workbench_holds_the_model_in_bf16_and_plans_do_not_change():
    """On a GPU: the model lives there in bf16; the plan (and its hash) is the CPU's; the compressed
    weights and the KL are close to the CPU's, not bit-identical."""
    from autocompress.evaluate import Evaluator
    from autocompress.workbench import Workbench

    out = {}
    for device in ("cpu", "cuda"):
        wb = Workbench.open("tiny-llama", TINY_DATA, device=device)
        plan = _plan(wb, bits=4, group_size=32, quant_method="gptq")
        model = wb.apply(plan, share_base=True)
        p = next(model.parameters())
        assert p.device.type == device and p.dtype == (torch.bfloat16 if device == "cuda" else torch.float32)
        kl = Evaluator(wb.lm.model, wb.data, "causal-lm").proxy(model).kl
        name = wb.lm.anatomy.linears[0].name
        out[device] = (plan.hash(), kl, model.get_submodule(name).weight.detach().float().cpu())
    assert out["cpu"][0] == out["cuda"][0]
    assert out["cuda"][1] == pytest.approx(out["cpu"][1], rel=0.5, abs=0.02)
    w_cpu, w_gpu = out["cpu"][2], out["cuda"][2]
    assert ((w_gpu - w_cpu).norm() / w_cpu.norm()) < 0.05


@CUDA
def test_apply_and_export_on_a_gpu_machine_write_the_cpus_weights():
    """``model_on_cpu`` (apply / export): the model stays on the CPU in float32, so the weights are the CPU's."""
    from autocompress.workbench import Workbench

    wbs = {d: Workbench.open("tiny-llama", TINY_DATA, device=d, model_on_cpu=True) for d in ("cpu", "cuda")}
    plan = _plan(wbs["cpu"], bits=4, group_size=32, quant_method="gptq")
    models = {d: wb.apply(plan) for d, wb in wbs.items()}
    assert next(models["cuda"].parameters()).device.type == "cpu"
    assert state_dict_hash(models["cuda"]) == state_dict_hash(models["cpu"])


@CUDA
def test_cuda_recovery_trains_on_the_gpu():
    from autocompress.recover import RecoverySettings, recover
    from autocompress.workbench import Workbench

    wb = Workbench.open("tiny-llama", TINY_DATA, device="cuda")
    plan = _plan(wb, bits=4, group_size=32)
    model = wb.apply(plan)
    before = model.get_submodule(wb.lm.anatomy.linears[0].name).weight.detach().clone()
    new_plan = recover(wb, plan, model, RecoverySettings(tokens=2048))
    assert new_plan.recovery is not None
    after = model.get_submodule(wb.lm.anatomy.linears[0].name).weight
    assert after.device.type == "cuda" and not torch.equal(before, after)
