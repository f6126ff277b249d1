"""End-to-end through the CLI on tiny models: outputs, determinism, resume and clear errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import optuna
import pytest

from autocompress.cli import main
from tests.conftest import assert_modes_follow_umask

TINY = [
    "--model",
    "tiny-llama",
    "--seq-len",
    "64",
    "--calib-tokens",
    "512",
    "--proxy-tokens",
    "128",
    "--eval-tokens",
    "256",
]


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
        raise SystemExit(0)
    out = capsys.readouterr()
    return exc.value.code or 0, out.out, out.err


def test_hw_list(capsys):
    code, out, _ = run(["hw", "list"], capsys)
    assert code == 0
    for pid in ("jetson-orin-nano-25w", "raspberry-pi-5", "x86-avx2-laptop"):
        assert pid in out


def test_unknown_hardware_is_one_line_exit_2(capsys, tmp_path):
    code, out, err = run(["search", "--hw", "nosuchdevice", "--out", str(tmp_path / "s"), *TINY], capsys)
    assert code == 2
    assert err.strip().count("\n") == 0 and "nosuchdevice" in err and "jetson-orin-nano-25w" in err
    assert "Traceback" not in err + out
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--budget", "speed=1"], "unknown budget"),
        (["--budget", "latency_ms=-3"], "positive"),
        (["--space", "nosuchspace"], "unknown search space"),
        (["--sampler", "annealing"], "unknown sampler"),
        (["--trials", "0"], "at least 1"),
    ],
)
def test_bad_search_options(capsys, tmp_path, extra, fragment):
    code, _, err = run(["search", "--out", str(tmp_path), *TINY, *extra], capsys)
    assert code == 2 and fragment in err and err.strip().count("\n") == 0


def test_impossible_budget_is_refused_before_searching(capsys, tmp_path):
    code, _, err = run(["search", "--out", str(tmp_path), "--budget", "latency_ms=0.0001", *TINY], capsys)
    assert code == 2 and "no plan in space 'default' can meet latency_ms" in err
    assert not list(tmp_path.glob("*/plans/*.yaml"))


def _weight_hash(out: str) -> str:
    m = re.search(r"weight hash: ([0-9a-f]{64})", out)
    assert m, out
    return m.group(1)


def test_search_apply_resume(capsys, tmp_path, umask_027):
    studies = tmp_path / "studies"
    code, out, err = run(
        ["search", "--out", str(studies), "--study", "t", "--trials", "10", "--hw", "jetson", *TINY], capsys
    )
    assert code == 0, err
    sdir = studies / "t"
    pareto = json.loads((sdir / "pareto.json").read_text())
    assert len(pareto["pareto"]) >= 2
    assert "Pareto front" in out and "uncompressed" in (sdir / "summary.md").read_text()
    assert (
        0 < pareto["hypervolume"] <= 1
        and f"hypervolume: {pareto['hypervolume']:.3f}" in (sdir / "summary.md").read_text()
    )
    assert {"Q8_0", "Q4_0", "IQ4_NL"} <= set(pareto["baselines"])  # llama.cpp's own uniform formats
    for c in pareto["pareto"]:
        assert Path(c["plan_path"]).is_file() and c["cost"]["latency_ms"] > 0 and c["metrics"]["kl"] >= 0
        assert "ppl" in c["metrics"]  # the full metric ran on the front
    # front points are mutually non-dominated
    pts = [(c["metrics"]["kl"], c["cost"]["latency_ms"], c["cost"]["memory_mb"]) for c in pareto["pareto"]]
    for a in pts:
        assert not any(all(x <= y for x, y in zip(b, a, strict=False)) and b != a for b in pts)

    plan = max(pareto["pareto"], key=lambda c: c["metrics"]["kl"])["plan_path"]
    hashes = []
    for name, device in (("x1", []), ("x2", ["--device", "cpu"])):  # auto is the CPU here: the same weights
        code, out, err = run(["apply", plan, "--out", str(tmp_path / name), *device], capsys)
        assert code == 0, err
        hashes.append(_weight_hash(out))
        assert (tmp_path / name / "plan.yaml").is_file() and (tmp_path / name / "model.safetensors").is_file()
    assert hashes[0] == hashes[1]
    assert (tmp_path / "x1" / "plan.yaml").read_bytes() == Path(plan).read_bytes()
    # the study and the applied model follow the umask, not the private modes of their temporary names
    assert assert_modes_follow_umask(sdir, umask_027) > 10
    assert assert_modes_follow_umask(tmp_path / "x1", umask_027) >= 4

    storage = f"sqlite:///{sdir / 'study.db'}"
    before = {t.number: t.values for t in optuna.load_study(study_name="t", storage=storage).trials if t.values}
    code, out, err = run(  # --device is not part of the study: the run resumes
        ["search", "--out", str(studies), "--study", "t", "--trials", "12", "--hw", "jetson", "--device", "cpu", *TINY],
        capsys,
    )
    assert code == 0, err
    after = optuna.load_study(study_name="t", storage=storage)
    assert {t.number: t.values for t in after.trials if t.number in before} == before
    assert len([t for t in after.trials if t.values]) == 12

    code, _, err = run(
        ["search", "--out", str(studies), "--study", "t", "--trials", "12", "--hw", "rpi", *TINY], capsys
    )
    assert code == 2 and "different profile" in err

    # re-targeting prices the same plans on another device without evaluating anything
    n_trials = len(optuna.load_study(study_name="t", storage=storage).trials)
    code, out, err = run(["retarget", "--out", str(studies), "--study", "t", "--hw", "rpi"], capsys)
    assert code == 0, err
    assert len(optuna.load_study(study_name="t", storage=storage).trials) == n_trials
    rp = json.loads((sdir / "retarget-raspberry-pi-5" / "pareto.json").read_text())
    assert rp["profile"] == "raspberry-pi-5" and rp["pareto"]
    jet = {c["trial"]: c for c in json.loads((sdir / "pareto.json").read_text())["pareto"]}
    for c in rp["pareto"]:
        if c["trial"] in jet:
            assert c["metrics"]["kl"] == jet[c["trial"]]["metrics"]["kl"]
            assert c["cost"]["latency_ms"] != jet[c["trial"]]["cost"]["latency_ms"]  # priced anew, on the Pi


def test_apply_errors(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("schema_version: 1\nmodel: [")
    code, _, err = run(["apply", str(bad), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "not valid YAML" in err and not (tmp_path / "o").exists()
    code, _, err = run(["apply", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "not found" in err


def test_an_edited_plan_is_refused_unless_forced(capsys, tmp_path):
    from autocompress.plan import Plan
    from autocompress.workbench import Workbench
    from tests.conftest import TINY_DATA, plan_for

    wb = Workbench.open("tiny-llama", TINY_DATA)
    f = plan_for(wb.lm.anatomy, drop_blocks=(1,), provenance=wb.provenance()).save(tmp_path / "p.yaml")
    f.write_text(f.read_text().replace("- 1\n", "- 2\n"))  # drop another block, checksum unchanged
    for command in (["apply", str(f), "--out", str(tmp_path / "o")], ["evaluate", str(f)]):
        code, out, err = run(command, capsys)
        assert code == 2 and not out and not (tmp_path / "o").exists()
        assert err.count("\n") == 1 and str(f) in err and "checksum" in err and "--force" in err
    code, out, err = run(["apply", str(f), "--out", str(tmp_path / "o"), "--force"], capsys)
    assert code == 0, err
    written = Plan.load(tmp_path / "o" / "plan.yaml")  # re-hashed: loads without --force
    assert written.drop_blocks == (2,) and written == Plan.load(f, force=True)


def test_plan_for_another_model_fails_cleanly(capsys, tmp_path):
    from autocompress.model import load_model
    from tests.conftest import plan_for

    plan = plan_for(load_model("tiny-gpt2").anatomy)
    f = plan.save(tmp_path / "p.yaml")
    code, _, err = run(["apply", str(f), "--out", str(tmp_path / "o"), "--model", "tiny-llama"], capsys)
    assert code == 2 and "made for model" in err and not (tmp_path / "o").exists()


def test_export_says_when_plain_transformers_can_load_it(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from autocompress.compress import apply_plan_to
    from autocompress.export import export_hf
    from autocompress.model import load_model
    from autocompress.plan import BlockChoice, LayerChoice
    from tests.conftest import as_stored, plan_for

    lm = load_model("tiny-llama")
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    loadable = plan_for(lm.anatomy, default=LayerChoice(bits=4, group_size=32), drop_blocks=(1,))
    shaped = plan_for(lm.anatomy, blocks={0: BlockChoice(keep_heads=2)})
    for plan, ok in ((loadable, True), (shaped, False)):
        out = tmp_path / str(ok)
        model = apply_plan_to(lm.model, lm.anatomy, plan, None)
        export_hf(model, plan, out, lm.tokenizer)
        info = json.loads((out / "autocompress.json").read_text())
        assert info["loadable_with_plain_transformers"] is ok
        if ok:  # plain transformers rebuilds exactly our model, its weights rounded to bf16
            plain = AutoModelForCausalLM.from_pretrained(out).float()
            torch.testing.assert_close(plain(ids).logits, as_stored(model)(ids).logits)


def test_evaluate_base_and_plan(capsys, tmp_path):
    from autocompress.model import load_model
    from autocompress.plan import LayerChoice
    from autocompress.workbench import Workbench
    from tests.conftest import TINY_DATA, plan_for

    code, out, err = run(["evaluate", "--model", "tiny-llama", "--hw", "jetson", "--eval-tokens", "256"], capsys)
    assert code == 0, err
    assert "KL to base" in out and "perplexity" in out and "latency_ms on jetson" in out
    wb = Workbench.open("tiny-llama", TINY_DATA)
    plan = plan_for(
        load_model("tiny-llama").anatomy, default=LayerChoice(bits=3, group_size=32), provenance=wb.provenance()
    )
    f = plan.save(tmp_path / "p.yaml")
    code, out, err = run(["evaluate", str(f)], capsys)
    assert code == 0, err
    kl = float(re.search(r"KL to base \(nats/token\)\s*│\s*([0-9.e+-]+)", out).group(1))
    assert kl > 0


def test_search_can_recover_and_verify_front_points_at_the_end(capsys, tmp_path):
    argv = ["--json", "search", *TINY, "--trials", "6", "--full-eval", "2", "--out", str(tmp_path), "--study", "rv"]
    code, out, _ = run([*argv, "--recover", "1", "--recover-tokens", "256", "--verify", "1"], capsys)
    assert code == 0
    res = json.loads(out)
    (rec,) = res["recovered"]
    front_trials = {p["trial"] for p in res["pareto"]}
    assert rec["recovered_from"] in front_trials and rec["steps"] >= 1
    assert (tmp_path / "rv" / "plans" / f"{rec['trial']}.yaml").is_file()
    (ver,) = res["verify"]
    assert ver["latency"]["measured_decode_ms"] > 0 and "slower_than_uncompressed" in ver["latency"]
    assert (tmp_path / "rv" / "verify.json").is_file()


def test_search_refuses_a_bad_recovery_budget_before_searching(capsys, tmp_path):
    code, _, err = run(["search", *TINY, "--recover", "1", "--recover-minutes", "-1", "--out", str(tmp_path)], capsys)
    assert code == 2 and "--recover-minutes" in err and not any(tmp_path.iterdir())
