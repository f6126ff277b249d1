"""Rung 0 of the fidelity ladder: the per-unit sensitivity table.

For every unit of a search space (a block's attention or MLP linears, a block's width, a block
itself) and every knob level open there, the table holds the KL increase over the base model when
*only that unit* is compressed at *only that level*. A plan's rung-0 prediction is the sum of the
entries it switches on (an additive model: free to evaluate, used to seed the search and to
check the proxy). Built once per (model, data, space) and cached on disk as JSON.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autocompress._io import atomic_write_text
from autocompress.compress.numerics import numerics_tag
from autocompress.errors import PlanError
from autocompress.evaluate.metrics import EvaluationError, kl_to_base, output_logprobs
from autocompress.plan import BlockChoice, LayerChoice, Plan
from autocompress.space import EMBEDDING_UNIT, SearchSpace, SpaceContext, Unit, layer_choice

TABLE_VERSION = 2


def table_key(unit: Unit, part: str) -> str:
    """Give the table key of one part (a ``choice_parts`` entry, ``heads=6``, ``drop``) on a unit: ``b3.mlp.|quant:{...}``."""
    return f"{unit.key}|{part}"


def table_unit(key: str) -> Unit:
    """Give the unit a table key is on (its block and name)."""
    return Unit.from_key(key.partition("|")[0])


def choice_parts(c: LayerChoice) -> list[str]:
    """Split a layer choice into its independently measured parts (quantization, pruning, low-rank)."""
    parts = []
    if c.rank_ratio is not None:
        parts.append("rank:" + _canon(replace(LayerChoice(), rank_ratio=c.rank_ratio, **_extra(c, "lowrank_method"))))
    if c.pruned:
        pr = replace(
            LayerChoice(), sparsity=c.sparsity, sparsity_pattern=c.sparsity_pattern, prune_method=c.prune_method
        )
        parts.append("prune:" + _canon(pr))
    if c.quantized or getattr(c, "act_bits", 16) != 16:
        q = replace(
            c, sparsity=0.0, sparsity_pattern="unstructured", prune_method=LayerChoice().prune_method, rank_ratio=None
        )
        parts.append("quant:" + _canon(q))
    return parts


def _extra(c: LayerChoice, *names: str) -> dict[str, Any]:
    return {n: getattr(c, n) for n in names if hasattr(c, n)}


def _canon(c: LayerChoice) -> str:
    return json.dumps(c.to_dict(), sort_keys=True, separators=(",", ":"))


def plan_keys(plan: Plan, space: SearchSpace, ctx: SpaceContext) -> list[str]:
    """Give the table keys a plan switches on."""
    keys = []
    dropped = set(plan.drop_blocks)
    for u in space.units(ctx.anatomy):
        if ctx.anatomy.find_linear(u.linears[0]).block in dropped:
            continue
        keys += [table_key(u, p) for p in choice_parts(space.unit_choice(plan, u, ctx.anatomy))]
    for e in ctx.anatomy.embeddings[:1] if space.embedding_levels(ctx.anatomy) else ():
        keys += [table_key(EMBEDDING_UNIT, p) for p in choice_parts(plan.embedding_choice(e.name))]
    for i, bc in plan.blocks.items():
        if i in dropped:
            continue
        if bc.keep_heads is not None:
            keys.append(table_key(Unit.of_block(i), f"heads={bc.keep_heads}"))
        if bc.keep_mlp_channels is not None:
            keys.append(table_key(Unit.of_block(i), f"mlp={bc.keep_mlp_channels}"))
    keys += [table_key(Unit.of_block(i), "drop") for i in sorted(dropped)]
    return keys


@dataclass
class SensitivityTable:
    """KL increase per (unit, knob level) measured alone; ``predict`` sums a plan's entries."""

    entries: dict[str, float]
    tokens: int

    def predict(self, plan: Plan, space: SearchSpace, ctx: SpaceContext) -> float:
        """Give the rung-0 (additive) KL prediction; NaN when an entry was never measured."""
        total = 0.0
        for k in plan_keys(plan, space, ctx):
            v = self.entries.get(k)
            if v is None:
                return math.nan
            total += v
        return total


