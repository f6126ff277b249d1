"""The two races the kill tests hit now and then, made to happen every time.

- SIGKILL inside ``study.ask()``: the trial exists (RUNNING) before ``ask`` returns it; it must
  carry its owner from that write, so a resumed run fails and re-queues it at once instead of
  waiting out the grace period (the resumed run was shorter than that, and ended with it RUNNING).
- Ctrl-C inside ``study.ask()``: the KeyboardInterrupt must not leave that trial RUNNING.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import optuna
import pytest
from optuna.trial import TrialState

from autocompress.search import heartbeat
from autocompress.search.interrupt import InterruptGate
from tests.conftest import TINY_DATA


@pytest.fixture(autouse=True)
def _ctrl_c_raises():
    """Ctrl-C raises KeyboardInterrupt here, as in a terminal: a process started in the background
    by a non-interactive shell inherits SIGINT ignored, and there the gate (by design) stays out of
    the way, so these tests would test nothing. The inherited disposition is put back after."""
    before = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


# A process that dies (SIGKILL, no cleanup) inside ask(), after the trial was written RUNNING.
_DIE_INSIDE_ASK = textwrap.dedent(
    """
    import os, signal, sys
    import optuna
    from autocompress.search import heartbeat

    class DiesInsideAsk(optuna.samplers.RandomSampler):
        def before_trial(self, study, trial):
            os.kill(os.getpid(), signal.SIGKILL)

    study = optuna.load_study(study_name="k", storage=sys.argv[1], sampler=DiesInsideAsk())
    heartbeat.claim_at_creation(study)
    study.ask()
    """
)


@pytest.mark.parametrize("queued", [False, True], ids=["new-trial", "queued-trial"])
def test_a_process_killed_inside_ask_leaves_a_trial_recovered_at_once(tmp_path, queued):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="k", storage=storage)
    if queued:
        study.enqueue_trial({"x": 1.0})
    proc = subprocess.Popen([sys.executable, "-c", _DIE_INSIDE_ASK, storage], stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, err
    (left,) = study.get_trials(states=(TrialState.RUNNING,))
    assert str(left.system_attrs.get(heartbeat.OWNER)).endswith(f":{proc.pid}")  # owned by the dead process
    assert heartbeat.recover(study) == 1  # at once: no grace period to wait out
    assert not study.get_trials(states=(TrialState.RUNNING,))
    assert [t.state for t in study.trials].count(TrialState.FAIL) == 1


def test_the_gate_holds_sigint_back_until_it_opens():
    gate = InterruptGate()
    reached = []
    with pytest.raises(KeyboardInterrupt), gate.shut():
        signal.raise_signal(signal.SIGINT)
        reached.append("after the signal, inside the shut gate")
    assert reached
    with pytest.raises(KeyboardInterrupt), gate.shut():
        signal.raise_signal(signal.SIGINT)
        with gate.open():  # the recorded Ctrl-C is raised on opening
            reached.append("never")
    assert reached == ["after the signal, inside the shut gate"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_inside_ask_leaves_no_trial_running(tmp_path, monkeypatch):
    from autocompress.search import search

    real_ask = optuna.Study.ask
    calls = []

    def ask_then_ctrl_c(self, *args, **kwargs):
        trial = real_ask(self, *args, **kwargs)
        calls.append(trial.number)
        if len(calls) == 3:  # the trial is RUNNING in the storage; ask has not returned it yet
            signal.raise_signal(signal.SIGINT)
        return trial

    monkeypatch.setattr(optuna.Study, "ask", ask_then_ctrl_c)
    monkeypatch.setenv("AUTOCOMPRESS_THREADS", "1")
    with pytest.raises(KeyboardInterrupt):
        search(model="tiny-llama", trials=10, study="c", out=tmp_path, data=TINY_DATA, full_eval=0)
    study = optuna.load_study(study_name="c", storage=f"sqlite:///{tmp_path / 'c' / 'study.db'}")
    assert len(calls) == 3
    assert not study.get_trials(states=(TrialState.RUNNING,)), "Ctrl-C inside ask left its trial RUNNING"
