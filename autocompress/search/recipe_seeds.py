"""llama.cpp's own recipes (Q4_K_M, Q3_K_M, ...) as seeds of a llama.cpp study.

A recipe is a per-tensor allocation of GGML types chosen by hand (more bits for attn_v / ffn_down
in some layers, shape fallbacks). ``runtime.recipes.recipe_types`` reads the types llama-quantize
gives each tensor; here each allocation becomes the trial parameters of the study's space — the
same format per tensor, with the space's own quantizer (GPTQ where the space offers only that) —
so the search starts from what users download and improves on it. They are the baselines of every
llama.cpp study: a recipe the space cannot express tensor by tensor (per-tensor types in a per-block
space where one unit's tensors differ) is still evaluated, as a fixed plan holding exactly the
recipe's types (with our RTN quantizer, as llama-quantize without an importance matrix), while the
sampler is told its nearest uniform setting. Only a recipe holding a format the space does not offer
at all (on this base, Q5_1 where a benchmark space removed it) is skipped, with the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from autocompress.plan import LayerChoice
from autocompress.runtime import llamacpp, recipes
from autocompress.search.seeding import Seed
from autocompress.space import DENSE, EMBEDDING_PARAM, SearchSpace, SpaceContext

RECIPE_SEEDS = ("Q6_K", "Q5_K_M", "Q4_K_M", "Q4_K_S", "Q3_K_M", "Q2_K")  # the mixes (uniform ones are baselines)


def params_for_layers(
    space: SearchSpace, ctx: SpaceContext, layers: Mapping[str, LayerChoice]
) -> tuple[dict[str, Any] | None, str]:
    """Give the space's trial parameters storing each tensor in the format ``layers`` names (full
    depth and width), or None and the reason the space cannot express it."""
    a = ctx.anatomy

    def fmt(name: str) -> str:
        c = layers.get(name)
        return DENSE if c is None or c.fmt is None else c.fmt.name

    # start from a uniform setting the space holds (structure and other knobs at their no-op levels)
    params = None
    for uniform in dict.fromkeys(fmt(s.name) for s in a.linears):
        params = space.uniform_params(a, {"format": uniform})
        if params is not None:
            break
    if params is None:
        return None, "the space holds none of its formats on every linear"

    for unit in space.units(a):
        where = unit.key.rstrip(".")
        wanted = {fmt(n) for n in unit.linears}
        if len(wanted) > 1:
            return None, f"unit {where} holds {sorted(wanted)} (one format per unit in this space)"
        (want,) = wanted
        levels = space.unit_levels(unit.group, list(unit.linears), a)
        vals = levels.get("format", (DENSE,))
        if want not in vals:
            return None, f"{want} is not offered for {where} (offered: {', '.join(vals)})"
        if len(vals) > 1:
            params[unit.param("format")] = want
        methods = levels.get("quant_method", ())
        if len(methods) > 1:  # the recipe's own quantizer where the space offers it
            first = unit.linears[0]
            own = layers[first].quant_method if first in layers else methods[0]
            params[unit.param("quant_method")] = own if own in methods else methods[0]
    emb = space.embedding_levels(a)
    if len(emb) > 1:
        want = fmt(a.embeddings[0].name)
        if want not in emb:
            return None, f"{want} is not offered for the embedding (offered: {', '.join(emb)})"
        params[EMBEDDING_PARAM] = want
    got = space.plan_from_params(params, ctx).layers
    differ = [
        n for n in (s.name for s in a.linears) if fmt(n) != (got[n].fmt.name if n in got and got[n].fmt else DENSE)
    ]
    if differ:
        return None, f"the space stores {differ[0]} in another format than the recipe"
    return params, ""


def offered_formats(space: SearchSpace, ctx: SpaceContext) -> set[str]:
    """Give every format the space offers somewhere (a unit's linears or the embedding / head)."""
    a = ctx.anatomy
    out = {f for u in space.units(a) for f in space.unit_levels(u.group, list(u.linears), a).get("format", ())}
    return out | set(space.embedding_levels(a)) | {DENSE}


def nearest_params(space: SearchSpace, ctx: SpaceContext, layers: Mapping[str, LayerChoice]) -> dict[str, Any] | None:
    """Give the space's uniform setting in the format holding most of a plan's block weights (or the
    next most used one the space holds everywhere), or None."""
    a = ctx.anatomy
    weight: dict[str, int] = {}
    for site in a.linears:
        c = layers.get(site.name)
        f = DENSE if c is None or c.fmt is None else c.fmt.name
        weight[f] = weight.get(f, 0) + site.params
    for f in sorted(weight, key=lambda f: -weight[f]):
        params = space.uniform_params(a, {"format": f})
        if params is not None:
            return params
    return None


def recipe_seeds(
    space: SearchSpace,
    ctx: SpaceContext,
    wb: Any,
    names: tuple[str, ...] = RECIPE_SEEDS,
    *,
    log: Callable[[str], None] | None = None,
) -> list[Seed]:
    """Give a baseline per recipe: its trial parameters where the space expresses it tensor by
    tensor, else the recipe as a fixed plan (none, with one line saying why, when llama.cpp's tools
    are not built)."""
    say = log or (lambda _m: None)
    if llamacpp.find() is None:
        say("llama.cpp's recipes not used as baselines: its tools are not built (make setup)")
        return []
    family = ctx.anatomy.architecture
    if not recipes.covers(family):
        say(f"llama.cpp's recipes not used as baselines: GGUF export does not cover model type {family!r}")
        return []
    offered = offered_formats(space, ctx)
    out, fixed, skipped = [], [], []
    for name, types in recipes.recipe_types(wb, names, log=say).items():
        plan = recipes.plan_from_types(types, wb, name=name)
        params, why = params_for_layers(space, ctx, plan.layers) if space.granularity == "linear" else (None, "")
        if params is not None:
            out.append(Seed("baseline", f"recipe {name}", params))
            continue
        lacking = sorted({c.fmt.name for c in plan.layers.values() if c.fmt is not None} - offered)
        near = nearest_params(space, ctx, plan.layers)
        if lacking or near is None:
            skipped.append(f"{name} ({'holds ' + ', '.join(lacking) + ', not in the space' if lacking else why})")
            continue
        out.append(Seed("baseline", f"recipe {name}", near, plan=plan.to_dict()))
        fixed.append(name)
    say(f"llama.cpp recipes as baselines: {', '.join(s.name[7:] for s in out) or 'none'}")
    if fixed:
        say(f"  as fixed plans (the space sets one format per block): {', '.join(fixed)}")
    if skipped:
        say(f"recipes left out: {'; '.join(skipped)}")
    return out
