"""Stale-trial recovery: fail and re-queue only the trials whose process is gone.

Several processes (``--jobs``, ``autocompress worker`` on other machines) may hold RUNNING trials of
one study, so a process that starts or resumes must not fail them all. A RUNNING trial is stale when

- its owner (host and pid, stored when it was asked) runs on this host and that pid is gone — a
  killed run is recovered at once, on any storage; or
- the storage keeps Optuna heartbeats (RDB storages: SQLite, PostgreSQL, MySQL) and the trial's last
  heartbeat is older than the grace period (``optuna.storages.fail_stale_trials``): a worker on
  another machine that died; or
- it has had no owner for longer than the grace period (asked by an older version, or killed
  between ask and the owner write).

Journal files keep no heartbeats (Optuna offers them for RDB storages only): a trial of a dead
worker on another host stays RUNNING until a search or worker on that host starts again.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import threading
import time
import warnings

import optuna
from optuna.trial import FrozenTrial, TrialState

HEARTBEAT_S = int(os.environ.get("AUTOCOMPRESS_HEARTBEAT_S", "10"))  # Optuna wants whole seconds
GRACE_S = int(os.environ.get("AUTOCOMPRESS_GRACE_S", "60"))  # no beat for this long: the worker is gone
OWNER = "autocompress:owner"  # trial system attr: "host:pid" of the process that asked the trial
KEPT_ATTRS = ("baseline", "seed")  # user attrs a re-queued trial keeps
# Optuna beats only inside Study.optimize and warns on every ask; our ask/tell loop beats itself.
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")


def owner_tag() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def claim_at_creation(study: optuna.Study) -> None:
    """Make the trials this process's ``study.ask()`` starts carry their owner from the write that starts them.

    ``ask`` writes a trial RUNNING, then runs the sampler, and only then returns it to be claimed: a
    process killed in that gap left a trial with no owner, which looked like a live worker's for the
    whole grace period (and stayed RUNNING past the end of a short resumed run). New trials are now
    created with the owner in the same write; a queued trial ``ask`` pops is claimed by the next
    write, before the sampler runs.
    """
    storage = study._storage
    if getattr(storage, "_autocompress_claims", False):
        return
    create, set_state = storage.create_new_trial, storage.set_trial_state_values

    def create_new_trial(study_id: int, template_trial: FrozenTrial | None = None) -> int:
        if template_trial is None:  # a trial ask() starts (enqueue_trial passes a WAITING template)
            template_trial = FrozenTrial(
                number=-1,
                state=TrialState.RUNNING,
                value=None,
                datetime_start=datetime.datetime.now(),
                datetime_complete=None,
                params={},
                distributions={},
                user_attrs={},
                system_attrs={OWNER: owner_tag()},
                intermediate_values={},
                trial_id=-1,
            )
        return create(study_id, template_trial)

    def set_trial_state_values(trial_id: int, state: TrialState, values: object = None) -> bool:
        started = set_state(trial_id, state=state, values=values)
        if started and state == TrialState.RUNNING:  # ask() popped a queued trial
            storage.set_trial_system_attr(trial_id, OWNER, owner_tag())
        return started

    storage.create_new_trial = create_new_trial
    storage.set_trial_state_values = set_trial_state_values
    storage._autocompress_claims = True


def heartbeat_enabled(storage: object) -> bool:
    """Whether a storage records Optuna heartbeats (an RDB storage opened with an interval)."""
    get = getattr(storage, "get_heartbeat_interval", None)
    return get is not None and get() is not None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _locally_dead(t: FrozenTrial) -> bool:
    owner = t.system_attrs.get(OWNER)
    if owner is None:  # not claimed: stale unless just asked (its owner may be about to write)
        start = t.datetime_start
        return start is None or (datetime.datetime.now() - start).total_seconds() > GRACE_S
    host, _, pid = str(owner).rpartition(":")
    return host == socket.gethostname() and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid))


def _requeue(study: optuna.Study, t: FrozenTrial) -> None:
    study.enqueue_trial(t.params, user_attrs={k: v for k, v in t.user_attrs.items() if k in KEPT_ATTRS})


def recover(study: optuna.Study) -> int:
    """Fail the study's stale RUNNING trials and queue their parameters again; give how many."""
    n = 0
    storage = study._storage
    if heartbeat_enabled(storage):
        running = {t._trial_id: t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
            if t._trial_id in running:  # failed by Optuna (no heartbeat for the grace period)
                _requeue(study, running[t._trial_id])
                n += 1
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not _locally_dead(t):
            continue
        try:
            storage.set_trial_user_attr(t._trial_id, "fail_reason", "interrupted (its process is gone)")
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # its process finished it after all (a race with a slow writer)
        _requeue(study, t)
        n += 1
    return n


class Heartbeat:
    """Marks this process's trials as its own and keeps their Optuna heartbeat fresh (RDB storages),
    so other processes can tell a live trial from a stale one; checks for stale trials now and then."""

    def __init__(self, study: optuna.Study, check_every_s: float = GRACE_S) -> None:
        self.study = study
        claim_at_creation(study)
        self.storage = study._storage
        self.enabled = heartbeat_enabled(self.storage)
        self.check_every_s = check_every_s
        self.last_check = time.time()
        self.trial_id: int | None = None
        self.stop_event = threading.Event()
        self.thread: threading.Thread | None = None
        if self.enabled:
            self.thread = threading.Thread(target=self._beat, name="autocompress-heartbeat", daemon=True)
            self.thread.start()

    def _beat(self) -> None:
        interval = self.storage.get_heartbeat_interval()
        while not self.stop_event.wait(interval):
            tid = self.trial_id
            if tid is not None:
                with contextlib.suppress(Exception):  # a transient database error: the next beat retries
                    self.storage.record_heartbeat(tid)

    def track(self, trial: optuna.Trial) -> None:
        """Call right after ``ask``: own the trial, beat for it, and recover stale trials of others
        every ``check_every_s`` seconds (as Optuna's own optimize loop does before each trial)."""
        self.storage.set_trial_system_attr(trial._trial_id, OWNER, owner_tag())
        self.trial_id = trial._trial_id
        if self.enabled:
            self.storage.record_heartbeat(trial._trial_id)
        if time.time() - self.last_check >= self.check_every_s:
            self.last_check = time.time()
            recover(self.study)

    def stop(self) -> None:
        self.stop_event.set()
        self.trial_id = None
