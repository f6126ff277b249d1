"""``--sampler evo``: level-switch evolution at fixed predicted-cost targets (after EvoPress).

The knapsack (``seeding.Knapsack``) gives every unit's levels with the KL each costs alone in the
sensitivity table and the latency / memory it saves alone (the cost model is additive over units).
The sampler spreads ``targets`` latency savings along the part of the front that costs KL, adds
the savings of ``anchors`` (the llama.cpp recipes' predicted cost in a llama.cpp study, so each recipe
is attacked at its own cost), and works on them in turn: trial
``n`` serves target ``n % targets``. For its target it takes as parent the evaluated plan with the
least measured KL that saves at least the target (the knapsack's own plan before any is
evaluated), draws ``offspring`` mutants, each a few level switches between two units (one unit
moves to another level, a second unit takes the level that brings the saving back to just above
the target, so the predicted cost stays at the target), screens them by the cost model (budgets,
target) and by the table's additive KL, and proposes the best one not evaluated yet. The measured
KL then decides whether it becomes the parent: elitist, and everything it needs is in the study's
trials, so resume and workers need no state of their own. Structure knobs (heads, MLP width,
depth) are inherited from the parent unchanged.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.samplers import BaseSampler, RandomSampler
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState

from autocompress.search.seeding import Knapsack, undominated

TARGETS = 8  # cost targets spread along the front
OFFSPRING = 32  # mutants drawn per proposal; the table keeps the best
TOL = 1e-9


class EvoSampler(BaseSampler):
    """Proposes plans by level-switch mutation of the best plan at each cost target; see the module."""

    def __init__(
        self,
        knapsack: Knapsack,
        seed: int = 0,
        targets: int = TARGETS,
        offspring: int = OFFSPRING,
        anchors: Sequence[float] = (),
    ) -> None:
        self.ks = knapsack
        self.seed = seed
        self.offspring = offspring
        units = knapsack.units
        self._levels = [undominated(opts) for opts in units]
        self._lat = [[o.latency_saved_ms for o in opts] for opts in units]
        self._mem = [[o.memory_saved_mb for o in opts] for opts in units]
        self._kl = [[o.kl for o in opts] for opts in units]
        # Targets spread over the savings that cost KL: what the table prices at no KL at all (a
        # base whose own grid is a level, e.g. Q4_1 for a dequantized Q4_1 model) needs no search.
        free = max((a.latency_saved_ms for a in knapsack.front if a.kl <= 0.0), default=0.0)
        lo = max(free, knapsack.min_saving_ms)
        goals = [lo + (i + 0.5) / targets * (knapsack.max_saving_ms - lo) for i in range(targets)]
        # ``anchors``: savings of plans to beat at equal cost (llama.cpp's recipes), targets of their own
        goals += [a for a in anchors if lo < a <= knapsack.max_saving_ms]
        self.targets = sorted(set(goals))
        self._unit_keys = {k for opts in units for o in opts for k in o.params}
        self._choice_cache: dict[int, tuple[int, ...] | None] = {}
        self._proposals: dict[int, dict[str, Any]] = {}
        self.worked_at: dict[int, float] = {}  # trial number -> the target its proposal holds (this process's)
        self._fallback = RandomSampler(seed=seed)

    # ---- Optuna's sampler interface ------------------------------------------------------------
    def reseed_rng(self) -> None:
        self._fallback.reseed_rng()

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return {}  # every value is served per parameter from the trial's proposal

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return {}

    def sample_independent(
        self, study: Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        if trial.number not in self._proposals:
            self._proposals = {trial.number: self.propose(study, trial.number)}  # one trial at a time per process
        value = self._proposals[trial.number].get(param_name)
        if isinstance(param_distribution, CategoricalDistribution) and value in param_distribution.choices:
            return value
        return self._fallback.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None) -> None:
        self._proposals.pop(trial.number, None)

    # ---- the evolution -------------------------------------------------------------------------
    def target_of(self, number: int) -> float:
        """Give the latency saving (ms) trial ``number`` works at."""
        return self.targets[number % len(self.targets)]

    def saving(self, choice: Sequence[int]) -> float:
        return sum(lat[k] for lat, k in zip(self._lat, choice, strict=True))

    def predicted_kl(self, choice: Sequence[int]) -> float:
        return sum(kl[k] for kl, k in zip(self._kl, choice, strict=True))

    def _meets(self, choice: Sequence[int], target: float) -> bool:
        if self.saving(choice) < target - TOL:
            return False
        need = self.ks.min_memory_saving_mb
        return need is None or sum(m[k] for m, k in zip(self._mem, choice, strict=True)) >= need - TOL

    def choice_of(self, trial: FrozenTrial) -> tuple[int, ...] | None:
        """Give the level index per unit a trial's parameters stand for (None if some unit's is unknown)."""
        if trial.number in self._choice_cache:
            return self._choice_cache[trial.number]
        out: list[int] | None = []
        for opts in self.ks.units:
            k = next(
                (i for i, o in enumerate(opts) if all(trial.params.get(p) == v for p, v in o.params.items())), None
            )
            if k is None:
                out = None
                break
            out.append(k)
        result = tuple(out) if out is not None else None
        if trial.state.is_finished():
            self._choice_cache[trial.number] = result
        return result

    def parent(self, trials: list[FrozenTrial], target: float) -> tuple[tuple[int, ...], dict[str, Any]]:
        """Give the parent at ``target``: the evaluated plan of least measured KL saving at least the
        target (its level per unit and its other parameters); the knapsack's plan before any is."""
        best: tuple[float, tuple[int, ...], dict[str, Any]] | None = None
        for t in trials:
            if t.state != TrialState.COMPLETE or not t.values:
                continue
            c = self.choice_of(t)
            if c is None or not self._meets(c, target):
                continue
            if best is None or t.values[0] < best[0]:
                best = (t.values[0], c, {k: v for k, v in t.params.items() if k not in self._unit_keys})
        if best is not None:
            return best[1], best[2]
        a = self.ks.at(target / self.ks.max_saving_ms) if self.ks.max_saving_ms > 0 else None
        if a is None:
            a = self.ks.front[0]
        return a.choice, {}

    def mutate(self, choice: Sequence[int], target: float, rng: random.Random) -> tuple[int, ...]:
        """Give ``choice`` after one to three level switches between two units, each keeping the
        saving at or just above ``target`` where the second unit has a level that does."""
        c = list(choice)
        movable = [u for u, lv in enumerate(self._levels) if len(lv) > 1]
        if not movable:
            return tuple(c)
        for _ in range(1 + (rng.random() < 0.5) + (rng.random() < 0.25)):
            u = rng.choice(movable)
            c[u] = rng.choice([k for k in self._levels[u] if k != c[u]])
            others = [v for v in movable if v != u]
            if not others:
                break
            v = rng.choice(others)
            rest = self.saving(c) - self._lat[v][c[v]]
            ok = [k for k in self._levels[v] if rest + self._lat[v][k] >= target - TOL]
            if ok:
                c[v] = min(ok, key=lambda k: (self._lat[v][k], self._kl[v][k]))  # just above the target
        return tuple(c)

    def propose(self, study: Study, number: int) -> dict[str, Any]:
        """Give the parameters trial ``number`` evaluates (deterministic in the study's trials and the
        seed). A target whose mutants were all evaluated already passes the trial to the next one."""
        trials = study.get_trials(deepcopy=False)
        taken = {c for t in trials if t.number != number and (c := self.choice_of(t)) is not None}
        rng = random.Random(self.seed * 1_000_003 + number)
        first = None
        for step in range(len(self.targets)):
            target = self.target_of(number + step)
            parent, other = self.parent(trials, target)
            mutants = {self.mutate(parent, target, rng) for _ in range(self.offspring)}
            fit = [m for m in mutants if m not in taken and self._meets(m, target)]
            first = first or (target, parent, other, [m for m in mutants if m not in taken] or [parent])
            if fit:
                break
        else:
            target, parent, other, fit = first  # every target exhausted here: the nearest plan not tried
        best = min(fit, key=lambda m: (self.predicted_kl(m), -self.saving(m), m))
        self.worked_at[number] = target
        params = {**self.ks.base_params, **other}
        for opts, k in zip(self.ks.units, best, strict=True):
            params.update(opts[k].params)
        return params
