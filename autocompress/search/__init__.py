"""The search: Optuna study, budgets, Pareto extraction, outputs."""

import sys
import types

from autocompress.search.budget import BUDGET_KEYS, Budget
from autocompress.search.engine import SAMPLERS, search
from autocompress.search.pareto import dominates, pareto_front
from autocompress.search.result import Candidate, SearchResult

__all__ = ["BUDGET_KEYS", "SAMPLERS", "Budget", "Candidate", "SearchResult", "dominates", "pareto_front", "search"]


class _CallableModule(types.ModuleType):
    """``autocompress.search`` is both this package and the public function ``ac.search``.

    Importing the package binds it as the attribute ``search`` of ``autocompress``, which would
    hide the function behind it; calling the package runs the search, so ``ac.search(...)`` works
    whichever of the two the name holds.
    """

    def __call__(self, *args, **kwargs) -> SearchResult:
        return search(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
