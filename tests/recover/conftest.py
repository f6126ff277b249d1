"""Tiny workbenches shared by the recovery tests (opened once per module)."""

from __future__ import annotations

import pytest

from autocompress.plan import BlockChoice, LayerChoice, ModelRef, Plan
from autocompress.recover import RecoverySettings
from autocompress.workbench import Workbench
from tests.conftest import TINY_DATA

FAST = RecoverySettings(tokens=6 * 4 * 64, pool_tokens=1024, lr=1e-3, warmup_steps=2)


@pytest.fixture(scope="module")
def wb_llama():
    return Workbench.open("tiny-llama", TINY_DATA)


def mixed_plan(wb: Workbench) -> Plan:
    """Every kind of choice at once: width, depth, low-rank, 2:4 and unstructured pruning, RTN and GPTQ."""
    a = wb.lm.anatomy
    b0 = {s.role: s.name for s in a.blocks[0].linears}
    b2 = {s.role: s.name for s in a.blocks[2].linears}
    return Plan(
        model=ModelRef.of(a),
        default=LayerChoice(bits=4, group_size=16, symmetric=False),
        layers={
            b0["q"]: LayerChoice(sparsity=0.5, sparsity_pattern="2:4", bits=8),
            b0["up"]: LayerChoice(rank_ratio=0.5, bits=4, group_size=16, sparsity=0.3),
            b0["down"]: LayerChoice(bits=3, group_size=16, quant_method="gptq"),
            b2["gate"]: LayerChoice(),
            b2["o"]: LayerChoice(rank_ratio=0.5),
        },
        blocks={0: BlockChoice(keep_mlp_channels=a.blocks[0].mlp_dim // 2)},
        drop_blocks=(1,),
        provenance=wb.provenance(seed=1),
    )
