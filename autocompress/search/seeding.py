"""Seeding the search: a multiple-choice knapsack over the sensitivity table.

Each unit of the space (a block's attention or MLP linears) picks one combination of its knob
levels; the table gives the KL each costs alone, the cost model the latency it saves alone. For a
range of latency-saving targets, an exact dynamic programme (on a 1/``bins`` grid of the largest
possible saving) finds the assignment with the smallest summed KL; each becomes an enqueued trial.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import replace
from typing import Any

from autocompress.errors import PlanError
from autocompress.evaluate.sensitivity import EMBEDDING_UNIT, SensitivityTable, choice_parts
from autocompress.hardware import CostModel
from autocompress.space import EMBEDDING_PARAM, SearchSpace, SpaceContext, layer_choice

TARGETS = (0.3, 0.5, 0.7, 0.85, 0.95)


def _unit_options(
    space: SearchSpace, ctx: SpaceContext, table: SensitivityTable, cost_model: CostModel
) -> list[list[tuple[dict[str, Any], float, float]]]:
    """Give, per unit, the options (params, KL alone, latency saved alone) with a non-negative saving."""
    base_params = space.uniform_params(ctx.anatomy, {})
    base_plan = replace(space.plan_from_params(base_params or {}, ctx), layers={}, blocks={}, drop_blocks=())
    base_latency = cost_model.predict(base_plan).latency_ms
    units = []
    emb_options: list[tuple[dict[str, Any], float, float]] = []
    emb_sites = [e.name for e in ctx.anatomy.embeddings]
    for lvl, choice in space.embedding_choices(ctx.anatomy):  # the embedding / head table: one unit
        kl = sum(table.entries.get(f"{EMBEDDING_UNIT}|{p}", math.inf) for p in choice_parts(choice))
        saved = (
            base_latency - cost_model.predict(replace(base_plan, layers=dict.fromkeys(emb_sites, choice))).latency_ms
        )
        if math.isfinite(kl) and (saved >= 0 or choice.is_identity):
            emb_options.append(({EMBEDDING_PARAM: lvl}, kl, max(saved, 0.0)))
    if emb_options:
        units.append(emb_options)
    for prefix, group, names in space.units(ctx.anatomy):
        lv = space.unit_levels(group, names, ctx.anatomy)
        options: dict[str, tuple[dict[str, Any], float, float]] = {}
        for combo in itertools.product(*lv.values()):
            setting = dict(zip(lv, combo, strict=True))
            try:
                choice = layer_choice(setting)
            except PlanError:
                continue
            key = repr(choice)
            if key in options:
                continue  # e.g. group sizes that do not apply to 8-bit
            kl = sum(table.entries.get(f"{prefix}|{p}", math.inf) for p in choice_parts(choice))
            saved = (
                base_latency
                - cost_model.predict(
                    replace(base_plan, layers=space.unit_layers(choice, names, ctx.anatomy))
                ).latency_ms
            )
            if not math.isfinite(kl) or (saved < 0 and not choice.is_identity):
                continue
            params = {prefix + k: v for k, v in setting.items() if len(lv[k]) > 1}
            if choice.bits > 4:
                params.pop(prefix + "group_size", None)
            options[key] = (params, kl, max(saved, 0.0))
        units.append(list(options.values()))
    return units


def knapsack_seed_params(
    space: SearchSpace,
    ctx: SpaceContext,
    table: SensitivityTable,
    cost_model: CostModel,
    targets: tuple[float, ...] = TARGETS,
    bins: int = 400,
) -> dict[str, dict[str, Any]]:
    """Give trial parameters of the least-KL plan for each latency-saving target (fraction of the most saving)."""
    if space.granularity == "model":
        return {}
    base = space.uniform_params(ctx.anatomy, {})
    if base is None:
        return {}
    units = _unit_options(space, ctx, table, cost_model)
    top = sum(max(o[2] for o in opts) for opts in units if opts)
    if top <= 0:
        return {}
    q = top / bins
    inf = math.inf
    dp = [0.0] + [inf] * bins  # dp[j]: least KL with saving >= j*q (capped at bins)
    back: list[list[tuple[int, int]]] = []
    for opts in units:
        new = [inf] * (bins + 1)
        arg = [(-1, -1)] * (bins + 1)
        for j, v in enumerate(dp):
            if v == inf:
                continue
            for k, (_p, kl, saved) in enumerate(opts):
                jj = min(bins, j + int(saved / q))
                if v + kl < new[jj]:
                    new[jj] = v + kl
                    arg[jj] = (j, k)
        dp = new
        back.append(arg)
    seeds: dict[str, dict[str, Any]] = {}
    for t in targets:
        lo = math.ceil(t * bins)
        j = min(range(lo, bins + 1), key=lambda i: (dp[i], i), default=None)
        if j is None or dp[j] == inf:
            continue
        params = dict(base)
        for u in range(len(units) - 1, -1, -1):
            j_prev, k = back[u][j]
            params.update(units[u][k][0])
            j = j_prev
        seeds[f"knapsack {round(t * 100)}% of max saving"] = params
    return seeds
