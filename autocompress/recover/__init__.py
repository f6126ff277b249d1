"""Recovery: distil the base model back into a compressed one, within the plan's constraints.

``recover(wb, plan, model, settings)`` trains a model ``wb.apply(plan)`` gave and returns the plan
with its ``recovery`` settings recorded; ``replay(wb, plan, model)`` repeats that training
exactly (``Workbench.apply`` calls it for plans that carry recovery); ``recover_trials`` does it
for trials of a finished study and adds the results to the study as new candidates.
"""

from __future__ import annotations

from autocompress.recover.run import recover, replay
from autocompress.recover.study import RecoveredTrial, recover_trials
from autocompress.recover.train import RecoveryError, RecoverySettings, StepInfo, distill

__all__ = [
    "RecoveredTrial",
    "RecoveryError",
    "RecoverySettings",
    "StepInfo",
    "distill",
    "recover",
    "recover_trials",
    "replay",
]
