"""apply_plan_to with GPTQ, activation-aware low-rank, W8A8 and the on-disk variant cache."""

from __future__ import annotations

import pytest
import torch

import autocompress.compress.apply as apply_mod
from autocompress.compress import VariantCache, apply_plan_to, collect_hessians, needs_hessians
from autocompress.compress.hessian import Hessians, input_key
from autocompress.errors import PlanError
from autocompress.model.loading import state_dict_hash
from autocompress.plan import BlockChoice, LayerChoice, Provenance

from .conftest import hook_stats, plan_for

DATA = "test-calibration"


def _ids(seed=0, tokens=64):
    return torch.randint(3, 250, (2, tokens), generator=torch.Generator().manual_seed(seed))


def _hessians(loaded) -> Hessians:
    a = loaded.anatomy
    tensors = collect_hessians(loaded.model, a, _ids())
    return Hessians(a.model_hash, DATA, {s.name: input_key(s) for s in a.linears}, tensors)


def _mixed_plan(loaded):
    a = loaded.anatomy
    b1 = a.blocks[1]
    mlp = [s.name for s in b1.linears if s.group == "mlp"]
    return plan_for(
        loaded,
        default=LayerChoice(bits=4, group_size=16, quant_method="gptq"),
        layers={
            mlp[0]: LayerChoice(rank_ratio=0.5, lowrank_method="svd-llm", bits=4, quant_method="gptq"),
            mlp[-1]: LayerChoice(sparsity=0.5, sparsity_pattern="2:4", bits=4, quant_method="gptq", act_bits=8),
        },
        blocks={1: BlockChoice(keep_heads=b1.heads_per_kv * (b1.num_kv_heads - 1), keep_mlp_channels=b1.mlp_dim // 2)},
        drop_blocks=(0,),
        provenance=Provenance(data_hash=DATA),
    )


def test_mixed_methods_run_on_every_architecture_deterministically(any_model):
    stats, hess = hook_stats(any_model), _hessians(any_model)
    plan = _mixed_plan(any_model)
    model = apply_plan_to(any_model.model, any_model.anatomy, plan, stats, hessians=hess)
    model(_ids(1, 8))
    first = state_dict_hash(model)
    assert state_dict_hash(apply_plan_to(any_model.model, any_model.anatomy, plan, stats, hessians=hess)) == first


def test_hessian_diagonal_is_the_input_norm(llama):
    stats, hess = hook_stats(llama), _hessians(llama)  # same tokens
    for site in llama.anatomy.linears:
        h, norm = hess.get(site.name).diagonal(), stats.input_sq_norms[site.name]
        assert torch.allclose(h, norm, rtol=1e-4, atol=1e-4)


def test_needs_hessians(llama):
    assert needs_hessians(_mixed_plan(llama))
    assert not needs_hessians(plan_for(llama, default=LayerChoice(bits=4, rank_ratio=0.5, lowrank_method="asvd")))


def test_hessians_found_on_disk_by_plan_data_hash_or_refused(llama, tmp_path, monkeypatch):
    from autocompress.calib import TokenData
    from autocompress.compress.hessian import calibration_hessians

    monkeypatch.setenv("AUTOCOMPRESS_CACHE", str(tmp_path))
    plan = plan_for(llama, default=LayerChoice(bits=4, quant_method="gptq"), provenance=Provenance(data_hash="nope"))
    with pytest.raises(PlanError, match="need calibration Hessians"):
        apply_plan_to(llama.model, llama.anatomy, plan)
    data = TokenData(calib=_ids(), proxy=_ids(1), eval=_ids(2), eval_chars=0, data_hash=DATA, source="test")
    hess = calibration_hessians(llama.model, llama.anatomy, data)  # collected, written to the disk cache
    found = apply_plan_to(llama.model, llama.anatomy, plan.with_provenance(data_hash=DATA))
    given = apply_plan_to(llama.model, llama.anatomy, plan, hessians=hess)
    assert state_dict_hash(found) == state_dict_hash(given)


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_model_closer_to_base_than_rtn(llama, bits):
    hess = _hessians(llama)
    ids = _ids()  # the calibration tokens: GPTQ minimises exactly this error
    ref = llama.model(ids).logits

    def err(method):
        plan = plan_for(llama, default=LayerChoice(bits=bits, group_size=32, quant_method=method))
        return (apply_plan_to(llama.model, llama.anatomy, plan, hessians=hess)(ids).logits - ref).norm().item()

    assert err("gptq") < err("rtn")


def test_act_bits_changes_outputs_not_weights(llama):
    name = "model.layers.2.mlp.down_proj"
    w8 = plan_for(llama, layers={name: LayerChoice(bits=8)})
    w8a8 = plan_for(llama, layers={name: LayerChoice(bits=8, act_bits=8)})
    m8, m8a8 = (apply_plan_to(llama.model, llama.anatomy, p) for p in (w8, w8a8))
    assert state_dict_hash(m8) == state_dict_hash(m8a8)
    ids = _ids(2, 16)
    a, b = m8(ids).logits, m8a8(ids).logits
    assert not torch.equal(a, b) and ((a - b).norm() / a.norm()) < 0.02


def test_disk_cache_restores_the_same_weights_without_recomputing(llama, tmp_path, monkeypatch):
    stats, hess = hook_stats(llama), _hessians(llama)
    plan = _mixed_plan(llama)
    first = state_dict_hash(apply_plan_to(llama.model, llama.anatomy, plan, stats, hessians=hess, cache=VariantCache()))
    writer = VariantCache(folder=tmp_path)
    assert state_dict_hash(apply_plan_to(llama.model, llama.anatomy, plan, stats, hessians=hess, cache=writer)) == first
    assert len(list(tmp_path.glob("*.safetensors"))) > 0

    def boom(*_a, **_k):
        raise AssertionError("recomputed a variant that is on disk")

    monkeypatch.setattr(apply_mod, "compress_weight", boom)
    reader = VariantCache(folder=tmp_path)  # another process: an empty memory, the same folder
    assert state_dict_hash(apply_plan_to(llama.model, llama.anatomy, plan, stats, hessians=hess, cache=reader)) == first


def test_gptq_imatrix_is_cached_apart_and_closer_where_inputs_are_large(llama):
    """quant_method gptq-imatrix (GPTQ codes on a grid fitted with the inputs' Σx²): a separate cache
    entry from plain gptq (one shared cache, both orders), and on the calibration tokens no farther
    from the base model than plain GPTQ's grid (the importance is that data's)."""
    hess = _hessians(llama)
    ids = _ids()
    ref = llama.model(ids).logits
    cache = VariantCache()
    out = {}
    for method in ("gptq", "gptq-imatrix", "gptq"):
        plan = plan_for(llama, default=LayerChoice(format="Q4_0", quant_method=method))
        m = apply_plan_to(llama.model, llama.anatomy, plan, hessians=hess, cache=cache)
        out.setdefault(method, []).append((state_dict_hash(m), (m(ids).logits - ref).norm().item()))
    (plain, plain_err), (again, _) = out["gptq"]
    (wgrid, wgrid_err) = out["gptq-imatrix"][0]
    assert plain == again and wgrid != plain
    assert wgrid_err <= 1.05 * plain_err, (plain_err, wgrid_err)
