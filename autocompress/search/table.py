"""The sensitivity table a search screens and seeds with: each knob level on each unit alone,
KL on a slice of the held-out proxy set, built once and cached."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from autocompress._io import cache_dir
from autocompress.compress.numerics import attach
from autocompress.device import cache_tag
from autocompress.evaluate.sensitivity import SensitivityTable, build_sensitivity
from autocompress.plan import Plan
from autocompress.space import SearchSpace, SpaceContext
from autocompress.workbench import Workbench

SENSITIVITY_SHAPE = (1, 128)  # sequences × tokens of the held-out proxy set used for the table


def sensitivity_table(
    wb: Workbench, space: SearchSpace, ctx: SpaceContext, progress: Any, say: Callable[[str], None]
) -> SensitivityTable | None:
    """Build (or read from the cache) the sensitivity table; None for model-wide spaces."""
    if space.granularity == "model":
        return None
    n, length = SENSITIVITY_SHAPE
    tokens = wb.data.proxy[:n, :length]
    task = progress.add_task("sensitivity table", total=None) if progress else None

    def tick(done: int, total: int) -> None:
        if progress:
            progress.update(task, completed=done, total=total)

    say(f"sensitivity table: each knob level on each unit alone, KL on {int(tokens.numel())} held-out tokens")

    def probe(m: Any, p: Plan) -> Any:  # a probe is discarded after its forward, hooks and all
        model = wb.apply(p, into=m)
        attach(model, wb.lm.anatomy, p, wb.numerics)
        return model

    tag = cache_tag(wb.lm.model)  # a table measured in bf16 (on a GPU) is kept apart from the float32 ones
    root = cache_dir() / f"device{tag}" if tag else cache_dir()
    table = build_sensitivity(wb.lm.model, probe, space, ctx, tokens, root, tick, numerics=wb.numerics)
    if progress:
        progress.remove_task(task)
    return table
