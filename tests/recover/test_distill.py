"""Recovery: costs unchanged, deterministic, teacher untouched, trained on calibration documents only."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import pytest
import torch

import autocompress.recover.train as train_mod
from autocompress.calib import DataConfig, split_documents
from autocompress.errors import PlanError
from autocompress.hardware import CostModel, load_profile
from autocompress.plan import LayerChoice, ModelRef, Plan
from autocompress.recover import RecoveryError, RecoverySettings, rebuild, recover
from autocompress.recover.data import training_sequences
from autocompress.workbench import Workbench
from tests.conftest import TINY_DATA
from tests.recover.conftest import FAST, mixed_plan


def _weights_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode() + t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def test_costs_unchanged_teacher_untouched(wb_llama):
    plan = mixed_plan(wb_llama)
    teacher = _weights_hash(wb_llama.lm.model)
    model = wb_llama.apply(plan)
    compressed = _weights_hash(model)
    recovered = recover(wb_llama, plan, model, FAST)
    assert _weights_hash(wb_llama.lm.model) == teacher
    assert _weights_hash(model) != compressed
    for profile in ("jetson", "raspberry-pi-5"):
        cm = CostModel(load_profile(profile), wb_llama.lm.anatomy)
        assert cm.predict(recovered).to_dict() == cm.predict(plan).to_dict()
    assert recovered.recovery.steps == 6 and recovered.hash() != plan.hash()


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-bert"])
def test_deterministic_and_reapplied_bit_for_bit(name):
    wb = Workbench.open(name, TINY_DATA)
    a = wb.lm.anatomy
    plan = Plan(
        model=ModelRef.of(a),
        default=LayerChoice(bits=4, group_size=16, sparsity=0.3, prune_method="magnitude"),
        drop_blocks=(1,),
        provenance=wb.provenance(),
    )
    runs = []
    for _ in range(2):
        model = wb.apply(plan)
        recovered = recover(wb, plan, model, FAST)
        runs.append((_weights_hash(model), recovered))
    assert runs[0] == runs[1]
    assert runs[0][0] != _weights_hash(wb.apply(plan))
    assert _weights_hash(rebuild(wb, runs[0][1])) == runs[0][0]  # rebuilding the recovered plan replays it
    with pytest.raises(PlanError, match="records a recovery"):  # the workbench alone never half-rebuilds it
        wb.apply(runs[0][1])
    other = recover(wb, plan, wb.apply(plan), replace(FAST, seed=1))
    assert other.hash() != runs[0][1].hash()


def test_minutes_budget_records_steps_that_replay(wb_llama):
    plan = mixed_plan(wb_llama)
    model = wb_llama.apply(plan)
    recovered = recover(wb_llama, plan, model, replace(FAST, tokens=None, minutes=0.02))
    assert recovered.recovery.steps >= 1
    assert _weights_hash(rebuild(wb_llama, recovered)) == _weights_hash(model)


def test_training_sees_calibration_documents_only(tmp_path, monkeypatch):
    docs = [f"doc{i:02d} " * 12 for i in range(40)]
    (tmp_path / "text.txt").write_text("\n\n".join(docs))
    cfg = DataConfig(source=str(tmp_path / "text.txt"), seq_len=32, calib_tokens=256, proxy_tokens=64, eval_tokens=64)
    wb = Workbench.open("tiny-llama", cfg)
    calib_docs, eval_docs = split_documents(docs)
    calib_tags = {d.split()[0] for d in calib_docs}
    eval_tags = {d.split()[0] for d in eval_docs}
    fed: list[torch.Tensor] = []
    real = train_mod.batches

    def spy(seqs, batch_size, seed):
        for b in real(seqs, batch_size, seed):
            fed.append(b.clone())
            yield b

    monkeypatch.setattr(train_mod, "batches", spy)
    plan = Plan(model=ModelRef.of(wb.lm.anatomy), default=LayerChoice(bits=4), provenance=wb.provenance())
    settings = RecoverySettings(tokens=4 * 32 * 20, pool_tokens=10**6, warmup_steps=1)  # more than the text holds
    recover(wb, plan, wb.apply(plan), settings)
    seen = set()
    for batch in fed:
        for row in batch:
            text = wb.lm.tokenizer.decode(row.tolist())
            seen |= {w[:5] for w in text.split() if w.startswith("doc") and len(w) >= 5}
    assert len(fed) == 20 and seen and seen <= calib_tags and not seen & eval_tags
    pool = training_sequences(wb.lm.tokenizer, cfg, 10**6)
    assert torch.equal(pool[: wb.data.calib.shape[0]], wb.data.calib)  # the calibration split, continued
    assert 0 < pool.numel() <= sum(len(d) + 2 for d in calib_docs) + pool.shape[0]  # capped at what the text holds


def test_bad_settings_are_user_errors():
    with pytest.raises(RecoveryError, match="not both"):
        RecoverySettings(tokens=10, minutes=1.0)
    with pytest.raises(RecoveryError, match="--recover-minutes must be positive"):
        RecoverySettings(minutes=0.0)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_hidden_state_matching_changes_the_training(name):
    wb = Workbench.open(name, TINY_DATA)
    plan = Plan(model=ModelRef.of(wb.lm.anatomy), drop_blocks=(1,), provenance=wb.provenance())
    hashes = set()
    for weight in (0.0, 1.0):
        model = wb.apply(plan)
        recovered = recover(wb, plan, model, replace(FAST, hidden_weight=weight))
        assert recovered.recovery.hidden_weight == weight
        hashes.add(_weights_hash(model))
    assert len(hashes) == 2


def test_task_models_train_on_their_calibration_split_only(monkeypatch):
    wb = Workbench.open("tiny-bert", TINY_DATA)
    monkeypatch.setattr(wb.lm, "task_data", lambda tokenizer, config: wb.data)  # as the topic classifier has
    fed: list[torch.Tensor] = []
    real = train_mod.batches

    def spy(seqs, batch_size, seed):
        fed.append(seqs)
        yield from real(seqs, batch_size, seed)

    monkeypatch.setattr(train_mod, "batches", spy)
    plan = Plan(model=ModelRef.of(wb.lm.anatomy), default=LayerChoice(bits=4), provenance=wb.provenance())
    recovered = recover(wb, plan, wb.apply(plan), FAST)
    assert len(fed) == 1 and torch.equal(fed[0], wb.data.calib)
    assert recovered.recovery.tokens == wb.data.calib.numel()
