"""Reading a study's SQLite file while a search process writes it (the process-kill tests)."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path


def finished_trials(db: Path) -> int:
    """Give the finished trials in the study file, read without writing: opening the storage through Optuna
    creates its tables, and racing the search that creates them failed it ('table ... already exists')."""
    if not db.is_file():
        return 0
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
        try:
            return con.execute("SELECT count(*) FROM trials WHERE state = 'COMPLETE'").fetchone()[0]
        except sqlite3.OperationalError:  # no tables yet, or a write in progress
            return 0
