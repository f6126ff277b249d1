"""The plan's ``recovery`` field: absent keeps old YAML and hashes, present round-trips and changes the hash."""

from __future__ import annotations

from dataclasses import replace

import pytest

from autocompress.errors import PlanError
from autocompress.plan import BlockChoice, LayerChoice, ModelRef, Plan, Provenance, RecoverySpec

SPEC = RecoverySpec(
    steps=12,
    tokens=8192,
    seq_len=256,
    batch_size=4,
    lr=5e-5,
    warmup_steps=10,
    temperature=2.0,
    hidden_weight=0.0,
    seed=3,
    data_hash="ef" * 32,
)


def _plan() -> Plan:
    return Plan(
        model=ModelRef("tiny", "ab" * 32, "llama", 4),
        default=LayerChoice(bits=3, group_size=128, quant_method="gptq"),
        blocks={1: BlockChoice(keep_mlp_channels=64)},
        drop_blocks=(2,),
        provenance=Provenance(data_hash="cd" * 32, seed=7),
    )


def test_no_recovery_keeps_the_old_hash_and_yaml():
    # computed with plan.py before the recovery field existed
    assert _plan().hash() == "c7779b462edd9030e3df06f2a355a7d8f7a40b15f0a6c08e62d735f8cd3bc955"
    assert "recovery" not in _plan().to_yaml()


def test_recovery_round_trips_and_every_setting_changes_the_hash():
    plan = replace(_plan(), recovery=SPEC)
    assert Plan.from_yaml(plan.to_yaml()) == plan
    hashes = {plan.hash(), _plan().hash()}
    for field, value in [("steps", 13), ("seed", 4), ("temperature", 1.0), ("data_hash", "00" * 32), ("lr", 1e-4)]:
        hashes.add(replace(plan, recovery=replace(SPEC, **{field: value})).hash())
    assert len(hashes) == 7
    assert plan.with_provenance(trial=9).hash() == plan.hash()


@pytest.mark.parametrize(
    "edit,match",
    [
        ("steps: 12", r"plan\.recovery\.steps: must be an integer >= 0"),
        ("temperature: 2.0", r"plan\.recovery\.temperature: must be a positive number"),
        ("seed: 3", r"plan\.recovery: missing field\(s\) \['seed'\]"),
    ],
)
def test_bad_recovery_names_the_field(edit, match):
    bad = {"steps: 12": "steps: -1", "temperature: 2.0": "temperature: 0", "seed: 3": ""}[edit]
    text = replace(_plan(), recovery=SPEC).to_yaml().replace(f"  {edit}\n", f"  {bad}\n" if bad else "")
    with pytest.raises(PlanError, match=match):
        Plan.from_yaml(text)
