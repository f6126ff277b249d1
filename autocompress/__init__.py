"""autocompress: joint, per-layer, hardware-aware compression search for transformer models.

import autocompress as ac
result = ac.search(hw="jetson", budgets=ac.Budget(latency_ms=8))
best = result.pareto[0]; best.plan.save("plan.yaml"); model = ac.apply_plan(best.plan)
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from autocompress._version import __version__ as __version__

if TYPE_CHECKING:
    from torch import nn

    from autocompress.plan import Plan

# Public names, imported on first use so that `autocompress --help` stays fast.
_LAZY = {
    "search": "autocompress.search",
    "Budget": "autocompress.search",
    "SearchResult": "autocompress.search",
    "Candidate": "autocompress.search",
    "Plan": "autocompress.plan",
    "LayerChoice": "autocompress.plan",
    "BlockChoice": "autocompress.plan",
    "load_plan": "autocompress.plan",
    "load_model": "autocompress.model",
    "ModelAnatomy": "autocompress.model",
    "HardwareProfile": "autocompress.hardware",
    "CostModel": "autocompress.hardware",
    "load_profile": "autocompress.hardware",
    "list_profiles": "autocompress.hardware",
    "SearchSpace": "autocompress.space",
    "DataConfig": "autocompress.calib",
    "Workbench": "autocompress.workbench",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'autocompress' has no attribute {name!r}")


def apply_plan(plan: Plan | str | Path, model: str | Path | None = None, device: str | None = "auto") -> nn.Module:
    """Give the compressed model a plan describes, rebuilt from its base model (bit-identical on the
    CPU), on ``device`` (auto | cpu | cuda | cuda:N; bf16 on a GPU)."""
    from autocompress.plan import Plan
    from autocompress.recover import rebuild
    from autocompress.workbench import Workbench

    p = plan if isinstance(plan, Plan) else Plan.load(plan)
    return rebuild(Workbench.for_plan(p, model, device=device), p)


__all__ = [*sorted(_LAZY), "apply_plan"]
