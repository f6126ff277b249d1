"""Ctrl-C during a search: a clean stop with exit code 130, no trial left RUNNING, and the same
command resumes with every finished trial intact."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import optuna
from optuna.trial import TrialState

from tests.studyfile import finished_trials

TINY = ["--model", "tiny-llama", "--seq-len", "64", "--calib-tokens", "512", "--proxy-tokens", "128"]
TINY += ["--eval-tokens", "256"]


def _search(tmp):
    return ["search", "--out", str(tmp / "studies"), "--study", "c", *TINY]


def test_keyboard_interrupt_stops_cleanly_and_resumes(tmp_path) -> None:
    env = {**os.environ, "AUTOCOMPRESS_THREADS": "1"}
    cmd = [sys.executable, "-m", "autocompress.cli", *_search(tmp_path), "--trials", "40", "--full-eval", "0"]
    storage = f"sqlite:///{tmp_path / 'studies' / 'c' / 'study.db'}"
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.default_int_handler),  # as in a terminal
    )
    db = tmp_path / "studies" / "c" / "study.db"
    deadline = time.time() + 300
    while time.time() < deadline and finished_trials(db) < 3:  # read-only: never races the study's creation
        time.sleep(0.3)
        if proc.poll() is not None:
            raise AssertionError(
                f"the search ended (exit {proc.returncode}) before it could be interrupted: {proc.communicate()[1][-2000:]}"
            )
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    study = optuna.load_study(study_name="c", storage=storage)
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]
    before = {t.number: t.values for t in study.trials if t.state == TrialState.COMPLETE}
    assert len(before) >= 3
    for n in before:
        assert (tmp_path / "studies" / "c" / "plans" / f"{n}.yaml").is_file()
    cmd[cmd.index("40")] = str(len(before) + 2)
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    after = optuna.load_study(study_name="c", storage=storage).trials
    assert {t.number: t.values for t in after if t.number in before} == before
    assert len([t for t in after if t.state == TrialState.COMPLETE]) == len(before) + 2
