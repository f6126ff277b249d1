"""A finished tiny study (tiny-llama, 8 trials, a latency budget that screens some plans out)."""

from __future__ import annotations

from pathlib import Path

from autocompress.search import Budget, search
from tests.conftest import TINY_DATA

STUDY = "tiny"
LATENCY_BUDGET = 0.994  # ms on jetson: between the fastest and the uncompressed tiny-llama plans


_MADE: list[Path] = []  # one study per test session, shared by tests/export and tests/report


def make_tiny_study(root: Path) -> Path:
    """Run the search into ``root/tiny`` (once per session) and give the study folder."""
    if _MADE:
        return _MADE[0]
    search(
        model="tiny-llama",
        hw="jetson",
        budgets=Budget(latency_ms=LATENCY_BUDGET),
        trials=8,
        study=STUDY,
        out=root,
        data=TINY_DATA,
        full_eval=4,
    )
    _MADE.append(root / STUDY)
    return root / STUDY
