"""Crash safety: a search killed with SIGKILL mid-run resumes with every finished trial intact."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from tests.studyfile import finished_trials

ARGS = [
    "search", "--model", "tiny-llama", "--seq-len", "64", "--calib-tokens", "512", "--proxy-tokens", "128",
    "--eval-tokens", "256", "--study", "k", "--full-eval", "2",
]  # fmt: skip


def _cmd(out, trials, storage=None):
    extra = ["--storage", storage] if storage else []
    return [sys.executable, "-m", "autocompress.cli", *ARGS, "--out", str(out), "--trials", str(trials), *extra]


def _load(storage):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name="k", storage=storage)


def _kill_after(cmd, db, n_complete, env, log=None):
    """Run ``cmd`` and SIGKILL it once the study file ``db`` holds ``n_complete`` finished trials; its stderr goes to ``log``."""
    err = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 (closed below, after the kill)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            time.sleep(0.5)
            if proc.poll() is not None:  # say why: an early exit once went unexplained (stderr was discarded)
                tail = Path(log).read_text()[-2000:] if log else ""
                raise AssertionError(f"the search ended (exit {proc.returncode}) before it could be killed:\n{tail}")
            if finished_trials(db) >= n_complete:
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if log:
            err.close()


def test_sigkill_then_resume_keeps_finished_trials(tmp_path):
    env = {**os.environ, "AUTOCOMPRESS_THREADS": "1"}
    db = tmp_path / "k" / "study.db"
    storage = f"sqlite:///{db}"
    _kill_after(_cmd(tmp_path, 40), db, 6, env, log=tmp_path / "killed.stderr")
    before = {t.number: (t.values, t.params) for t in _load(storage).trials if t.state == TrialState.COMPLETE}
    assert len(before) >= 6
    subprocess.run(_cmd(tmp_path, 40), check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    after = _load(storage).trials
    assert {t.number: (t.values, t.params) for t in after if t.number in before} == before
    assert len([t for t in after if t.state == TrialState.COMPLETE]) == 40
    assert not [t for t in after if t.state == TrialState.RUNNING]
    assert (tmp_path / "k" / "pareto.json").is_file()


def test_journal_file_storage(tmp_path):
    journal = str(tmp_path / "j" / "study.log")
    subprocess.run(_cmd(tmp_path, 6, journal), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    study = _load(JournalStorage(JournalFileBackend(journal)))
    assert len([t for t in study.trials if t.state == TrialState.COMPLETE]) == 6


def test_two_workers_share_one_study(tmp_path):
    storage = f"sqlite:///{tmp_path / 'k' / 'study.db'}"
    cmd = [*_cmd(tmp_path, 100), "--jobs", "2"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    trials = _load(storage).trials
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert 100 <= len(complete) <= 101  # the second worker may finish one trial past the target
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert len({t.user_attrs["pid"] for t in complete}) == 2  # both processes evaluated trials (start-up ≈ 5 s)
    assert (tmp_path / "k" / "pareto.json").is_file()
    for t in complete:
        assert (tmp_path / "k" / "plans" / f"{t.number}.yaml").is_file()


def test_two_workers_on_postgresql(tmp_path, postgres_url):
    cmd = [*_cmd(tmp_path, 100, postgres_url), "--jobs", "2"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    trials = _load(postgres_url).trials
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert 100 <= len(complete) <= 101
    assert len({t.user_attrs["pid"] for t in complete}) == 2


def test_two_workers_on_a_journal_file(tmp_path):
    journal = str(tmp_path / "j" / "study.log")
    cmd = [*_cmd(tmp_path, 100, journal), "--jobs", "2"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    trials = _load(JournalStorage(JournalFileBackend(journal))).trials
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers)) and numbers == list(range(len(numbers)))  # none lost or doubled
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert 100 <= len(complete) <= 101
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert len({t.user_attrs["pid"] for t in complete}) == 2
    # one plan per distinct proposal (a llama.cpp recipe evaluated as a fixed plan shares its parameters,
    # the nearest uniform setting, with that setting's own trial)
    proposals = {
        (tuple(sorted(t.params.items())), t.user_attrs.get("fixed_plan") and t.user_attrs["baseline"]) for t in complete
    }
    assert len({t.user_attrs["plan_hash"] for t in complete}) == len(proposals)


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _running(study, owner):
    from autocompress.search.heartbeat import OWNER

    trial = study.ask()
    trial.suggest_float("x", 0, 1)
    if owner is not None:
        study._storage.set_trial_system_attr(trial._trial_id, OWNER, owner)
    return trial


def _states(study):
    return {t.number: t.state for t in study.trials}


def test_only_stale_trials_are_failed_and_requeued_rdb(tmp_path):
    import socket

    from autocompress.search.heartbeat import Heartbeat, recover

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'h.db'}", heartbeat_interval=1, grace_period=2)
    study = optuna.create_study(storage=storage)
    host = socket.gethostname()
    gone = _running(study, "other-machine:4242")  # a remote worker that stopped beating
    storage.record_heartbeat(gone._trial_id)
    live = _running(study, None)
    beat = Heartbeat(study)
    beat.track(live)  # this process: owner set, beating every second
    killed = _running(study, f"{host}:{_dead_pid()}")  # a local process that was killed
    remote_live = _running(study, "other-machine:4343")
    time.sleep(3.5)
    storage.record_heartbeat(remote_live._trial_id)  # still beating
    assert recover(study) == 2
    beat.stop()
    states = _states(study)
    assert states[gone.number] == states[killed.number] == TrialState.FAIL
    assert states[live.number] == states[remote_live.number] == TrialState.RUNNING
    waiting = [t for t in study.trials if t.state == TrialState.WAITING]
    assert len(waiting) == 2  # re-queued with the same parameters
    assert recover(study) == 0  # nothing twice


def test_only_stale_trials_are_failed_on_a_journal_file(tmp_path):
    import os
    import socket

    from optuna.storages.journal import JournalFileBackend, JournalStorage

    from autocompress.search.heartbeat import recover

    study = optuna.create_study(storage=JournalStorage(JournalFileBackend(str(tmp_path / "j.log"))))
    host = socket.gethostname()
    killed = _running(study, f"{host}:{_dead_pid()}")
    mine = _running(study, f"{host}:{os.getpid()}")
    other_local = _running(study, f"{host}:{os.getppid()}")  # a live process on this host
    remote = _running(study, "other-machine:4242")  # no heartbeats on a journal: left alone
    fresh = _running(study, None)  # just asked, owner not written yet
    assert recover(study) == 1
    states = _states(study)
    assert states[killed.number] == TrialState.FAIL
    assert all(states[t.number] == TrialState.RUNNING for t in (mine, other_local, remote, fresh))
    assert study.trials[killed.number].user_attrs["fail_reason"].startswith("interrupted")
