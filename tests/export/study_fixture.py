"""A finished tiny study (tiny-llama, 8 trials, a latency budget that screens some plans out).

On the A100 torchao profile: its formats (int8 per channel, int4 g64 / g128) are the generic integer
grids the ONNX exporter writes exactly; GGUF plans are for the GGUF exporter."""

from __future__ import annotations

from pathlib import Path

from autocompress.search import Budget, search
from tests.conftest import TINY_DATA

STUDY = "tiny"
HW = "nvidia-a100-80gb"
LATENCY_BUDGET = 0.4  # ms on the A100: between the fastest (0.34) and the uncompressed (0.436) tiny-llama plans


_MADE: list[Path] = []  # one study per test session, shared by tests/export and tests/report


def make_tiny_study(root: Path) -> Path:
    """Run the search into ``root/tiny`` (once per session) and give the study folder."""
    if _MADE:
        return _MADE[0]
    search(
        model="tiny-llama",
        hw=HW,
        budgets=Budget(latency_ms=LATENCY_BUDGET),
        trials=8,
        study=STUDY,
        out=root,
        data=TINY_DATA,
        full_eval=4,
    )
    _MADE.append(root / STUDY)
    return root / STUDY
