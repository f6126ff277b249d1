"""`autocompress export` and `verify_front` on a finished tiny study."""

from __future__ import annotations

import json

import pytest
import torch

from autocompress.errors import ProfileError
from autocompress.export import load_compressed, verify
from autocompress.export.study import open_study, verify_front, workbench_for
from autocompress.export.verify import GENERIC_PROFILE, Predictor, slower_than
from autocompress.recover import rebuild
from tests.conftest import as_stored
from tests.export.study_fixture import STUDY
from tests.test_cli import run


def test_export_one_trial_writes_hf_onnx_and_a_checked_measured_record(tiny_study, tmp_path, capsys) -> None:
    from transformers import AutoModelForCausalLM

    view = open_study(STUDY, tiny_study.parent)
    c = next((c for c in view.front if "w4" in c.description), view.front[0])
    out = tmp_path / "exp"
    code, stdout, err = run(
        ["export", "--study", STUDY, "--studies", str(tiny_study.parent), "--trial", str(c.trial), "--out", str(out)],
        capsys,
    )
    assert code == 0, err
    folder = out / f"trial-{c.trial}"
    rec = json.loads((folder / "export.json").read_text())
    assert rec["plan_hash"] == c.plan.hash()
    assert rec["onnx"]["check"]["passed"], rec["onnx"]["check"]
    lat = rec["latency"]
    assert lat["measured_decode_ms"] > 0 and lat["predicted_decode_ms"] > 0 and lat["threads"] >= 1
    assert lat["measured_prefill_ms"] > lat["measured_decode_ms"] * 0.5  # 64 tokens are not free
    base = json.loads((out / "baseline.json").read_text())
    # the flags agree with the two measurements they summarise (and with the noise rule)
    assert lat["slower_than_uncompressed"] is slower_than(lat["measured_decode_ms"], base["measured_decode_ms"])
    assert lat["speedup_vs_uncompressed"] == pytest.approx(base["measured_decode_ms"] / lat["measured_decode_ms"])
    assert set(rec["techniques"]) <= set(verify.TECHNIQUES)
    assert any(cmd.startswith("autocompress search") and "--trials 8" in cmd for cmd in rec["reproduce"])
    assert base["measured_decode_ms"] > 0
    index = json.loads((out / "exports.json").read_text())
    assert [r["trial"] for r in index["exports"]] == [c.trial]
    assert f"| {c.trial} |" in stdout and (out / "README.md").is_file() and (folder / "README.md").is_file()
    ids = torch.tensor([[3, 4, 5]])
    ours = load_compressed(folder)
    # the folder holds the plan's model in bf16: the same logits as rebuilding the plan from the base
    # model and rounding its weights to bf16
    rebuilt = as_stored(rebuild(workbench_for(view, c.plan), c.plan))
    torch.testing.assert_close(ours(ids).logits, rebuilt(ids).logits)
    # and the loadability claim is true either way: plain transformers gives the same model, or a reason is named
    if rec["hf"]["loadable_with_plain_transformers"]:
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(folder).float()(ids).logits, ours(ids).logits)
    else:
        assert rec["hf"]["not_loadable_because"]


def test_export_needs_exactly_one_selection(tiny_study, tmp_path, capsys) -> None:
    args = ["export", "--study", STUDY, "--studies", str(tiny_study.parent), "--out", str(tmp_path / "o")]
    code, _, err = run(args, capsys)
    assert code == 2 and "--trial N" in err
    code, _, err = run([*args, "--pareto", "--trial", "1"], capsys)
    assert code == 2
    code, _, err = run([*args, "--trial", "999"], capsys)
    assert code == 2 and "no evaluated trial 999" in err
    code, _, err = run(
        ["export", "--study", "nope", "--studies", str(tiny_study.parent), "--out", "x", "--pareto"], capsys
    )
    assert code == 2 and "no study database" in err


def test_verify_front_measures_k_points_and_writes_verify_json(tiny_study) -> None:
    logs: list[str] = []
    records = verify_front(tiny_study, 2, logs.append)
    view = open_study(STUDY, tiny_study.parent)
    front = {c.trial for c in view.front}
    assert len(records) == 2 and {r["trial"] for r in records} <= front
    assert all(r["onnx"]["check"]["passed"] for r in records)
    assert all("hf" not in r for r in records)  # verify keeps no model folders
    stored = json.loads((tiny_study / "verify.json").read_text())
    assert stored["baseline"]["measured_decode_ms"] > 0
    assert [r["trial"] for r in stored["exports"]] == [r["trial"] for r in records]
    assert any("verify trial" in line for line in logs)
    assert not list(tiny_study.glob(".verify.*"))  # temporary ONNX files are gone


def test_prediction_falls_back_to_the_generic_x86_profile_and_says_so(tiny_study, monkeypatch) -> None:
    real = verify.load_profile

    def no_local(name):
        if name in ("local", "cpu"):
            raise ProfileError("unknown hardware profile 'local'")
        return real(name)

    monkeypatch.setattr(verify, "load_profile", no_local)
    pred = Predictor.for_hw("local", open_study(STUDY, tiny_study.parent).anatomy)
    assert pred.profile.id == GENERIC_PROFILE and "no calibrated profile" in pred.describe()
    with pytest.raises(ProfileError):
        Predictor.for_hw("no-such-device", open_study(STUDY, tiny_study.parent).anatomy)


def test_slower_than_uncompressed_allows_for_noise() -> None:
    assert not slower_than(1.03, 1.0) and slower_than(1.2, 1.0) and not slower_than(0.5, 1.0)
