"""The calibration's prefill cost per block and token: what the block check's prefill shows beyond
the fitted profile's price of the same decoders (no timing here: the block check's numbers are given)."""

from __future__ import annotations

import pytest

from autocompress.calibration.onnx import (
    _REGISTRY_FMT,
    BLOCK_CONTEXT,
    BLOCK_COUNTS,
    BLOCK_FORMAT,
    _block_model,
    prefill_block_cost,
)
from autocompress.hardware import CostModel, HardwareProfile, load_profile
from autocompress.plan import LayerChoice, ModelRef, Plan


def _profile() -> dict:
    prof = load_profile("x86-avx2-laptop")  # any profile, made an onnxruntime one like `hw calibrate` writes
    return prof.model_copy(update={"runtime": "onnxruntime"}).model_dump(mode="json")


def _block(one_ms: float, per_block_ms: float) -> dict:
    lo, hi = BLOCK_COUNTS
    return {"prefill_timings_ms": {lo: one_ms, hi: one_ms + (hi - lo) * per_block_ms}}


def _prefill_per_block(profile: dict) -> float:
    prof = HardwareProfile.model_validate(profile)
    ms = {}
    for keep in BLOCK_COUNTS:
        _, a = _block_model(keep)  # the real decoder's anatomy, not the pure-data one the fit prices
        plan = Plan(model=ModelRef.of(a), default=LayerChoice(format=_REGISTRY_FMT[BLOCK_FORMAT]))
        ms[keep] = (
            CostModel(prof, a, prompt_tokens=BLOCK_CONTEXT, context_tokens=BLOCK_CONTEXT).predict(plan).prefill_ms
        )
    lo, hi = BLOCK_COUNTS
    return (ms[hi] - ms[lo]) / (hi - lo)


def test_the_fitted_profile_reproduces_the_block_checks_prefill_per_block() -> None:
    profile = _profile()
    measured = _prefill_per_block(profile) + 1.5  # the decoder is 1.5 ms per block slower than priced
    fitted = prefill_block_cost(profile, _block(7.0, measured))
    assert fitted == pytest.approx(1.5e3 / BLOCK_CONTEXT, rel=1e-3)
    assert _prefill_per_block({**profile, "prefill_block_us_per_token": fitted}) == pytest.approx(measured, rel=1e-4)


def test_the_intercept_does_not_move_it_and_a_faster_decoder_gives_zero() -> None:
    profile = _profile()
    measured = _prefill_per_block(profile) + 0.8
    assert prefill_block_cost(profile, _block(3.0, measured)) == prefill_block_cost(profile, _block(30.0, measured))
    assert prefill_block_cost(profile, _block(3.0, _prefill_per_block(profile) - 0.5)) == 0.0
