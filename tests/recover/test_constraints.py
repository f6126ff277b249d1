"""Recovery trains only what the plan leaves free: pruned weights stay 0, quantized ones stay on their grid."""

from __future__ import annotations

import pytest
import torch

from autocompress.compress.gptq import gptq_quantize
from autocompress.compress.quantize import rtn_quantize
from autocompress.recover import recover
from autocompress.recover.constraints import grid_from_values, kept_linears
from tests.recover.conftest import FAST, mixed_plan


def _codes_per_group(w: torch.Tensor, gs: int) -> int:
    return max(len(torch.unique(g)) for g in w.reshape(w.shape[0], -1, gs).reshape(-1, gs))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_grid_is_read_back_from_quantized_weights(method, symmetric):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 64, generator=g)
    if method == "rtn":
        q = rtn_quantize(w, 3, 16, symmetric)
    else:
        x = torch.randn(256, 64, generator=g)
        q = gptq_quantize(w, x.t() @ x, 3, 16, symmetric, act_order=True)
    grid = grid_from_values(q, 3, 16, symmetric)
    assert torch.allclose(grid.snap(q), q, atol=1e-6)  # the compressed weight already lies on it
    moved = grid.snap(q + 0.3 * torch.randn(24, 64, generator=g))
    assert _codes_per_group(moved, 16) <= 2**3  # anything snapped onto it uses at most 2^bits levels
    assert not torch.allclose(moved, q)


def test_training_keeps_masks_and_grids(wb_llama):
    plan = mixed_plan(wb_llama)
    before = wb_llama.apply(plan)
    after = wb_llama.apply(plan)
    recover(wb_llama, plan, after, FAST)
    changed = 0
    for path, choice, _ in kept_linears(after, wb_llama.lm.anatomy, plan):
        mods_b, mods_a = before.get_submodule(path), after.get_submodule(path)
        pairs = zip(mods_b, mods_a, strict=True) if isinstance(mods_a, torch.nn.Sequential) else [(mods_b, mods_a)]
        for mb, ma in pairs:
            wb, wa = mb.weight.detach(), ma.weight.detach()
            changed += int(not torch.equal(wb, wa))
            if choice.pruned:
                assert torch.all(wa[wb == 0] == 0), f"{path}: a pruned weight came back"
            if choice.quantized:
                grid = grid_from_values(wb, choice.bits, choice.group_size, choice.symmetric)
                assert torch.allclose(grid.snap(wa), wa, atol=1e-6), f"{path}: left the plan's grid"
    assert changed >= 8  # training did move the weights (else the checks above prove nothing)
