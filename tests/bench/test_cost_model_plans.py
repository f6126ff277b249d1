"""bench/cost_model.py's random plans are drawn from the default space as the validated profile's
runtime runs it, and its bandwidth probe is matched to the calibration's own sample."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from autocompress.hardware import load_profile
from autocompress.hardware.calibrate import LOCAL_FORMATS
from autocompress.hardware.profile import CalibrationInfo
from autocompress.model import load_model

SPEC = importlib.util.spec_from_file_location("bench_cost_model", Path(__file__).parents[2] / "bench" / "cost_model.py")
bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench)


def _onnxruntime_profile():
    prof = load_profile("x86-avx2-laptop")  # any profile, made an onnxruntime one like `hw calibrate` writes
    return prof.model_copy(update={"runtime": "onnxruntime", "formats": list(LOCAL_FORMATS)})


def test_random_plans_use_the_runtimes_formats_and_only_what_it_runs():
    a = load_model("tiny-llama").anatomy
    plans = bench.random_plans(a, 12, 0, _onnxruntime_profile())
    choices = [p.layers.get(s.name, p.default) for p in plans for s in a.linears]
    stored = {c.format for c in choices if c.fmt is not None and not c.fmt.is_float}
    # an unsettled space drew dense linears only; settled, most of onnxruntime's formats appear
    assert stored and stored <= set(LOCAL_FORMATS) and len(stored) >= 3, stored
    assert not any(c.sparsity for c in choices)  # onnxruntime CPU has no sparse kernel: never drawn
    assert len({p.hash() for p in plans}) == len(plans)


def test_the_probe_is_the_calibrations_own_sample(tmp_path: Path, monkeypatch) -> None:
    k, n, layers = bench.PROBE
    samples = [
        {"fmt": "fp32", "tokens": 1, "linears": layers, "flops": 2.0 * k * n * layers, "median_ms": 9.5},
        {"fmt": "int8", "tokens": 1, "linears": layers, "flops": 2.0 * k * n * layers, "median_ms": 4.0},
        {"fmt": "fp32", "tokens": 64, "linears": layers, "flops": 128.0 * k * n * layers, "median_ms": 30.0},
        {"fmt": "fp32", "tokens": 1, "linears": 6, "flops": 2.0 * 576 * 1536 * 6, "median_ms": 1.0},
    ]
    (tmp_path / "m.json").write_text(json.dumps({"samples": samples}))
    monkeypatch.setattr(bench, "profiles_dir", lambda: tmp_path)
    prof = load_profile("x86-avx2-laptop")
    assert bench.calibrated_probe_ms(prof) is None  # an uncalibrated prior has no measurements
    info = CalibrationInfo(
        date="2026-12-06", host="h", threads=1, seconds=1.0, samples=4, measurements="m.json", fit_mape=0.1, tool="t"
    )
    calibrated = prof.model_copy(update={"calibrated": True, "calibration": info})
    assert bench.calibrated_probe_ms(calibrated) == 9.5  # the cold fp32 GEMV of the probe's chain, no other
    missing = prof.model_copy(
        update={"calibrated": True, "calibration": info.model_copy(update={"measurements": "x.json"})}
    )
    assert bench.calibrated_probe_ms(missing) is None


def test_round_agreement_tells_a_repeatable_measurement_from_noise() -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    true = np.linspace(10.0, 15.0, 30)
    steady = [list(t * (1 + 0.001 * rng.random(6))) for t in true]  # rounds agree: ranks kept
    noisy = [list(t * (1 + 0.5 * rng.random(6))) for t in true]  # contention of up to 50 %
    s, n = bench.round_agreement(steady), bench.round_agreement(noisy)
    assert s["rounds"] == n["rounds"] == 6
    assert s["spearman_between_rounds"] > 0.99 and s["spread_median"] < 0.002
    assert n["spearman_between_rounds"] < 0.8 and n["spread_median"] > 0.1
    # contention that spares one even and one odd round of each plan: the best of each half is clean
    spiky = []
    for i, t in enumerate(true):
        rounds = list(t * (1 + 0.5 * rng.random(6)))
        rounds[2 * (i % 3)], rounds[2 * (i % 3) + 1] = t, t * 1.0001
        spiky.append(rounds)
    k = bench.round_agreement(spiky)
    assert k["spearman_best_even_vs_odd"] > 0.99 and k["spearman_between_rounds"] < 0.9
    assert bench.round_agreement([[1.0], [2.0]]) is None  # one round: nothing to compare
