"""Seeding the search: an exact multiple-choice knapsack over the sensitivity table.

Each unit of the space (the token embedding / head table, a block's attention or MLP linears)
picks one combination of its knob levels; the table gives the KL each costs alone, the cost model
the latency and memory it saves alone. The knapsack keeps every assignment that no other beats on
all three of summed KL, summed latency saving and summed memory saving (an exact Pareto-set
dynamic programme on the savings themselves: nothing is rounded to bins, so two levels that save
different amounts stay different). A latency-saving target then reads the least-KL assignment off
that set; with a memory budget only assignments that meet it count.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from autocompress import formats
from autocompress.errors import PlanError
from autocompress.evaluate.sensitivity import SensitivityTable, choice_parts, table_key
from autocompress.hardware import CostModel
from autocompress.search.budget import Budget
from autocompress.space import EMBEDDING_PARAM, EMBEDDING_UNIT, SearchSpace, SpaceContext, layer_choice

TARGETS = (0.3, 0.5, 0.7, 0.85, 0.95)  # fractions of the largest latency saving, enqueued as seeds
DENSE_TARGETS = 32  # targets the evolutionary proposer and the benchmark's knapsack arm spread along the front


@dataclass(frozen=True)
class Seed:
    """A plan the search evaluates before proposing its own: its kind (``baseline`` or ``seed``), name
    and trial parameters. A fixed seed also carries ``plan`` (``Plan.to_dict``): a plan the space cannot
    express (a llama.cpp recipe's per-tensor types in a per-block space) evaluated as it is, while
    ``params``, its nearest expression in the space, is what the sampler is told."""

    kind: str
    name: str
    params: dict[str, Any] = field(hash=False)
    plan: dict[str, Any] | None = field(default=None, hash=False, compare=False)

    def to_list(self) -> list[Any]:
        return [self.kind, self.name, self.params] + ([self.plan] if self.plan is not None else [])

    @classmethod
    def from_list(cls, item: Sequence[Any]) -> Seed:
        kind, name, params, *plan = item
        return cls(str(kind), str(name), dict(params), dict(plan[0]) if plan else None)


@dataclass(frozen=True)
class Option:
    """One level of one unit: its trial parameters, KL alone, and what it saves alone."""

    params: dict[str, Any] = field(hash=False)
    kl: float
    latency_saved_ms: float
    memory_saved_mb: float
    label: str  # the layer choice it stands for (readable; distinct within a unit)


@dataclass(frozen=True)
class Allocation:
    """One assignment of an option to every unit, with its summed KL and savings."""

    kl: float
    latency_saved_ms: float
    memory_saved_mb: float
    choice: tuple[int, ...]  # option index per unit


def unit_options(
    space: SearchSpace, ctx: SpaceContext, table: SensitivityTable, cost_model: CostModel
) -> list[list[Option]]:
    """Give, per unit, its measured options that save latency and memory (the unit's no-op always)."""
    base_params = space.uniform_params(ctx.anatomy, {})
    base_plan = replace(space.plan_from_params(base_params or {}, ctx), layers={}, blocks={}, drop_blocks=())
    base = cost_model.predict(base_plan)

    def option(params: dict[str, Any], choice: Any, kl: float, layers: dict[str, Any]) -> Option | None:
        cost = cost_model.predict(replace(base_plan, layers=layers))
        saved_ms, saved_mb = base.latency_ms - cost.latency_ms, base.memory_mb - cost.memory_mb
        if choice.is_identity:
            return Option(params, kl, 0.0, 0.0, repr(choice))
        if not math.isfinite(kl) or saved_ms < 0 or saved_mb < 0:
            return None  # a level that costs more than the base is no saving to allocate
        return Option(params, kl, saved_ms, saved_mb, repr(choice))

    units: list[list[Option]] = []
    emb_sites = [e.name for e in ctx.anatomy.embeddings]
    emb: list[Option] = []
    for lvl, choice in space.embedding_choices(ctx.anatomy):  # the embedding / head table: one unit
        kl = sum(table.entries.get(table_key(EMBEDDING_UNIT, p), math.inf) for p in choice_parts(choice))
        opt = option({EMBEDDING_PARAM: lvl}, choice, kl, dict.fromkeys(emb_sites, choice))
        if opt is not None:
            emb.append(opt)
    if len(emb) > 1:
        units.append(emb)
    for u in space.units(ctx.anatomy):
        lv = space.unit_levels(u.group, u.linears, ctx.anatomy)
        options: dict[str, Option] = {}
        for combo in itertools.product(*lv.values()):
            setting = dict(zip(lv, combo, strict=True))
            try:
                choice = layer_choice(setting)
            except PlanError:
                continue
            if repr(choice) in options:
                continue  # e.g. group sizes that do not apply to 8-bit
            kl = sum(table.entries.get(table_key(u, p), math.inf) for p in choice_parts(choice))
            params = {u.param(k): v for k, v in setting.items() if len(lv[k]) > 1}
            if choice.bits > 4:
                params.pop(u.param("group_size"), None)
            opt = option(params, choice, kl, space.unit_layers(choice, u.linears, ctx.anatomy))
            if opt is not None:
                options[opt.label] = opt
        if len(options) > 1:
            units.append(list(options.values()))
    return units


def undominated(options: list[Option], memory: bool = True) -> list[int]:
    """Give the indices of a unit's options that no other option of the unit beats (no more KL, no
    less latency saving nor, with ``memory``, memory saving; better on one); only these can be in a
    least-KL allocation (exact duplicates: the first)."""

    def key(o: Option) -> tuple[float, ...]:
        return (o.kl, -o.latency_saved_ms, -o.memory_saved_mb if memory else 0.0)

    keep = []
    for i, a in enumerate(options):
        beaten = any(
            all(x <= y for x, y in zip(key(b), key(a), strict=True)) and (key(b), j) < (key(a), i)
            for j, b in enumerate(options)
            if j != i
        )
        if not beaten:
            keep.append(i)
    return keep


def allocations(units: list[list[Option]], memory_saved_needed_mb: float | None = None) -> list[Allocation]:
    """Give every allocation not beaten by another on summed KL and latency saving (and, when
    ``memory_saved_needed_mb`` is given, on memory saving up to that need; allocations that cannot
    reach it are left out). Exact: savings are summed as they are, never rounded to a grid."""
    lat = np.zeros(1)
    mem = np.zeros(1)
    kl = np.zeros(1)
    steps: list[tuple[np.ndarray, np.ndarray]] = []  # per unit: (parent state, option) of each kept state
    tails = _remaining_memory(units)
    for u, opts in enumerate(units):
        idx = np.array(undominated(opts, memory=memory_saved_needed_mb is not None), dtype=np.int64)
        o_lat = np.array([opts[i].latency_saved_ms for i in idx])
        o_mem = np.array([opts[i].memory_saved_mb for i in idx])
        o_kl = np.array([opts[i].kl for i in idx])
        lat = (lat[:, None] + o_lat[None, :]).ravel()
        mem = (mem[:, None] + o_mem[None, :]).ravel()
        kl = (kl[:, None] + o_kl[None, :]).ravel()
        parent = np.repeat(np.arange(len(lat) // len(idx)), len(idx))
        picked = np.tile(idx, len(lat) // len(idx))
        if memory_saved_needed_mb is None:
            keep = _front_2d(lat, kl)
        else:
            ok = mem + tails[u + 1] >= memory_saved_needed_mb - 1e-9  # can still meet the memory budget
            # savings beyond the need buy nothing: cap them, so only the shortfall separates allocations
            capped = np.minimum(mem, memory_saved_needed_mb)
            keep = np.flatnonzero(ok)[_front_3d(lat[ok], capped[ok], kl[ok])]
        lat, mem, kl = lat[keep], mem[keep], kl[keep]
        steps.append((parent[keep], picked[keep]))
    choice = np.zeros((len(lat), len(units)), dtype=np.int64)
    state = np.arange(len(lat))
    for u in range(len(units) - 1, -1, -1):  # walk the back-pointers from the last unit to the first
        parent, picked = steps[u]
        choice[:, u] = picked[state]
        state = parent[state]
    order = np.lexsort((kl, -lat))
    return [
        Allocation(float(kl[i]), float(lat[i]), float(mem[i]), tuple(int(c) for c in choice[i]))
        for i in order
        if memory_saved_needed_mb is None or mem[i] >= memory_saved_needed_mb - 1e-9
    ]


def _remaining_memory(units: list[list[Option]]) -> list[float]:
    """Give, for each position, the most memory the units from there on can still save."""
    tails = [0.0] * (len(units) + 1)
    for u in range(len(units) - 1, -1, -1):
        tails[u] = tails[u + 1] + max(o.memory_saved_mb for o in units[u])
    return tails


def _front_2d(lat: np.ndarray, kl: np.ndarray) -> np.ndarray:
    """Give the indices of points no other beats (more or equal saving, less KL; ties kept once)."""
    order = np.lexsort((kl, -lat))  # most saving first; equal saving: least KL first
    best = np.minimum.accumulate(kl[order])
    prev = np.concatenate([[np.inf], best[:-1]])
    return order[kl[order] < prev]


def _front_3d(lat: np.ndarray, mem: np.ndarray, kl: np.ndarray) -> np.ndarray:
    """Give the indices of points no other beats on (latency saving, memory saving: more; KL: less)."""
    order = np.lexsort((-mem, -lat, kl))  # least KL first, so a point can only be beaten by earlier ones
    kept: list[int] = []
    stair_lat: list[float] = []  # kept points' staircase: latency ascending, memory descending
    stair_mem: list[float] = []
    for i in order:
        x, y = lat[i], mem[i]
        j = bisect.bisect_left(stair_lat, x)
        if j < len(stair_lat) and stair_mem[j] >= y:
            continue  # an earlier point saves at least as much of both for no more KL
        k = j
        while k > 0 and stair_mem[k - 1] <= y:
            k -= 1
        del stair_lat[k:j]
        del stair_mem[k:j]
        stair_lat.insert(k, x)
        stair_mem.insert(k, y)
        kept.append(int(i))
    return np.array(sorted(kept), dtype=np.int64)


def pick(front: list[Allocation], latency_saved_ms: float) -> Allocation | None:
    """Give the least-KL allocation saving at least ``latency_saved_ms`` (the most saving on ties)."""
    ok = [a for a in front if a.latency_saved_ms >= latency_saved_ms]
    return min(ok, key=lambda a: (a.kl, -a.latency_saved_ms)) if ok else None


@dataclass
class Knapsack:
    """The exact least-KL allocations of a space's units, ready to be read at latency targets."""

    units: list[list[Option]]
    front: list[Allocation]
    base_params: dict[str, Any]
    max_saving_ms: float
    min_saving_ms: float  # what a latency budget requires (0 without one)
    min_memory_saving_mb: float | None = None  # what a memory budget requires (None without one)

    def params(self, a: Allocation) -> dict[str, Any]:
        """Give the trial parameters of an allocation (the base's no-op levels elsewhere)."""
        out = dict(self.base_params)
        for opts, k in zip(self.units, a.choice, strict=True):
            out.update(opts[k].params)
        return out

    def at(self, fraction: float) -> Allocation | None:
        """Give the least-KL allocation saving ``fraction`` of the largest saving (and what budgets need)."""
        return pick(self.front, max(fraction * self.max_saving_ms, self.min_saving_ms))

    def seeds(self, targets: tuple[float, ...] = TARGETS) -> dict[str, dict[str, Any]]:
        """Give the trial parameters of the least-KL plan at each target (fraction of the most
        saving), named; a target whose plan an earlier one already gave is skipped."""
        out: dict[str, dict[str, Any]] = {}
        chosen: list[Allocation] = []
        for t in targets:
            a = self.at(t)
            if a is None or a in chosen:
                continue
            chosen.append(a)
            out[f"knapsack {round(t * 100)}% of max saving"] = self.params(a)
        return out

    def spread(self, n: int = DENSE_TARGETS) -> dict[str, Allocation]:
        """Give the allocations at ``n`` targets evenly spread over the savings (distinct ones, named)."""
        out: dict[str, Allocation] = {}
        for i in range(1, n + 1):
            a = self.at(i / n)
            if a is not None and a not in out.values():
                out[f"knapsack {100 * i / n:.0f}% of max saving"] = a
        return out


def start_params(space: SearchSpace, ctx: SpaceContext) -> dict[str, Any] | None:
    """Give the parameters every allocation starts from: the uncompressed setting, or, in a space
    that quantizes every linear (no ``dense`` level, e.g. a GGUF space), its first uniform format
    (each unit's option then replaces it); None when the space holds no uniform setting."""
    a = ctx.anatomy
    for setting in ({}, *({"format": f} for f in space.linear.get("format", ()))):
        params = space.uniform_params(a, setting)
        if params is not None:
            return params
    return None


def build_knapsack(
    space: SearchSpace,
    ctx: SpaceContext,
    table: SensitivityTable,
    cost_model: CostModel,
    budget: Budget | None = None,
) -> Knapsack | None:
    """Give the space's exact knapsack (None for model-wide spaces or when nothing saves anything)."""
    if space.granularity == "model":
        return None
    base = start_params(space, ctx)
    if base is None:
        return None
    units = unit_options(space, ctx, table, cost_model)
    top = sum(max(o.latency_saved_ms for o in opts) for opts in units)
    if top <= 0:
        return None
    need_ms, need_mb = 0.0, None
    if budget is not None and (budget.latency_ms is not None or budget.memory_mb is not None):
        plan = replace(space.plan_from_params(base, ctx), layers={}, blocks={}, drop_blocks=())
        cost = cost_model.predict(plan)
        if budget.latency_ms is not None:
            need_ms = max(0.0, cost.latency_ms - budget.latency_ms)
        if budget.memory_mb is not None:
            need_mb = max(0.0, cost.memory_mb - budget.memory_mb)
    front = allocations(units, need_mb)
    return Knapsack(
        units=units,
        front=front,
        base_params=base,
        max_saving_ms=top,
        min_saving_ms=need_ms,
        min_memory_saving_mb=need_mb,
    )


def anchor_savings(
    seeds: Sequence[Seed], space: SearchSpace, ctx: SpaceContext, cost_model: CostModel, knapsack: Knapsack
) -> list[float]:
    """Give the predicted latency each llama.cpp recipe seed saves over the knapsack's base plan: cost
    targets at the recipes' own cost, where the search must beat what users download at equal size."""
    from autocompress.plan import Plan

    base = cost_model.predict(replace(space.plan_from_params(knapsack.base_params, ctx), layers={}, blocks={}))
    out = []
    for s in seeds:
        if not s.name.startswith("recipe "):
            continue
        plan = Plan.from_dict(s.plan) if s.plan is not None else space.plan_from_params(s.params, ctx)
        out.append(round(base.latency_ms - cost_model.predict(plan).latency_ms, 9))
    return out


def seed_plans(
    space: SearchSpace, ctx: SpaceContext, sensitivity_order: Sequence[int], knapsack: Knapsack | None
) -> list[Seed]:
    """Give the plans a search evaluates first, in order: the space's uniform baselines, the
    mixed-precision seeds between them (``sensitivity_order``: blocks most sensitive first), and the
    knapsack's least-KL plans at the default targets."""
    out = [Seed("baseline", n, p) for n, p in space.baseline_params(ctx.anatomy).items()]
    out += [Seed("seed", n, p) for n, p in space.mixed_seed_params(ctx.anatomy, sensitivity_order).items()]
    if knapsack is not None:
        out += [Seed("seed", n, p) for n, p in knapsack.seeds().items()]
    return out


def _spread_order(n: int) -> list[int]:
    """Give 0..n-1 middle first, then the ends, then ever finer midpoints: n/2, 0, n-1, n/4, 3n/4, ..."""
    if n < 3:
        return list(range(n))
    mid = (n - 1) // 2
    order = [mid, 0, n - 1]
    spans = [(0, mid), (mid, n - 1)]
    while len(order) < n:
        nxt = []
        for lo, hi in spans:
            if hi - lo > 1:
                order.append((lo + hi) // 2)
                nxt += [(lo, (lo + hi) // 2), ((lo + hi) // 2, hi)]
        spans = nxt
    return order


def prioritise(seeds: Sequence[Seed], n: int) -> list[Seed]:
    """Give ``n`` of the seeds for a short run, the rest left out: the uncompressed baseline, then
    one at a time from each group in turn (llama.cpp recipes, knapsack plans, uniform quantization
    baselines, mixed-precision seeds, the other baselines), each group's spread along its own order
    (its middle, its ends, then midpoints), so a few seeds still span the front. Order: as given."""
    if n >= len(seeds):
        return list(seeds)

    def group(s: Seed) -> int:
        if s.name == "uncompressed":
            return 0
        if s.name.startswith("recipe "):
            return 1
        if s.name.startswith("knapsack "):
            return 2
        if s.kind == "baseline" and s.name in formats.names():  # one uniform baseline per runtime format
            return 3
        return 4 if s.kind == "seed" else 5

    groups: dict[int, list[int]] = {}
    for i, s in enumerate(seeds):
        groups.setdefault(group(s), []).append(i)
    queues = [[g[j] for j in _spread_order(len(g))] for _, g in sorted(groups.items())]
    picked: list[int] = []
    while len(picked) < n:
        for q in queues:
            if q and len(picked) < n:
                picked.append(q.pop(0))
    return [seeds[i] for i in sorted(picked)]


def knapsack_seed_params(
    space: SearchSpace,
    ctx: SpaceContext,
    table: SensitivityTable,
    cost_model: CostModel,
    targets: tuple[float, ...] = TARGETS,
    budget: Budget | None = None,
) -> dict[str, dict[str, Any]]:
    """Give trial parameters of the least-KL plan for each latency-saving target (fraction of the
    most saving); with budgets, only plans predicted to meet them (allocations are summed per unit,
    so a plan's own prediction can differ slightly)."""
    ks = build_knapsack(space, ctx, table, cost_model, budget)
    return {} if ks is None else ks.seeds(targets)
