"""Study storage: open an Optuna storage, read a finished study, and check that a resumed study
was started with the same settings (model, data, space, profile, budgets, seed)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import optuna

from autocompress.errors import StudyError
from autocompress.search import heartbeat
from autocompress.search.budget import Budget
from autocompress.search.heartbeat import GRACE_S, HEARTBEAT_S
from autocompress.space import SearchSpace
from autocompress.workbench import Workbench


def quiet_optuna() -> None:
    """Keep Optuna's per-trial INFO lines off the console (called where a search or worker starts,
    not on import: importing autocompress changes no other library's settings)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def open_storage(storage: str | None, study_dir: Path) -> tuple[Any, str]:
    """Give an Optuna storage (SQLite in the study folder by default; a ``.log`` path is a journal file).

    Every command that opens a study comes through here, so Optuna's console lines are quieted here."""
    quiet_optuna()
    if storage is None:
        study_dir.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{study_dir / 'study.db'}"
    else:
        url = storage
    try:
        if url.endswith(".log") and "://" not in url:
            from optuna.storages.journal import JournalFileBackend, JournalStorage

            Path(url).parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(url)), url
        return optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S), url
    except Exception as exc:
        raise StudyError(f"cannot open storage {url!r}: {str(exc).splitlines()[0][:160]}") from None


def load_finished_study(study: str, out: str | Path, storage: str | None) -> tuple[optuna.Study, Path, str, dict]:
    """Open a study written by ``search`` without re-running anything: (study, its folder, storage URL, settings)."""
    study_dir = Path(out) / study
    if storage is None and not (study_dir / "study.db").is_file():
        raise StudyError(f"no study database at {study_dir / 'study.db'}; give --storage for another backend")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        st, url = open_storage(storage, study_dir)
    try:
        opt = optuna.load_study(study_name=study, storage=st)
    except KeyError:
        raise StudyError(f"study {study!r} not found in {url}") from None
    settings = opt.user_attrs.get("settings") or {}
    if "anatomy" not in settings:
        raise StudyError(f"study {study!r} was not written by this version of autocompress (no stored anatomy)")
    return opt, study_dir, url, settings


def study_settings(
    space: SearchSpace, wb: Workbench, profile_id: str, budget: Budget, seed: int, cost_scenario: dict
) -> dict:
    return {
        "model_hash": wb.lm.anatomy.model_hash,
        "model": wb.lm.anatomy.name,
        "data_hash": wb.data.data_hash,
        "space": space.name,
        "space_def": space.definition(),
        "profile": profile_id,
        "numerics": wb.numerics,  # the runtime's activation rounding the KL was measured with
        "budgets": budget.to_dict(),
        "seed": seed,
        "scenario": cost_scenario,
        "anatomy": wb.lm.anatomy.to_dict(),
    }


def check_resume(study: optuna.Study, settings: dict) -> bool:
    """Give True for a new study; for an existing one, insist on the same settings."""
    stored = study.user_attrs.get("settings")
    if stored is None:
        return True
    for key in ("model_hash", "data_hash", "space_def", "profile", "budgets", "seed", "scenario"):  # not "run"
        if stored.get(key) != settings[key]:
            what = {"space_def": "search space", "model_hash": "model", "data_hash": "data"}.get(key, key)
            was, now = (
                (stored.get("space"), settings["space"]) if key == "space_def" else (stored.get(key), settings[key])
            )
            if was == now:  # same space name, edited definition
                was, now = f"{was} as it was", f"{now} as it is now"
            raise StudyError(
                f"study {study.study_name!r} already exists with a different {what} "
                f"({was!r:.60} vs {now!r:.60}); use another --study name"
            )
    return False


def recover_interrupted(study: optuna.Study) -> int:
    """Fail the trials left RUNNING by a dead process (not those of live workers) and queue them again."""
    return heartbeat.recover(study)
