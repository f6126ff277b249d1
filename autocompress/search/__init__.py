"""The search: Optuna study, budgets, Pareto extraction, outputs."""

from autocompress.search.budget import BUDGET_KEYS, Budget
from autocompress.search.engine import SAMPLERS, search
from autocompress.search.pareto import dominates, pareto_front
from autocompress.search.result import Candidate, SearchResult

__all__ = ["BUDGET_KEYS", "SAMPLERS", "Budget", "Candidate", "SearchResult", "dominates", "pareto_front", "search"]
