"""CLI output options: --json gives one JSON object on stdout for every command, --quiet and
--verbose change only the notes, every command's --help ends with examples, and the search
progress shows the current front size."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import typer

from autocompress.cli import app
from tests.test_cli import run

TINY = ["--model", "tiny-llama", "--seq-len", "64", "--calib-tokens", "512", "--proxy-tokens", "128"]
TINY += ["--eval-tokens", "256"]


def _commands(group: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = []
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            found += _commands(cmd, (*prefix, name))
        else:
            found.append((*prefix, name))
    return found


COMMANDS = _commands(typer.main.get_command(app))


def test_every_command_is_found() -> None:
    assert {("search",), ("apply",), ("evaluate",), ("hw", "list"), ("hw", "calibrate"), ("worker",)} <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_ends_with_runnable_looking_examples(command: tuple[str, ...], capsys) -> None:
    code, out, _ = run([*command, "--help"], capsys)
    assert code == 0
    examples = out.split("Examples:", 1)[1]
    assert f"autocompress {' '.join(command)}" in examples.replace("--json ", "").replace("--quiet ", "")


def test_json_of_hw_commands(capsys) -> None:
    code, out, _ = run(["--json", "hw", "list"], capsys)
    assert code == 0
    ids = [p["id"] for p in json.loads(out)["profiles"]]
    assert "jetson-orin-nano-25w" in ids and ids == sorted(ids)
    code, out, _ = run(["--json", "hw", "show", "rpi"], capsys)
    assert code == 0 and json.loads(out)["id"] == "raspberry-pi-5"


def test_json_error_is_an_object_on_stdout_and_one_line_on_stderr(capsys) -> None:
    code, out, err = run(["--json", "hw", "show", "nosuchdevice"], capsys)
    assert code == 2 and json.loads(out) == {"error": err.strip().removeprefix("error: "), "exit_code": 2}


def test_quiet_and_verbose_together_are_refused(capsys) -> None:
    code, _, err = run(["--quiet", "--verbose", "hw", "list"], capsys)
    assert code == 2 and "exclude each other" in err


def test_search_apply_evaluate_retarget_as_json_and_quiet(tmp_path: Path, capsys) -> None:
    studies = tmp_path / "studies"
    search = ["search", "--out", str(studies), "--study", "j", "--space", "quant-only", "--full-eval", "2", *TINY]
    code, out, err = run(["--json", *search, "--trials", "6"], capsys)
    assert code == 0, err
    result = json.loads(out)  # stdout is exactly one JSON object: no tables, notes or progress
    on_disk = json.loads((studies / "j" / "pareto.json").read_text())
    assert [c["plan_hash"] for c in result["pareto"]] == [c["plan_hash"] for c in on_disk["pareto"]]
    assert result["counts"]["evaluated"] == 6 and "loading model" in err  # notes went to stderr

    code, out, err = run(["--quiet", *search, "--trials", "7"], capsys)  # resumes the study
    assert code == 0, err
    assert "Pareto front" in out and "loading model" not in out + err  # results only: no notes
    assert "search ·" not in out + err  # no progress bar

    code, out, err = run(["--verbose", *search, "--trials", "7"], capsys)
    assert code == 0 and any(line.split("s · ")[0].strip().replace(".", "").isdigit() for line in out.splitlines())

    plan = result["pareto"][0]["plan_path"]
    code, out, err = run(["--json", "apply", plan, "--out", str(tmp_path / "m")], capsys)
    assert code == 0, err
    applied = json.loads(out)
    assert len(applied["weight_hash"]) == 64 and applied["out"] == str(tmp_path / "m")

    code, out, err = run(["--json", "evaluate", plan, "--hw", "rpi"], capsys)
    assert code == 0, err
    scored = json.loads(out)
    assert scored["kl"] >= 0 and scored["full"]["ppl"] > 1 and scored["cost"]["profile"] == "rpi"

    code, out, err = run(["--json", "retarget", "--study", "j", "--hw", "rpi", "--out", str(studies)], capsys)
    assert code == 0, err
    assert json.loads(out)["profile"] == "raspberry-pi-5"


def test_progress_shows_the_front_size(tmp_path: Path) -> None:
    from autocompress.calib import DataConfig
    from autocompress.search import search

    class Recorder:
        """Stands in for rich's Progress and keeps every description it is given."""

        def __init__(self) -> None:
            self.descriptions: list[str] = []

        def add_task(self, description: str, **_kw) -> int:
            self.descriptions.append(description)
            return len(self.descriptions)

        def update(self, _task: int, description: str | None = None, **_kw) -> None:
            if description:
                self.descriptions.append(description)

        def remove_task(self, _task: int) -> None:
            pass

    rec = Recorder()
    data = DataConfig(seq_len=64, calib_tokens=512, proxy_tokens=128, eval_tokens=256)
    result = search(
        model="tiny-llama", space="quant-only", trials=5, out=tmp_path, data=data, full_eval=0, progress=rec
    )
    fronts = [int(d.split("front ")[1].split()[0]) for d in rec.descriptions if "front " in d]
    assert len(fronts) == 5 and all(1 <= f <= n + 1 for n, f in enumerate(fronts))
    assert fronts[-1] == len(result.pareto)
