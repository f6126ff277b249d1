"""The error catalogue: every bad input through the CLI gives one line naming the problem on stderr,
exit code 2, and writes nothing. NaN during evaluation and Ctrl-C are covered at the end."""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from autocompress.cli import main
from autocompress.hardware import profiles_dir
from autocompress.model import load_model, tiny_model
from autocompress.plan import LayerChoice, ModelRef, Plan, Provenance
from tests.test_cli import run

TINY_TOKENS = ["--seq-len", "64", "--calib-tokens", "512", "--proxy-tokens", "128", "--eval-tokens", "256"]
TINY = ["--model", "tiny-llama", *TINY_TOKENS]


def _search(tmp: Path, *extra: str, model: list[str] = TINY) -> list[str]:
    return ["search", "--out", str(tmp / "studies"), "--study", "c", "--trials", "2", *model, *extra]


def _write(tmp: Path, name: str, text: str | bytes) -> Path:
    path = tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
    return path


# ---- plans --------------------------------------------------------------------------------------
def _plan_dict() -> dict:
    anatomy = load_model("tiny-llama").anatomy
    data = {"seq_len": 64, "calib_tokens": 512, "proxy_tokens": 128, "eval_tokens": 256}
    plan = Plan(model=ModelRef.of(anatomy), default=LayerChoice(bits=8), provenance=Provenance(data=data))
    return yaml.safe_load(plan.to_yaml())


def _apply(tmp: Path, change: Callable[[dict], None] | None = None, text: str | None = None) -> list[str]:
    if text is None:
        d = _plan_dict()
        change(d)
        text = yaml.safe_dump(d)
    return ["apply", str(_write(tmp, "plan.yaml", text)), "--out", str(tmp / "model-out")]