def unit_probes(space: SearchSpace, ctx: SpaceContext) -> Iterator[tuple[str, Plan]]:
    """Give (key, single-unit plan) for every entry the space can switch on."""
    a = ctx.anatomy
    base = replace(space.plan_from_params({}, ctx), layers={}, blocks={}, drop_blocks=())
    for _lvl, choice in space.embedding_choices(a):
        for part in choice_parts(choice):
            yield table_key(EMBEDDING_UNIT, part), replace(base, layers={e.name: choice for e in a.embeddings})
    for u in space.units(a):
        lv = space.unit_levels(u.group, u.linears, a)
        seen: set[str] = set()
        for combo in itertools.product(*lv.values()):
            try:
                choice = layer_choice(dict(zip(lv, combo, strict=True)))
            except PlanError:  # combinations the space rejects are simply not probed
                continue
            for part in choice_parts(choice):
                if part in seen:
                    continue
                seen.add(part)
                single = LayerChoice.from_dict(json.loads(part.split(":", 1)[1]), "probe")
                yield table_key(u, part), replace(base, layers=space.unit_layers(single, u.linears, a))
    for b in a.blocks:
        for knob, field, label in (
            ("keep_heads_ratio", "keep_heads", "heads"),
            ("keep_mlp_ratio", "keep_mlp_channels", "mlp"),
        ):
            for ratio in space.structure.get(knob, ()):
                kept = getattr(
                    space.plan_from_params({space.structure_param(knob, b.index): ratio, knob: 1.0}, ctx).block_choice(
                        b.index
                    ),
                    field,
                )
                if kept is not None:
                    yield (
                        table_key(Unit.of_block(b.index), f"{label}={kept}"),
                        replace(base, blocks={b.index: BlockChoice(**{field: kept})}),
                    )
        if max(space.structure.get("drop_blocks", (0,))) > 0:
            yield table_key(Unit.of_block(b.index), "drop"), replace(base, drop_blocks=(b.index,))


def _shared_copy(model: nn.Module, block_prefixes: set[str]) -> nn.Module:
    """Copy the module tree but share every tensor outside the given blocks (cheap, O(modules))."""
    memo: dict[int, Any] = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if not any(name.startswith(p + ".") for p in block_prefixes):
            memo[id(t)] = t
    return copy.deepcopy(model, memo)


def table_path(
    cache: Path, model_hash: str, data_hash: str, space: SearchSpace, tokens: int, numerics: str = "exact"
) -> Path:
    space_key = hashlib.sha256(space.definition().encode()).hexdigest()
    tag = numerics_tag(numerics)
    name = f"{model_hash[:16]}-{data_hash[:16]}-{space_key[:12]}-{tokens}{tag}-v{TABLE_VERSION}.json"
    return cache / "sensitivity" / name


def build_sensitivity(
    model: nn.Module,
    apply: Callable[[nn.Module, Plan], nn.Module],
    space: SearchSpace,
    ctx: SpaceContext,
    tokens: torch.Tensor,
    cache: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    numerics: str = "exact",
) -> SensitivityTable:
    """Measure (or read from the cache) the sensitivity table on ``tokens`` [n, L].

    ``apply(model_copy, plan)`` must compress ``model_copy`` in place and give it back; each probe
    gets a copy that shares every tensor except the probed block's, so a probe costs one forward.
    ``numerics`` (the runtime's activation rounding ``apply`` emulates) keys the cache.
    """
    a = ctx.anatomy
    path = (
        table_path(cache, a.model_hash, ctx.provenance.data_hash or "", space, int(tokens.numel()), numerics)
        if cache
        else None
    )
    if path is not None and path.is_file():
        try:
            d = json.loads(path.read_text())
            return SensitivityTable(entries={k: float(v) for k, v in d["entries"].items()}, tokens=int(d["tokens"]))
        except (ValueError, KeyError):
            pass  # a damaged cache file is recomputed
    probes = list(unit_probes(space, ctx))
    base_lp = output_logprobs(model, tokens)
    entries: dict[str, float] = {}
    tables = {e.name for e in a.embeddings}
    prefixes = {b.index: b.prefix for b in a.blocks}
    for n, (key, plan) in enumerate(probes):
        unit = table_unit(key)
        if unit == EMBEDDING_UNIT:
            own = tables
        else:  # a model-wide unit (model granularity) touches every block
            own = {prefixes[unit.block]} if unit.block is not None else set(prefixes.values())
        work = _shared_copy(model, own)
        try:
            kl = kl_to_base(apply(work, plan), tokens, base_lp).kl
        except EvaluationError:
            kl = math.inf
        entries[key] = kl
        del work
        if progress:
            progress(n + 1, len(probes))
    table = SensitivityTable(entries=entries, tokens=int(tokens.numel()))
    if path is not None:
        atomic_write_text(path, json.dumps({"entries": entries, "tokens": table.tokens}, sort_keys=True) + "\n")
    return table
