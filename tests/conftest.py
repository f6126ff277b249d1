"""Shared fixtures: tiny random-init models with small token budgets keep the suite fast."""

from __future__ import annotations

import pytest

from autocompress.calib import DataConfig
from autocompress.model import load_model
from autocompress.plan import ModelRef, Plan

TINY_DATA = DataConfig(seq_len=64, calib_tokens=512, proxy_tokens=128, eval_tokens=256)


@pytest.fixture(params=["tiny-llama", "tiny-gpt2", "tiny-bert"])
def any_tiny(request):
    return load_model(request.param)


@pytest.fixture
def tiny_llama():
    return load_model("tiny-llama")


def plan_for(anatomy, **kwargs) -> Plan:
    """A plan for ``anatomy`` with the given Plan fields."""
    ref = ModelRef(anatomy.name, anatomy.model_hash, anatomy.architecture, anatomy.num_blocks)
    return Plan(model=ref, **kwargs)
