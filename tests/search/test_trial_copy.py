"""The search's trials evaluate a ``share_base`` copy (only the changed weights are its own): the KL
it gives must be the deep copy's, bit for bit, under every runtime's numerics, and scoring it must
leave the base model as it was."""

from __future__ import annotations

import pytest

from autocompress.evaluate import Evaluator
from autocompress.model.loading import state_dict_hash
from autocompress.plan import BlockChoice, LayerChoice
from autocompress.workbench import Workbench
from tests.conftest import TINY_DATA, plan_for


@pytest.fixture(scope="module")
def wb():
    return Workbench.open("tiny-llama", TINY_DATA, device="cpu")


def _mixed(wb):
    a = wb.lm.anatomy
    b1 = a.blocks[1]
    mlp = [s.name for s in b1.linears if s.group == "mlp"]
    return plan_for(
        a,
        default=LayerChoice(format="Q4_0", quant_method="gptq"),
        layers={
            mlp[0]: LayerChoice(bits=4, group_size=32, rank_ratio=0.5, lowrank_method="svd-llm"),
            mlp[-1]: LayerChoice(bits=8, sparsity=0.5, sparsity_pattern="2:4", prune_method="wanda", act_bits=8),
            a.embeddings[0].name: LayerChoice(format="Q8_0"),  # the (tied) table: written in place
        },
        blocks={1: BlockChoice(keep_heads=b1.heads_per_kv * (b1.num_kv_heads - 1))},
        drop_blocks=(0,),
        provenance=wb.provenance(),
    )


@pytest.mark.parametrize("numerics", ["exact", "llama.cpp-cpu", "onnxruntime-cpu"])
def test_shared_copy_scores_as_the_deep_copy_and_leaves_the_base(wb, numerics):
    plan = _mixed(wb)
    ev = Evaluator(wb.lm.model, wb.data, "causal-lm")
    base_hash = state_dict_hash(wb.lm.model)
    wb.numerics = numerics
    try:
        scores = []
        for share in (False, True):
            model = wb.apply(plan, share_base=share)
            with wb.evaluating(plan, model) as m:
                first, rest = ev.proxy(m, slice(0, 1)), ev.proxy(m, slice(1, None))  # _climb's two rungs
                scores.append((ev.proxy(m), first, rest, state_dict_hash(m)))
    finally:
        wb.numerics = "exact"
    assert scores[0] == scores[1]
    assert scores[0][0].kl > 0  # the plan changed the model
    assert state_dict_hash(wb.lm.model) == base_hash  # the shared copy's writes never reached the base
    assert ev.proxy(wb.lm.model).kl == 0.0  # and the base scores as the base