def _truncated_plan(tmp: Path) -> list[str]:
    lines = yaml.safe_dump(_plan_dict()).splitlines(keepends=True)
    return _apply(tmp, text="".join(lines[: len(lines) // 2]))  # cut at a line: still YAML, fields missing


def _layer(name: str, **choice) -> Callable[[dict], None]:
    return lambda d: d["layers"].update({name: choice})


# ---- profiles -----------------------------------------------------------------------------------
def _profile(tmp: Path, change: Callable[[dict], None]) -> list[str]:
    d = yaml.safe_load((profiles_dir() / "raspberry-pi-5.yaml").read_text())
    change(d)
    return _search(tmp, "--hw", str(_write(tmp, "hw/bad.yaml", yaml.safe_dump(d))))


# ---- models -------------------------------------------------------------------------------------
def _model_folder(tmp: Path, arch: str = "tiny-llama") -> Path:
    folder = tmp / "hf"
    tiny_model(arch).save_pretrained(folder)
    return folder


def _corrupted(tmp: Path) -> list[str]:
    folder = _model_folder(tmp)
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[:300])
    return _search(tmp, model=["--model", str(folder), *TINY_TOKENS])


class _Evil:
    """Unpickling this creates the marker file: proof that a pickle was (or was not) executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _pickle_only(tmp: Path) -> list[str]:
    folder = tmp / "hf"
    tiny_model("tiny-llama").config.save_pretrained(folder)
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Evil(tmp / "UNPICKLED")))
    return _search(tmp, model=["--model", str(folder), *TINY_TOKENS])


def _unsupported(tmp: Path) -> list[str]:
    folder = tmp / "hf"
    _write(folder, "config.json", json.dumps({"model_type": "t5", "architectures": ["T5Model"]}))
    _write(folder, "model.safetensors", b"")
    return _search(tmp, model=["--model", str(folder), *TINY_TOKENS])


def _too_big_for_target(tmp: Path) -> list[str]:
    """A 35B-parameter Llama config with empty weights: refused from the prediction, before any loading."""
    cfg = tiny_model("tiny-llama").config
    cfg.update({"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 40})
    cfg.update({"num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128})
    folder = tmp / "hf"
    cfg.save_pretrained(folder)
    _write(folder, "model.safetensors", b"")  # loading would fail: the guard must come first
    return _search(tmp, "--hw", "jetson-nano", "--space", "quant-only", model=["--model", str(folder), *TINY_TOKENS])


# ---- data, spaces, storage, studies -------------------------------------------------------------
def _data(tmp: Path, name: str, content: str | bytes, *extra: str) -> list[str]:
    return _search(tmp, "--data", str(_write(tmp, name, content)), *extra)


SPACE_A = "name: tiny-a\ngranularity: model\nlinear: {format: [dense, Q8_0]}\nbaselines: {uncompressed: {}}\n"


def _study_clash(tmp: Path) -> list[str]:
    space_a = _write(tmp, "a.yaml", SPACE_A)
    space_b = _write(tmp, "b.yaml", SPACE_A.replace("Q8_0]", "Q4_0]").replace("tiny-a", "tiny-b"))
    main([*_search(tmp, "--space", str(space_a), "--full-eval", "0"), "--trials", "1"])  # returns on success
    return _search(tmp, "--space", str(space_b))


def _out_under_a_file(tmp: Path, command: str) -> list[str]:
    blocker = _write(tmp, "afile", "a regular file, so nothing can be created below it\n")
    if command == "search":
        return ["search", "--out", str(blocker / "studies"), *TINY]
    return [*_apply(tmp, lambda d: None)[:2], "--out", str(blocker / "model")]


def _edited_plan(tmp: Path) -> list[str]:
    """A plan written by ``save`` (with its checksum), then one number changed by hand."""
    anatomy = load_model("tiny-llama").anatomy
    data = {"seq_len": 64, "calib_tokens": 512, "proxy_tokens": 128, "eval_tokens": 256}
    path = Plan(model=ModelRef.of(anatomy), drop_blocks=(1,), provenance=Provenance(data=data)).save(tmp / "p.yaml")
    path.write_text(path.read_text().replace("- 1\n", "- 2\n"))
    return ["evaluate", str(path)]


def _no_study(tmp: Path, folder_option: str) -> list[str]:
    return ["--study", "nope", folder_option, str(tmp / "studies")]


def _foreign_folder(tmp: Path) -> list[str]:
    _write(tmp, "model-out/notes.txt", "someone else's file\n")
    return _apply(tmp, lambda d: None)


CASES: dict[str, tuple[Callable[[Path], list[str]], str]] = {
    # plans
    "apply/plan-malformed-yaml": (lambda t: _apply(t, text="model: [unclosed\n  layers: {\n"), "plan.yaml"),
    "apply/plan-truncated": (_truncated_plan, "truncated"),
    "apply/plan-missing-file": (lambda t: ["apply", str(t / "nope.yaml"), "--out", str(t / "o")], "nope.yaml"),
    "apply/plan-other-model": (lambda t: _apply(t, lambda d: d["model"].update(hash="0" * 64)), "hash"),
    "apply/plan-unknown-layer": (lambda t: _apply(t, _layer("model.layers.0.mlp.nope", bits=4)), "unknown layer"),
    "apply/plan-block-out-of-range": (lambda t: _apply(t, lambda d: d.update(drop_blocks=[99])), "99"),
    "apply/plan-bits-out-of-range": (lambda t: _apply(t, lambda d: d["default"].update(bits=1)), "bits"),
    "apply/plan-sparsity-out-of-range": (lambda t: _apply(t, lambda d: d["default"].update(sparsity=1.5)), "sparsity"),
    "apply/plan-rank-out-of-range": (lambda t: _apply(t, lambda d: d["default"].update(rank_ratio=2.0)), "rank_ratio"),
    # hardware profiles
    "search/profile-unknown": (lambda t: _search(t, "--hw", "nosuchdevice"), "unknown hardware profile 'nosuchdevice'"),
    "search/profile-malformed-yaml": (lambda t: _search(t, "--hw", str(_write(t, "p.yaml", "id: [x\n"))), "p.yaml"),
    "search/profile-missing-field": (lambda t: _profile(t, lambda d: d.pop("peak_bw_GBps")), "peak_bw_GBps"),
    "search/profile-negative-field": (lambda t: _profile(t, lambda d: d.update(active_W=-5)), "active_W"),
    "search/profile-wrong-type": (lambda t: _profile(t, lambda d: d.update(memory_GB="lots")), "memory_GB"),
    "hw show/unknown": (lambda t: ["hw", "show", "nosuchdevice"], "nosuchdevice"),
    # budgets
    "search/budget-impossible": (lambda t: _search(t, "--budget", "latency_ms=0.0001"), "no plan in space"),
    "search/budget-unknown-key": (lambda t: _search(t, "--budget", "speed=1"), "unknown budget 'speed'"),
    "search/budget-negative": (lambda t: _search(t, "--budget", "memory_mb=-3"), "memory_mb must be positive"),
    "search/budget-not-a-number": (lambda t: _search(t, "--budget", "latency_ms=fast"), "latency_ms must be a number"),
    "search/budget-no-value": (lambda t: _search(t, "--budget", "latency_ms"), "KEY=VALUE"),
    # models
    "search/model-path-missing": (lambda t: _search(t, model=["--model", str(t / "nope")]), "not found"),
    "search/model-not-hf-folder": (
        lambda t: _search(t, model=["--model", str(_write(t, "x/readme.txt", "hi").parent)]),
        "no config.json",
    ),
    "search/model-unsupported-architecture": (_unsupported, "unsupported architecture 't5'"),
    "search/model-corrupted-safetensors": (_corrupted, "cannot load weights"),
    "search/model-pickle-only": (_pickle_only, "pickle"),
    "search/model-does-not-fit-target": (_too_big_for_target, "does not fit jetson-nano"),
    # data
    "search/data-missing": (lambda t: _search(t, "--data", str(t / "nope.txt")), "data path not found"),
    "search/data-not-utf8": (lambda t: _data(t, "bin.txt", b"\xff\xfe\x00\x81" * 50), "not UTF-8"),
    "search/data-empty": (lambda t: _data(t, "empty.txt", ""), "holds no text"),
    "search/data-too-short": (lambda t: _data(t, "short.txt", "One short paragraph.\n\nAnother one.\n"), "tokens"),
    "search/data-jsonl-without-text": (lambda t: _data(t, "d.jsonl", '{"body": "x"}\n'), "'text'"),
    # search spaces, sampler, trials
    "search/space-unknown": (lambda t: _search(t, "--space", "nosuchspace"), "unknown search space 'nosuchspace'"),
    "search/space-invalid-file": (
        lambda t: _search(t, "--space", str(_write(t, "s.yaml", "name: s\ngranularity: layerwise\n"))),
        "granularity",
    ),
    "search/space-unknown-knob": (
        lambda t: _search(t, "--space", str(_write(t, "s.yaml", "name: s\nlinear: {colour: [red]}\n"))),
        "colour",
    ),
    "search/sampler-unknown": (lambda t: _search(t, "--sampler", "annealing"), "unknown sampler 'annealing'"),
    "search/trials-zero": (lambda t: _search(t, "--trials", "0"), "--trials must be at least 1"),
    "search/jobs-zero": (lambda t: _search(t, "--jobs", "0"), "--jobs must be at least 1"),
    # storage, studies, outputs
    "search/storage-unreachable": (
        lambda t: _search(t, "--storage", "postgresql+psycopg2://nobody@127.0.0.1:9/none"),
        "cannot open storage",
    ),
    "search/storage-bad-path": (
        lambda t: _search(t, "--storage", f"sqlite:///{_write(t, 'afile', 'x')}/study.db"),
        "cannot open storage",
    ),
    "search/study-clash-other-space": (_study_clash, "different search space ('tiny-a' vs 'tiny-b')"),
    "search/search-out-not-writable": (lambda t: _out_under_a_file(t, "search"), "afile is a file"),
    "apply/apply-out-not-writable": (lambda t: _out_under_a_file(t, "apply"), "afile is a file"),
    "apply/apply-out-foreign-folder": (_foreign_folder, "not empty"),
    "hw calibrate/calibrate-out-not-yaml": (lambda t: ["hw", "calibrate", "--out", str(t / "local.txt")], ".yaml"),
    "hw calibrate/calibrate-out-not-writable": (
        lambda t: ["hw", "calibrate", "--out", str(_write(t, "afile", "x") / "local.yaml")],
        "afile is a file",
    ),
    # every other command that reads a user's file, study or options
    "evaluate/plan-edited": (_edited_plan, "does not match the checksum"),
    "retarget/study-missing": (lambda t: ["retarget", *_no_study(t, "--out"), "--hw", "rpi"], "no study database"),
    "recover/study-missing": (lambda t: ["recover", *_no_study(t, "--out"), "--pareto"], "no study database"),
    "export/study-missing": (
        lambda t: ["export", *_no_study(t, "--studies"), "--out", str(t / "x"), "--pareto"],
        "no study database",
    ),
    "report/study-missing": (lambda t: ["report", *_no_study(t, "--studies"), "--out", str(t / "r")], "no study"),
    "dashboard/study-missing": (lambda t: ["dashboard", *_no_study(t, "--out")], "no study database"),
    "worker/option-missing": (lambda t: ["worker"], "Missing option '--study'"),
    "search/option-not-an-integer": (lambda t: _search(t, "--trials", "abc"), "Invalid value for '--trials'"),
    "llamacpp build/unknown-option": (lambda t: ["llamacpp", "build", "--jobs", "3"], "No such option"),
    "llamacpp where/extra-argument": (lambda t: ["llamacpp", "where", "bin"], "unexpected extra argument"),
    # --device: malformed, or a GPU this machine does not have (none on a CPU-only box, not 99 on any)
    "search/device-malformed": (lambda t: _search(t, "--device", "gpu"), "--device must be auto, cpu, cuda or cuda:N"),
    "search/device-absent-gpu": (lambda t: _search(t, "--device", "cuda:99"), "--device cuda:99"),
    "worker/device-malformed": (
        lambda t: ["worker", "--study", "x", "--storage", str(t / "s.log"), "--device", "cpu:1"],
        "--device must be",
    ),
    "apply/device-absent-gpu": (lambda t: [*_apply(t, lambda d: None), "--device", "cuda:99"], "--device cuda:99"),
    "evaluate/device-malformed": (lambda t: ["evaluate", "--device", "tpu"], "got 'tpu'"),
    "export/device-malformed": (
        lambda t: ["export", *_no_study(t, "--studies"), "--out", str(t / "x"), "--pareto", "--device", "mps"],
        "got 'mps'",
    ),
    "recover/device-absent-gpu": (
        lambda t: ["recover", *_no_study(t, "--out"), "--pareto", "--device", "cuda:99"],
        "--device cuda:99",
    ),
}


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case: str, tmp_path: Path, capsys) -> None:
    setup, fragment = CASES[case]
    argv = setup(tmp_path)
    command = case.split("/")[0].split()
    assert argv[: len(command)] == command, f"case {case!r} runs {argv[:2]}"  # the name says the command
    capsys.readouterr()
    before = _snapshot(tmp_path)
    code, out, err = run(argv, capsys)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in out + err
    assert _snapshot(tmp_path) == before  # nothing written, nothing touched
    assert not (tmp_path / "UNPICKLED").exists()  # the pickle was refused, never executed
    if argv[0] == "search" and case != "search/study-clash-other-space":
        assert not (tmp_path / "studies").exists()


def test_every_command_that_reads_user_input_has_a_case() -> None:
    """A new command (or one whose input was never tried bad) fails here until the catalogue covers it."""
    import typer

    from autocompress.cli import app

    def leaves(group, prefix=()):
        for name, cmd in group.commands.items():
            if hasattr(cmd, "commands"):
                yield from leaves(cmd, (*prefix, name))
            else:
                yield " ".join((*prefix, name))

    commands = set(leaves(typer.main.get_command(app))) - {"hw list"}  # hw list reads nothing of the user's
    assert {"search", "apply", "evaluate", "export", "hw show"} <= commands  # the walk found the commands
    covered = {case.split("/")[0] for case in CASES}
    assert commands <= covered, f"commands without a bad-input case: {sorted(commands - covered)}"


# ---- NaN during evaluation: that trial fails with the reason, the search goes on -----------------
def test_nan_during_evaluation_fails_the_trial_and_the_search_goes_on(tmp_path, capsys, monkeypatch) -> None:
    import torch

    from autocompress.workbench import Workbench

    real_apply = Workbench.apply

    def poisoned(self, plan, into=None, **kw):
        model = real_apply(self, plan, into=into, **kw)
        # the int8 baseline's trial; its MLP weights are the trial copy's own (share_base), not the base's
        if into is None and plan.provenance.trial == 1:
            with torch.no_grad():
                next(p for n, p in model.named_parameters() if "mlp" in n).fill_(float("nan"))
        return model

    monkeypatch.setattr(Workbench, "apply", poisoned)
    code, out, err = run(
        ["search", "--out", str(tmp_path), "--study", "n", "--trials", "4", "--full-eval", "0", *TINY], capsys
    )
    assert code == 0, err
    study = optuna.load_study(study_name="n", storage=f"sqlite:///{tmp_path / 'n' / 'study.db'}")
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert [t.number for t in failed] == [1]
    assert "NaN" in failed[0].user_attrs["fail_reason"]
    assert len([t for t in study.trials if t.state == TrialState.COMPLETE]) == 4
    assert "1 failed" in out
    assert not (tmp_path / "n" / "plans" / "1.yaml").exists()


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gpt2", "tiny-bert"])
def test_memory_guard_sees_the_same_shapes_as_loading(arch: str, tmp_path: Path) -> None:
    """The out-of-memory guard reads the config only; its anatomy must be the loaded model's."""
    from autocompress.model.loading import anatomy_from_config

    folder = _model_folder(tmp_path, arch)
    loaded = load_model(folder).anatomy.to_dict()
    assert anatomy_from_config(folder).to_dict() == {**loaded, "model_hash": ""}
