"""Distillation from the uncompressed model (teacher) into a compressed one (student), in place.

Loss: KL(teacher ‖ student) of the output distributions at temperature T (scaled by T², Hinton
et al.), over every output position — next-token logits for causal LMs, class logits for encoder
classifiers — plus, optionally, ``hidden_weight`` × the mean squared error of each kept block's
output against the same block's output in the teacher (normalised by the teacher's mean square).

AdamW, linear warm-up then a constant learning rate: the schedule never depends on the total
budget, so the first k steps of any run are the same k steps (a run stopped by the clock is a
prefix of a longer one). bf16 autocast on the device of the student's weights (CPU or CUDA) for
both forward passes, the weights and optimizer state in the student's dtype. Batches come from a seeded permutation of the training sequences per epoch;
dropout is off. With a fixed seed, the same steps, thread count and machine give bit-identical
weights; a minutes budget stops after whole steps and reports how many, so replaying that many
steps gives the same weights.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from autocompress.device import model_device
from autocompress.errors import AutocompressError
from autocompress.model.anatomy import ModelAnatomy
from autocompress.plan import Plan
from autocompress.recover.constraints import constrain, release

DEFAULT_TOKENS = 65_536
DEFAULT_POOL_TOKENS = 131_072


class RecoveryError(AutocompressError):
    """Recovery settings are invalid or training diverged."""


@dataclass(frozen=True)
class RecoverySettings:
    """How to recover: a budget (``tokens`` or ``minutes``; tokens by default) and the optimiser."""

    tokens: int | None = None  # tokens fed to the student (steps = ceil(tokens / (batch_size · seq_len)))
    minutes: float | None = None  # or: train until this much training time has passed (whole steps)
    pool_tokens: int = DEFAULT_POOL_TOKENS  # (at most) distinct calibration tokens to draw batches from
    batch_size: int = 4
    lr: float = 1e-4
    warmup_steps: int = 10
    temperature: float = 1.0
    hidden_weight: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.tokens is not None and self.minutes is not None:
            raise RecoveryError("give a token budget (--recover-tokens) or a time budget (--recover-minutes), not both")
        if self.tokens is not None and self.tokens < 1:
            raise RecoveryError(f"--recover-tokens must be positive, got {self.tokens}")
        if self.minutes is not None and not (math.isfinite(self.minutes) and self.minutes > 0):
            raise RecoveryError(f"--recover-minutes must be positive, got {self.minutes}")
        if not self.temperature > 0:
            raise RecoveryError(f"--temperature must be positive, got {self.temperature}")
        if not self.lr > 0 or self.batch_size < 1 or self.pool_tokens < 1 or self.hidden_weight < 0:
            raise RecoveryError("lr, batch size and pool tokens must be positive, hidden weight >= 0")

    def steps_for(self, seq_len: int) -> int | None:
        """Give the number of steps a token budget means (None for a time budget)."""
        if self.minutes is not None:
            return None
        tokens = DEFAULT_TOKENS if self.tokens is None else self.tokens
        return max(1, math.ceil(tokens / (self.batch_size * seq_len)))


@dataclass(frozen=True)
class StepInfo:
    """What the progress callback gets after each step."""

    step: int
    total: int | None  # None under a time budget
    loss: float
    elapsed_s: float  # training time so far (callbacks excluded)


def batches(seqs: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Give batches of rows of ``seqs`` forever: a fresh seeded permutation per epoch."""
    gen = torch.Generator().manual_seed(seed)
    n = seqs.shape[0]
    while True:
        order = torch.randperm(n, generator=gen)
        for start in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
            yield seqs[order[start : start + batch_size]]


def _outputs(model: nn.Module, ids: torch.Tensor, hidden: bool):
    return model(input_ids=ids, output_hidden_states=hidden) if hidden else model(input_ids=ids)


def distill_loss(
    s_out, t_out, temperature: float, hidden_weight: float, kept: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Give (total loss, logit KL) for one batch; ``kept`` are the teacher block indices the student kept."""
    vocab = s_out.logits.shape[-1]
    s = s_out.logits.float().reshape(-1, vocab) / temperature
    t = t_out.logits.float().reshape(-1, vocab) / temperature
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
    kl = kl * temperature**2
    loss = kl
    if hidden_weight > 0:
        # outputs of kept block j vs teacher block kept[j]; the last one may carry a final norm, so it is left out
        pairs = [(s_out.hidden_states[j + 1], t_out.hidden_states[i + 1]) for j, i in enumerate(kept[:-1])]
        if pairs:
            mse = sum(F.mse_loss(a.float(), b.float()) / b.float().square().mean().clamp_min(1e-8) for a, b in pairs)
            loss = loss + hidden_weight * mse / len(pairs)
    return loss, kl


def distill(
    student: nn.Module,
    teacher: nn.Module,
    anatomy: ModelAnatomy,
    plan: Plan,
    seqs: torch.Tensor,
    settings: RecoverySettings,
    *,
    steps: int | None = None,
    on_step: Callable[[StepInfo, nn.Module], None] | None = None,
) -> int:
    """Train ``student`` (the plan applied to ``teacher``) in place; give the number of steps taken.

    ``steps`` fixes the step count (a replay); otherwise the settings' budget decides. ``on_step``
    is called after each step with the student still parametrized (its forward is the constrained
    model); its time does not count against a minutes budget.
    """
    if steps is None:
        steps = settings.steps_for(seqs.shape[1])
    deadline = settings.minutes * 60.0 if steps is None else None
    kept = [b.index for b in anatomy.blocks if b.index not in set(plan.drop_blocks)]
    hidden = settings.hidden_weight > 0
    grads_before = {n: p.requires_grad for n, p in student.named_parameters()}
    was_training = student.training
    student.eval()  # no dropout: deterministic, and the deployed model's behaviour
    teacher.eval()
    touched = constrain(student, anatomy, plan)
    params = [p for p in student.parameters() if p.requires_grad]
    torch.manual_seed(settings.seed)
    opt = torch.optim.AdamW(params, lr=settings.lr, betas=(0.9, 0.95), weight_decay=0.0)
    warm = max(settings.warmup_steps, 0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / warm) if warm else 1.0)
    feed = batches(seqs, settings.batch_size, settings.seed)
    device = model_device(student)
    done = 0
    elapsed = 0.0
    try:
        while (steps is not None and done < steps) or (deadline is not None and elapsed < deadline):
            t0 = time.perf_counter()
            ids = next(feed).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                with torch.no_grad():
                    t_out = _outputs(teacher, ids, hidden)
                with torch.enable_grad():  # loading a model turns autograd off process-wide
                    s_out = _outputs(student, ids, hidden)
                    loss, kl = distill_loss(s_out, t_out, settings.temperature, settings.hidden_weight, kept)
            if not torch.isfinite(loss):
                raise RecoveryError(f"recovery diverged at step {done + 1} (loss {float(loss)}); lower the lr")
            opt.zero_grad(set_to_none=True)
            with torch.enable_grad():
                loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            done += 1
            elapsed += time.perf_counter() - t0
            if on_step is not None:
                on_step(StepInfo(done, steps, float(kl), elapsed), student)
    finally:
        del opt
        release(touched)
        for n, p in student.named_parameters():
            p.requires_grad_(grads_before.get(n, True))
            p.grad = None
        student.train(was_training)
    return done
