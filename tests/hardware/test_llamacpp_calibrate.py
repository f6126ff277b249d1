"""llama.cpp calibration: llama-bench's JSON read right, the fit inverts the cost model, and the CLI
writes a profile the cost model then uses (a short real run on tiny-llama GGUF files)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from autocompress.calibration import llamacpp as CL
from autocompress.cli import main
from autocompress.hardware import llamacpp_calibrate as LC
from autocompress.hardware.anchors import llama_like_anatomy
from autocompress.hardware.cost import CostModel
from autocompress.hardware.profile import load_profile, profile_from_dict, profiles_dir
from autocompress.plan import LayerChoice, ModelRef, Plan
from autocompress.runtime import llamacpp
from autocompress.runtime.llama_bench import parse_llama_bench, summarize_llama_bench
from autocompress.runtime.llamacpp import LlamaCppError

SAMPLE = Path(__file__).with_name("llama_bench_sample.json")  # `llama-bench -p 64 -n 32 -r 3 -t 1,2 -o json`
needs_llamacpp = pytest.mark.skipif(
    llamacpp.find() is None, reason=f"llama.cpp's tools are not built here ({llamacpp.SETUP_HINT})"
)


# ---- llama-bench's output --------------------------------------------------------------------------


def test_llama_bench_json_gives_per_thread_medians_of_the_samples() -> None:
    text = SAMPLE.read_text()
    tests = parse_llama_bench(text)
    assert {(t["n_prompt"], t["n_gen"], t["n_threads"]) for t in tests} == {
        (64, 0, 1),
        (0, 32, 1),
        (64, 0, 2),
        (0, 32, 2),
    }
    for threads in (1, 2):
        s = summarize_llama_bench(tests, threads)
        tg = next(t for t in tests if t["n_gen"] == 32 and t["n_threads"] == threads)
        pp = next(t for t in tests if t["n_prompt"] == 64 and t["n_threads"] == threads)
        # the median of the repeats, per token for decode and for the whole prompt for prefill
        assert s["decode_ms"] * 32 * 1e6 == pytest.approx(sorted(tg["samples_ns"])[1])
        assert s["prefill_ms"] * 1e6 == pytest.approx(sorted(pp["samples_ns"])[1])
        assert s["decode_tok_s"] == pytest.approx(1e3 / s["decode_ms"])
        assert s["prefill_tok_s"] == pytest.approx(64e3 / s["prefill_ms"])
        # llama-bench's own tokens/s figure (a mean over repeats) is within its stddev of ours
        assert abs(s["decode_tok_s"] - tg["avg_ts"]) <= 3 * tg["stddev_ts"] + 1e-9
        assert s["repeats"] == 3 and s["threads"] == threads and s["model_bytes"] == tg["model_size"]
    with pytest.raises(LlamaCppError, match="no tg test at 4 thread"):
        summarize_llama_bench(tests, 4)


@pytest.mark.parametrize("text", ["", "main: error: failed to load model", "[1, 2]", '[{"n_gen": 1}]', "[{"])
def test_anything_but_llama_benchs_json_is_one_clear_error(text: str) -> None:
    with pytest.raises(LlamaCppError, match="no JSON test results"):
        parse_llama_bench(text)


# ---- the fit -------------------------------------------------------------------------------------


def _truth() -> dict:
    d = yaml.safe_load((profiles_dir() / "x86-avx2-laptop.yaml").read_text())
    return {
        **d,
        "peak_bw_GBps": 40.0,
        "bw_efficiency": 0.5,
        "bw_efficiency_by_format": {"BF16": 0.55, "Q8_0": 0.7, "Q4_0": 0.35, "Q4_K": 0.25, "Q6_K": 0.45},
        "fp16_tflops": 0.5,
        "int8_tops": 2.0,
        "compute_efficiency": LC.DEFAULT_COMPUTE_EFFICIENCY,
        "compute_efficiency_by_format": {"BF16": 0.3, "Q8_0": 0.6, "Q4_0": 0.4, "Q4_K": 0.15, "Q6_K": 0.2},
        "per_token_overhead_ms": 0.4,
        "per_kernel_overhead_us": 3.0,
        "kernels_per_block": LC.KERNELS_PER_BLOCK,
        "kernels_per_linear": 1,
    }


def _cases() -> list[tuple[Plan, object]]:
    a = llama_like_anatomy("synthetic", n_blocks=6, hidden=512, heads=8, kv=2, mlp=1536, vocab=8000, tied=True)
    ref = ModelRef.of(a)
    embed = a.embeddings[0].name

    def plan(fmt: str, down: str | None = None, base: str = "full") -> Plan:
        layers = {embed: LayerChoice(format=fmt)}
        if down:
            layers |= {s.name: LayerChoice(format=down) for s in a.linears if s.role == "down"}
        shape = CL.base_plan(a, base)
        return Plan(model=ref, default=LayerChoice(format=fmt), layers=layers, **_shape_of(shape))

    plans = [plan("BF16"), plan("Q8_0"), plan("Q4_0"), plan("Q4_0", "Q4_K"), plan("Q4_0", "Q6_K")]
    plans += [plan("BF16", base="half"), plan("Q4_0", base="half"), plan("Q8_0", "Q4_K", base="half")]
    plans += [plan("Q8_0", base="narrow"), plan("Q4_0", base="narrow")]
    return [(p, a) for p in plans]


def _shape_of(plan: Plan) -> dict:
    return {"drop_blocks": plan.drop_blocks, "blocks": plan.blocks}


def test_the_fit_recovers_the_parameters_that_made_the_timings() -> None:
    truth = profile_from_dict(_truth())
    cases = _cases()
    scenario = {"prompt_tokens": 64, "context_tokens": 16}
    measured = np.array(
        [(c.decode_ms_per_token, c.prefill_ms) for c in (CostModel(truth, a, **scenario).predict(p) for p, a in cases)]
    )
    skeleton = {k: v for k, v in _truth().items() if not k.endswith("_by_format")}
    fit = LC.fit_profile(
        skeleton,
        cases,
        measured[:, 0],
        measured[:, 1],
        reference_bw_GBps=truth.peak_bw_GBps * truth.bw_efficiency,
        fp_peak=truth.fp16_tflops * 1e12,
        int8_peak=truth.int8_tops * 1e12,
        scenario=scenario,
    )
    got = profile_from_dict(fit.profile)
    assert got.per_token_overhead_ms == pytest.approx(0.4, rel=1e-3)
    assert got.per_kernel_overhead_us == pytest.approx(3.0, rel=1e-3)
    for f, eff in truth.bw_efficiency_by_format.items():  # effective bandwidth: peaks may be rescaled
        assert got.peak_bw_GBps * got.bw_efficiency_by_format[f] == pytest.approx(truth.peak_bw_GBps * eff, rel=1e-3)
    for f, eff in truth.compute_efficiency_by_format.items():
        peak = (got.fp16_tflops, truth.fp16_tflops) if f == "BF16" else (got.int8_tops, truth.int8_tops)
        assert peak[0] * got.compute_efficiency_by_format[f] == pytest.approx(peak[1] * eff, rel=1e-3)
    assert fit.decode_parameters == 2 + len(truth.bw_efficiency_by_format)
    np.testing.assert_allclose(fit.decode_pred_ms, measured[:, 0], rtol=1e-3)
    np.testing.assert_allclose(fit.prefill_pred_ms, measured[:, 1], rtol=1e-3)
    # Q8_0 streams faster than the reference bandwidth: the peak is raised, no efficiency passes 1
    assert got.peak_bw_GBps == pytest.approx(truth.peak_bw_GBps * 0.7, rel=1e-3)
    assert got.peak_bw_GBps > truth.peak_bw_GBps * truth.bw_efficiency
    assert max([*got.bw_efficiency_by_format.values(), *got.compute_efficiency_by_format.values()]) <= 1.0
    # formats never measured fall back to their class (int8 <- Q8_0; the dense fp16 key <- BF16, the export's dtype)
    assert got.bw_efficiency_for("int8") == got.bw_efficiency_for("Q8_0")
    assert got.bw_efficiency_for("fp16") == got.bw_efficiency_for("BF16")


def test_mape_is_the_mean_relative_error() -> None:
    assert LC.mape([110, 90, 100], [100, 100, 100]) == pytest.approx(0.2 / 3)


# ---- the command (a real, short run) ---------------------------------------------------------------

TINY = (
    *(CL.FileSpec(t, t, "fit") for t in ("F16", "Q8_0", "Q4_0", "Q5_1")),
    CL.FileSpec("Q8_0-half", "Q8_0", "fit", base="half"),
    CL.FileSpec("Q4_0-half", "Q4_0", "fit", base="half"),
    CL.FileSpec("Q4_0-narrow", "Q4_0", "fit", base="narrow"),
    CL.FileSpec("mix", "Q4_0", "holdout", tensor_types=(("attn_v", "Q8_0"),), embedding="Q5_1"),
    CL.FileSpec("recipe-Q4_K_M", "Q4_K_M", "holdout", pure=False),
)


@needs_llamacpp
def test_cli_writes_a_profile_the_cost_model_uses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(CL, "FILES", TINY)
    out = tmp_path / "hw" / "local-llamacpp.yaml"
    out.parent.mkdir()
    argv = ["--json", "hw", "calibrate", "--runtime", "llama.cpp", "--model", "tiny-llama", "--out", str(out)]
    main([*argv, "--threads", "1", "--repeats", "2"])
    result = json.loads(capsys.readouterr().out)
    p = load_profile(out)
    assert p.id == "local-llamacpp" and p.runtime == "llama.cpp" and p.calibrated
    assert result["profile"]["id"] == p.id and p.calibration.threads == 1
    assert set(p.format_names) == {"F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1"} | {
        "Q4_0",
        "IQ4_NL",
        "Q3_K",
        "Q2_K",
    }
    assert {"F16", "Q8_0", "Q4_0", "Q5_1"} <= set(p.bw_efficiency_by_format)
    raw = json.loads(out.with_name(p.calibration.measurements).read_text())
    assert [r["name"] for r in raw["files"]] == [s.name for s in TINY]
    assert raw["threads_recorded"] == [1]
    for r in raw["files"]:
        assert r["decode_ms"] > 0 and r["prefill_ms"] > 0 and r["decode_ms_predicted"] > 0
    # the half-depth files have half the blocks, and the cost model (with the fitted overheads) prices them lower
    rows = {r["name"]: r for r in raw["files"]}
    assert rows["Q8_0-half"]["blocks"] == rows["Q8_0"]["blocks"] // 2
    assert rows["Q8_0-half"]["decode_ms_predicted"] < rows["Q8_0"]["decode_ms_predicted"]
    assert set(raw["errors"]) == {"decode_fit_mape", "decode_holdout_mape", "prefill_fit_mape", "prefill_holdout_mape"}
    assert p.calibration.fit_mape == pytest.approx(raw["errors"]["decode_fit_mape"], abs=1e-4)
    table = LC.markdown_table(raw).splitlines()
    assert len([ln for ln in table if ln.startswith("| ")]) == len(TINY) + 1  # header + one row per file
    assert f"{raw['errors']['decode_holdout_mape']:.1%} on the held-out" in table[-1]
