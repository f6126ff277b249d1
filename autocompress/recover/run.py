"""Recover one compressed model, or replay the recovery a plan records."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from autocompress.errors import PlanError
from autocompress.plan import Plan, RecoverySpec
from autocompress.recover.data import sequences_hash, training_sequences
from autocompress.recover.train import RecoverySettings, StepInfo, distill

if TYPE_CHECKING:
    from autocompress.workbench import Workbench


def training_pool(wb: Workbench, tokens: int, seq_len: int) -> torch.Tensor:
    """Give the sequences recovery trains on: ``tokens`` of the calibration documents, cut at ``seq_len``.

    A model with its own task data (the topic classifier) trains on that task's calibration split
    only: its text comes from the same file as its evaluation articles, split its own way.
    """
    if getattr(wb.lm, "task_data", None) is not None:
        return wb.data.calib
    return training_sequences(wb.lm.tokenizer, wb.data_config, tokens, seq_len)


def recover(
    wb: Workbench,
    plan: Plan,
    model: nn.Module,
    settings: RecoverySettings,
    on_step: Callable[[StepInfo, nn.Module], None] | None = None,
) -> Plan:
    """Train ``model`` (``wb.apply(plan)``) in place against ``wb.lm.model``; give the plan with its recovery."""
    if plan.recovery is not None:
        raise PlanError("this plan is already recovered; recover the plan it was made from")
    seqs = training_pool(wb, settings.pool_tokens, wb.data_config.seq_len)
    steps = distill(model, wb.lm.model, wb.lm.anatomy, plan, seqs, settings, on_step=on_step)
    spec = RecoverySpec(
        steps=steps,
        tokens=int(seqs.numel()),
        seq_len=int(seqs.shape[1]),
        batch_size=settings.batch_size,
        lr=float(settings.lr),
        warmup_steps=settings.warmup_steps,
        temperature=float(settings.temperature),
        hidden_weight=float(settings.hidden_weight),
        seed=settings.seed,
        data_hash=sequences_hash(seqs),
    )
    return replace(plan, recovery=spec)


def settings_of(spec: RecoverySpec) -> RecoverySettings:
    """Give the training settings a recorded recovery used (its step count is replayed separately)."""
    return RecoverySettings(
        pool_tokens=spec.tokens,
        batch_size=spec.batch_size,
        lr=spec.lr,
        warmup_steps=spec.warmup_steps,
        temperature=spec.temperature,
        hidden_weight=spec.hidden_weight,
        seed=spec.seed,
    )


def rebuild(wb: Workbench, plan: Plan, into: nn.Module | None = None) -> nn.Module:
    """Give the model ``plan`` describes: ``wb.apply(plan)``, then the recovery it records replayed."""
    return replay(wb, plan, wb.apply(plan, into, skip_recovery=True))


def replay(wb: Workbench, plan: Plan, model: nn.Module, on_step: Callable | None = None) -> nn.Module:
    """Repeat the recovery ``plan.recovery`` records on ``model`` (the plan applied without it); give it."""
    spec = plan.recovery
    if spec is None:
        return model
    seqs = training_pool(wb, spec.tokens, spec.seq_len)
    if sequences_hash(seqs) != spec.data_hash:
        raise PlanError(
            f"plan.recovery was trained on data {spec.data_hash[:12]}, but the calibration text here gives "
            f"{sequences_hash(seqs)[:12]}; reproducing it needs the same text and tokenizer"
        )
    distill(model, wb.lm.model, wb.lm.anatomy, plan, seqs, settings_of(spec), steps=spec.steps, on_step=on_step)
    return model
