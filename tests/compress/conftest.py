"""Shared fixtures: tiny models and real activation statistics collected with forward hooks."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from autocompress.model.loading import LoadedModel, load_model
from autocompress.plan import ModelRef, Plan


@dataclass
class FakeStats:
    """Stands in for ``autocompress.calib.ActivationStats`` (same fields)."""

    input_sq_norms: dict[str, torch.Tensor]
    block_distance: list[float]
    num_tokens: int


def hook_stats(loaded: LoadedModel, seed: int = 0, tokens: int = 64) -> FakeStats:
    """Give per-linear input sums of x² from a forward pass on random token ids."""
    model, anatomy = loaded.model, loaded.anatomy
    norms: dict[str, torch.Tensor] = {}
    hooks = []
    for site in anatomy.linears:

        def hook(_m, args, _out, name=site.name):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            norms[name] = norms.get(name, 0) + x.square().sum(0)

        hooks.append(model.get_submodule(site.name).register_forward_hook(hook))
    ids = torch.randint(3, 250, (2, tokens), generator=torch.Generator().manual_seed(seed))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    return FakeStats(norms, [0.1] * anatomy.num_blocks, ids.numel())


def plan_for(loaded: LoadedModel, **kwargs) -> Plan:
    a = loaded.anatomy
    return Plan(model=ModelRef.of(a), **kwargs)


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gpt2", "tiny-bert"])
def any_model(request) -> LoadedModel:
    return load_model(request.param)


@pytest.fixture(scope="module")
def llama() -> LoadedModel:
    return load_model("tiny-llama")
