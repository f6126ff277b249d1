"""Recovery: distil the base model back into a compressed one, within the plan's constraints.

``recover(wb, plan, model, settings)`` trains a model ``wb.apply(plan)`` gave and returns the plan
with its ``recovery`` settings recorded; ``replay(wb, plan, model)`` repeats that training
exactly, and ``rebuild(wb, plan)`` gives the model a plan describes (compressed, then its recorded
recovery replayed): callers that rebuild plans use it, ``Workbench.apply`` only compresses.
``autocompress.recover.study.recover_trials`` does it for trials of a finished study and adds the
results to the study as new candidates; it is left out of this package's names because it builds
on the search (which rebuilds recovered plans with ``rebuild``), so importing the package never
imports the search.
"""

from __future__ import annotations

from autocompress.recover.run import rebuild, recover, replay
from autocompress.recover.train import RecoveryError, RecoverySettings, StepInfo, distill

__all__ = ["RecoveryError", "RecoverySettings", "StepInfo", "distill", "rebuild", "recover", "replay"]
