"""Search spaces: which knobs and levels are open, at which granularity, and how an Optuna
trial's parameters become a ``Plan``. Spaces are YAML files under ``search_spaces/``."""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from autocompress import formats
from autocompress._io import read_yaml
from autocompress.errors import PlanError, SpaceError
from autocompress.hardware.profile import HardwareProfile
from autocompress.model.anatomy import LinearSite, ModelAnatomy
from autocompress.plan import BlockChoice, LayerChoice, ModelRef, Plan, Provenance, with_format

LINEAR_KNOBS = (
    "format", "bits", "group_size", "symmetric", "quant_method", "act_bits", "sparsity", "prune_method", "rank_ratio",
    "lowrank_method",
)  # fmt: skip
LEGACY_KNOBS = ("bits", "group_size", "symmetric")  # the generic integer grids, before formats were named
DENSE = "dense"  # format level: keep the base model's dense weights
RUNTIME = "runtime"  # format level: every quantized format the target profile's runtime runs
STRUCTURE_KNOBS = ("keep_heads_ratio", "keep_mlp_ratio", "drop_blocks")
GRANULARITIES = ("model", "block", "linear")
GROUPS = ("attn", "mlp")
TIES = ("auto", "none", "fused")
# Runtimes that run q/k/v as one fused GEMM (and gate/up as another), so those linears must share
# one format: TensorRT-LLM (fused QKV plugin, gated-MLP fusion), MLC-LLM (qkv_proj, gate_up_proj),
# vLLM (QKVParallelLinear, MergedColumnParallelLinear). llama.cpp, onnxruntime and torchao keep
# separate tensors (llama.cpp's Q4_K_M even gives attn_v a different type than attn_q).
FUSING_RUNTIMES = ("tensorrt-llm", "mlc-llm", "vllm")
FUSED_ROLES = {"q": "qkv", "k": "qkv", "v": "qkv", "gate": "gate_up", "up": "gate_up"}
FIELDS = (
    "name", "description", "granularity", "tie", "linear", "overrides", "structure", "alignment", "baselines",
    "embedding_format",
)  # fmt: skip
_UNIT_KEY = re.compile(r"(?:b(\d+)\.)?(?:(.+)\.)?")


@dataclass(frozen=True)
class Unit:
    """Linears that share one choice in a search space; its ``key`` prefixes their Optuna parameters.

    ``block``: the block's index (None: a model-wide unit, or the embedding / head). ``name``: what the
    unit is there: a group (``attn``, ``mlp``), a role (``q``, ``down``), a tie (``qkv``, ``gate_up``), a
    linear's own name where two share a role in a block, ``embedding``, or "" for the block itself (the
    prefix of its structure knobs). ``group`` and ``linears`` are the space's (``SearchSpace.units``);
    a unit decoded from its key has neither. The keys are what studies stored: ``b3.mlp.``,
    ``b3.model.layers.3.mlp.down_proj.``, ``attn.``, ``embedding.``, ``b3.`` (and "" for the model)."""

    block: int | None
    name: str
    group: str = ""
    linears: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        """Give the prefix of the unit's parameter names (``b3.mlp.``)."""
        where = f"b{self.block}." if self.block is not None else ""
        return f"{where}{self.name}." if self.name else where

    def param(self, knob: str) -> str:
        """Give the Optuna parameter name of one of the unit's knobs (``b3.mlp.format``)."""
        return self.key + knob

    @classmethod
    def from_key(cls, key: str) -> Unit:
        """Give the unit (block and name) a ``key`` stands for; a SpaceError when it is no unit's key."""
        m = _UNIT_KEY.fullmatch(key)
        if m is None:
            raise SpaceError(f"{key!r} is not a unit's parameter prefix (b<block>.<name>. or <name>.)")
        block, name = m.groups()
        return cls(int(block) if block is not None else None, name or "")

    @classmethod
    def of_block(cls, block: int | None) -> Unit:
        """Give a block as a unit: the prefix of its structure knobs (``b3.keep_mlp_ratio``; None: the model's)."""
        return cls(block, "")


EMBEDDING_UNIT = Unit(None, "embedding")  # the token embedding (and tied head) / the untied head, one choice
EMBEDDING_PARAM = EMBEDDING_UNIT.param("format")


def runtime_fuses_projections(runtime: str) -> bool:
    """Whether a runtime fuses q/k/v (and gate/up) into one kernel, so they must share a format."""
    return runtime.lower().split()[0] in FUSING_RUNTIMES


def spaces_dir() -> Path:
    """Give the folder of named spaces (``$AUTOCOMPRESS_SEARCH_SPACES`` overrides)."""
    env = os.environ.get("AUTOCOMPRESS_SEARCH_SPACES")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "search_spaces"


def list_spaces() -> list[str]:
    return sorted(p.stem for p in spaces_dir().glob("*.yaml"))


@dataclass(frozen=True)
class SpaceContext:
    """What turning parameters into a plan needs to know about the model and the run."""

    anatomy: ModelAnatomy
    drop_order: Sequence[int]  # most redundant block first (from activation statistics)
    provenance: Provenance


@dataclass(frozen=True)
class SearchSpace:
    """Levels per knob. ``linear`` knobs apply per model / block group / linear; ``structure`` per block.

    ``tie`` (linear granularity only): ``fused`` makes q/k/v share one choice and gate/up another;
    ``auto`` does so when the target runtime fuses them (``for_runtime``); ``none`` never does.
    """

    name: str
    granularity: str
    linear: Mapping[str, tuple[Any, ...]]
    overrides: Mapping[str, Mapping[str, tuple[Any, ...]]] = field(default_factory=dict)
    structure: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    alignment: int = 8
    baselines: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    description: str = ""
    tie: str = "auto"
    embedding_format: tuple[str, ...] = ()  # levels for the token embedding / output head table(s)
    # set by ``for_profile``: the formats the target runs, the format its recipes give the output head,
    # and what was taken out of the space for that target (and why)
    runtime_formats: tuple[str, ...] | None = None
    runtime: str = "llama.cpp"  # whose fallback a row that cannot hold a format takes (``formats.fallback``)
    head_format: str | None = None
    removed: tuple[str, ...] = ()

    # ---- loading -------------------------------------------------------------------
    @classmethod
    def load(cls, name_or_path: str | Path) -> SearchSpace:
        """Load a named space (``default``, ``quant-only``...) or a YAML file; errors are ``SpaceError``."""
        path = Path(name_or_path)
        if path.suffix not in (".yaml", ".yml"):
            path = spaces_dir() / f"{name_or_path}.yaml"
            if not path.is_file():
                raise SpaceError(f"unknown search space {str(name_or_path)!r}; available: {', '.join(list_spaces())}")
        return cls.from_dict(read_yaml(path, SpaceError, "search-space file"), str(path))

    @classmethod
    def from_dict(cls, data: Any, source: str = "space") -> SearchSpace:
        def fail(msg: str) -> SpaceError:
            return SpaceError(f"{source}: {msg}")

        if not isinstance(data, Mapping):
            raise fail("must be a mapping")
        unknown = sorted(set(map(str, data)) - set(FIELDS))
        if unknown:
            raise fail(f"unknown field(s) {unknown}; allowed: {list(FIELDS)}")
        name = data.get("name")
        if not isinstance(name, str) or not name:
            raise fail("'name' must be a non-empty string")
        gran = data.get("granularity", "block")
        if gran not in GRANULARITIES:
            raise fail(f"granularity must be one of {list(GRANULARITIES)}, got {gran!r}")
        tie = data.get("tie", "auto")
        if tie not in TIES:
            raise fail(f"tie must be one of {list(TIES)}, got {tie!r}")
        if not isinstance(data.get("description", ""), str):
            raise fail("description must be a string")

        def levels(section: Any, allowed_knobs: Sequence[str], where: str) -> dict[str, tuple[Any, ...]]:
            if section is None:
                return {}
            if not isinstance(section, Mapping):
                raise fail(f"{where} must be a mapping of knob to a list of levels")
            out = {}
            for k, v in section.items():
                if k not in allowed_knobs:
                    raise fail(f"{where}.{k} is not a knob; allowed: {list(allowed_knobs)}")
                if not isinstance(v, list) or not v:
                    raise fail(f"{where}.{k} must be a non-empty list of levels")
                if len(set(map(repr, v))) != len(v):
                    raise fail(f"{where}.{k} lists a level twice")
                out[k] = tuple(v)
            return out

        linear = levels(data.get("linear"), LINEAR_KNOBS, "linear")
        overrides_raw = data.get("overrides") or {}
        if not isinstance(overrides_raw, Mapping):
            raise fail(f"overrides must map groups {list(GROUPS)} to knob levels")
        if bad := sorted(set(map(str, overrides_raw)) - set(GROUPS)):
            raise fail(f"overrides.{bad[0]} is not a group; allowed: {list(GROUPS)}")
        overrides = {g: levels(v, LINEAR_KNOBS, f"overrides.{g}") for g, v in overrides_raw.items()}
        structure = levels(data.get("structure"), STRUCTURE_KNOBS, "structure")
        alignment = data.get("alignment", 8)
        if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment < 1:
            raise fail(f"alignment must be a positive integer, got {alignment!r}")
        for where, section in (("linear", linear), *((f"overrides.{g}", v) for g, v in overrides.items())):
            if "format" in section and any(k in section for k in LEGACY_KNOBS):
                raise fail(f"{where} sets both format and {'/'.join(LEGACY_KNOBS)}: name formats only")
        emb = data.get("embedding_format") or []
        if not isinstance(emb, list) or len(set(emb)) != len(emb):
            raise fail("embedding_format must be a list of formats without repeats")
        for v in [*emb, *(v for sec in (linear, *overrides.values()) for v in sec.get("format", ()))]:
            if v not in (DENSE, RUNTIME) and v not in formats.names():
                raise fail(f"unknown format {v!r}; known: {DENSE}, {RUNTIME}, {', '.join(formats.names())}")
        baselines = data.get("baselines") or {}
        if not isinstance(baselines, Mapping):
            raise fail("baselines must map names to knob settings")
        for bname, setting in baselines.items():
            if not isinstance(setting, Mapping):
                raise fail(f"baselines.{bname} must be a mapping of knob to one level, got {setting!r}")
        space = cls(
            name=name,
            granularity=gran,
            linear=linear,
            overrides=overrides,
            structure=structure,
            alignment=alignment,
            baselines={str(k): dict(v) for k, v in baselines.items()},
            description=str(data.get("description", "")),
            tie=tie,
            embedding_format=tuple(emb),
        )
        space._check_levels(fail)
        return space

    def _check_levels(self, fail: Any) -> None:
        """Every level must make a valid LayerChoice / structure value; checked once at load."""
        sections = [("linear", self.linear), *((f"overrides.{g}", lv) for g, lv in self.overrides.items())]
        for where, section in sections:
            for knob, vals in section.items():
                for v in vals:
                    _check_level(fail, f"{where}.{knob}", knob, v)
        for group in GROUPS:
            lv = self.levels_for(group)
            if "format" in lv:  # ``runtime`` stands for formats known only once the target is
                lv = {**lv, "format": tuple(dict.fromkeys(DENSE if v == RUNTIME else v for v in lv["format"]))}
            for combo in itertools.product(*(lv[k] for k in lv)):
                try:
                    layer_choice(dict(zip(lv, combo, strict=True)))
                except PlanError as exc:
                    raise fail(f"invalid level in linear knobs ({str(exc).split(': ', 1)[-1]})") from None
        for k, vals in self.structure.items():
            for v in vals:
                if not _structure_ok(k, v):
                    raise fail(f"structure.{k} level {v!r} is out of range")
        for bname, setting in self.baselines.items():
            for k, v in setting.items():
                if k == "embedding_format":  # the token embedding / output head table(s)
                    _check_level(fail, f"baselines.{bname}.{k}", "format", v)
                elif k not in LINEAR_KNOBS and k not in STRUCTURE_KNOBS:
                    raise fail(f"baselines.{bname}.{k} is not a knob")
                elif k in LINEAR_KNOBS:
                    _check_level(fail, f"baselines.{bname}.{k}", k, v)
                elif not _structure_ok(k, v):
                    raise fail(f"baselines.{bname}.{k} level {v!r} is out of range")

    def for_runtime(self, runtime: str) -> SearchSpace:
        """Give this space with ``tie: auto`` settled for a target runtime (``fused`` or ``none``)."""
        if self.tie != "auto":
            return self
        return replace(self, tie="fused" if runtime_fuses_projections(runtime) else "none")

    def for_profile(self, profile: HardwareProfile) -> SearchSpace:
        """Give this space as a target can run it: ties settled for its runtime; ``runtime`` format
        levels expanded to the formats it runs and formats it lacks removed; sparsity and low-rank
        levels removed where it has no kernel that gains from them (they could only lose quality);
        a uniform baseline per runtime format. What was removed, and why, is in ``removed``."""
        space = self.for_runtime(profile.runtime)
        runs = profile.format_names
        quantized = [f for f in runs if not formats.get(f).is_float]
        k = profile.kernels
        notes: list[str] = []

        def keep(knob: str, vals: tuple[Any, ...], ok: Any, why: str) -> tuple[Any, ...]:
            kept = tuple(v for v in vals if ok(v))
            if len(kept) < len(vals):
                gone = [v for v in vals if v not in kept]
                notes.append(f"{knob} {gone}: {why}")
            return kept or (_NOOP.get(knob, vals[0]),)

        def formats_of(vals: tuple[str, ...], knob: str) -> tuple[str, ...]:
            lv = [f for v in vals for f in (quantized if v == RUNTIME else [v])]
            ok = keep(
                knob, tuple(dict.fromkeys(lv)), lambda v: v == DENSE or v in runs, f"{profile.runtime} does not run it"
            )
            return ok

        def settle(section: Mapping[str, tuple[Any, ...]]) -> dict[str, tuple[Any, ...]]:
            out = dict(section)
            if "format" in out:
                out["format"] = formats_of(out["format"], "format")
            elif any(b < 16 for b in out.get("bits", ())):
                missing = sorted(
                    {
                        formats.generic(b, g if b <= 4 else None, sym).name
                        for b in out["bits"]
                        if b < 16
                        for g in out.get("group_size", (None,))
                        for sym in out.get("symmetric", (True,))
                    }
                    - set(runs)
                )
                if missing:
                    raise SpaceError(
                        f"space {self.name!r} asks for bits/group_size grids {missing} that {profile.runtime} "
                        f"({profile.id}) does not run; name formats instead (format: [{RUNTIME}] or some of "
                        f"{', '.join(runs)})"
                    )
            if "sparsity" in out:
                out["sparsity"] = keep(
                    "sparsity",
                    out["sparsity"],
                    lambda v: (
                        v == 0.0 or (v == "2:4" and k.sparse_2_4) or (v != "2:4" and k.unstructured_sparse_storage)
                    ),
                    f"{profile.runtime} has no sparse kernel: zeros cost the same bytes and time",
                )
            if "rank_ratio" in out and not k.low_rank:
                out["rank_ratio"] = keep(
                    "rank_ratio",
                    out["rank_ratio"],
                    lambda v: v is None,
                    f"{profile.runtime} cannot run factorized linears",
                )
            return out

        linear = settle(space.linear)
        overrides = {g: settle(v) for g, v in space.overrides.items()}
        emb = formats_of(space.embedding_format, "embedding_format") if space.embedding_format else ()
        baselines = dict(space.baselines)
        if any(RUNTIME in sec.get("format", ()) for sec in (space.linear, *space.overrides.values())):
            for f in quantized:
                baselines.setdefault(f, {"format": f})
        return replace(
            space,
            linear=linear,
            overrides=overrides,
            embedding_format=emb,
            baselines=baselines,
            runtime_formats=runs,
            runtime=profile.runtime,
            head_format=profile.head_format,
            removed=tuple(notes),
        )

    def definition(self) -> str:
        """Give a canonical text of every level, override and baseline (what a study and caches key on)."""
        fields = {k: v for k, v in vars(self).items() if k != "tie" or self.granularity == "linear"}  # else no effect
        return repr(sorted((k, repr(v)) for k, v in fields.items()))

    def levels_for(self, group: str) -> dict[str, tuple[Any, ...]]:
        """Give a group's knob levels (``runtime`` formats count only once ``for_profile`` settled them)."""
        lv = {**self.linear, **self.overrides.get(group, {})}
        if RUNTIME in lv.get("format", ()):
            lv["format"] = tuple(v for v in lv["format"] if v != RUNTIME) or (DENSE,)
        return lv

    def unit_levels(self, group: str, names: Sequence[str], anatomy: ModelAnatomy) -> dict[str, tuple[Any, ...]]:
        """Give a unit's levels: its group's, with only the formats that can store at least one of its
        linears (a K-quant needs rows that are a multiple of 256: a unit of 576-wide rows never gets
        one); linears of the unit that cannot hold the chosen format take the runtime's fallback for
        their width (``plan_from_params``), as llama.cpp's ``Q4_K`` recipe stores 576-wide rows in Q5_0."""
        lv = self.levels_for(group)
        if "format" not in lv:
            return lv
        widths = {anatomy.find_linear(n).in_features for n in names}
        return {**lv, "format": _storable(lv["format"], widths)}

    def embedding_choices(self, anatomy: ModelAnatomy) -> list[tuple[str, LayerChoice]]:
        """Give (level, choice) for each format offered for the embedding / head table(s)."""
        return [(lvl, layer_choice({"format": lvl})) for lvl in self.embedding_levels(anatomy)]

    def embedding_levels(self, anatomy: ModelAnatomy) -> tuple[str, ...]:
        """Give the formats offered for the embedding / head table(s) (empty: the knob is closed)."""
        levels = tuple(v for v in self.embedding_format if v != RUNTIME)  # unsettled: no runtime formats
        if not levels or not anatomy.embeddings:
            return ()
        return _storable(levels, {e.cols for e in anatomy.embeddings})

    # ---- parameters -> plan ----------------------------------------------------------
    def units(self, anatomy: ModelAnatomy) -> list[Unit]:
        """Give the units that each share one linear choice (a group, per block, or a role per block)."""
        if self.granularity == "model":
            return [Unit(None, g, g, tuple(s.name for s in anatomy.linears if s.group == g)) for g in GROUPS]
        if self.granularity == "block":
            return [
                Unit(b.index, g, g, tuple(s.name for s in b.linears if s.group == g))
                for b in anatomy.blocks
                for g in GROUPS
            ]
        # a role per block; with ties, q/k/v of a block share "qkv" and gate/up "gate_up"
        units: dict[tuple[int, str], Unit] = {}
        for s in anatomy.linears:
            role = FUSED_ROLES.get(s.role, s.role) if self.tie == "fused" else s.role
            name = role
            if (s.block, role) in units and role == s.role:  # two linears with one role in a block: keep them apart
                name = s.name
            u = units.get((s.block, name), Unit(s.block, name, s.group))
            units[(s.block, name)] = replace(u, linears=(*u.linears, s.name))
        return list(units.values())

    def structure_param(self, knob: str, block: int) -> str:
        """Give the Optuna parameter of a structure knob for one block (the model's at model granularity)."""
        if knob == "drop_blocks" or self.granularity == "model":
            return knob
        return Unit.of_block(block).param(knob)

    def suggest(self, trial: Any, ctx: SpaceContext) -> Plan:
        """Ask an Optuna trial for every open knob and give the resulting plan."""
        params: dict[str, Any] = {}
        for u in self.units(ctx.anatomy):
            lv = self.unit_levels(u.group, u.linears, ctx.anatomy)
            for knob, vals in lv.items():
                bits = params.get(u.param("bits"), lv.get("bits", (16,))[0])
                if knob == "group_size" and bits > 4:
                    continue  # 8-bit and dense layers have no groups
                if len(vals) > 1:
                    params[u.param(knob)] = trial.suggest_categorical(u.param(knob), list(vals))
        emb = self.embedding_levels(ctx.anatomy)
        if len(emb) > 1:
            params[EMBEDDING_PARAM] = trial.suggest_categorical(EMBEDDING_PARAM, list(emb))
        for knob, vals in self.structure.items():
            if len(vals) <= 1:
                continue
            if knob == "drop_blocks":
                params[knob] = trial.suggest_categorical(knob, list(vals))
            else:
                per_block = self.granularity != "model"
                for b in ctx.anatomy.blocks if per_block else ctx.anatomy.blocks[:1]:
                    key = self.structure_param(knob, b.index)
                    params[key] = trial.suggest_categorical(key, list(vals))
        return self.plan_from_params(params, ctx)

    def plan_from_params(self, params: Mapping[str, Any], ctx: SpaceContext) -> Plan:
        """Build the plan that a set of trial parameters stands for (single levels fill the rest).

        A format that cannot store a linear once its block is narrowed (a K-quant on an MLP cut to
        1344 channels) becomes the runtime's fallback for that width, as llama.cpp's quantizer does.
        """
        a = ctx.anatomy
        unit_choices: list[tuple[tuple[str, ...], LayerChoice]] = []
        for u in self.units(a):
            lv = self.unit_levels(u.group, u.linears, a)
            setting = {k: params.get(u.param(k), v[0]) for k, v in lv.items()}
            unit_choices.append((u.linears, layer_choice(setting)))
        emb = self.embedding_levels(a)
        emb_choice = layer_choice({"format": params.get(EMBEDDING_PARAM, emb[0])}) if emb else None

        def structure_value(knob: str, block: int) -> Any:
            vals = self.structure.get(knob, (1.0,))
            return params.get(self.structure_param(knob, block), params.get(knob, vals[0]))

        blocks: dict[int, BlockChoice] = {}
        for b in a.blocks:
            hr = float(structure_value("keep_heads_ratio", b.index))
            mr = float(structure_value("keep_mlp_ratio", b.index))
            keep_heads = None
            if hr < 1.0:
                groups = max(1, round(hr * b.num_kv_heads))
                keep_heads = groups * b.heads_per_kv if groups < b.num_kv_heads else None
            keep_mlp = None
            if mr < 1.0:
                ch = max(self.alignment, round(mr * b.mlp_dim / self.alignment) * self.alignment)
                keep_mlp = ch if ch < b.mlp_dim else None
            bc = BlockChoice(keep_heads=keep_heads, keep_mlp_channels=keep_mlp)
            if bc != BlockChoice():
                blocks[b.index] = bc
        n_drop = int(params.get("drop_blocks", self.structure.get("drop_blocks", (0,))[0]))
        n_drop = min(n_drop, a.num_blocks - 1)
        drops = tuple(sorted(ctx.drop_order[:n_drop]))
        layers: dict[str, LayerChoice] = {}
        for names, choice in unit_choices:
            if choice.is_identity:
                continue
            for n in names:
                layers[n] = self._fitted(choice, a.find_linear(n), a, blocks)
        if emb_choice is not None and not emb_choice.is_identity:
            layers.update({e.name: emb_choice for e in a.embeddings})
        model = ModelRef.of(a)
        return Plan(model=model, layers=layers, blocks=blocks, drop_blocks=drops, provenance=ctx.provenance)

    def unit_layers(self, choice: LayerChoice, names: Sequence[str], anatomy: ModelAnatomy) -> dict[str, LayerChoice]:
        """Give the layers of a plan that sets one unit to ``choice`` (full widths): each linear in the
        choice's format, or the runtime's fallback for its row width."""
        return {n: self._fitted(choice, anatomy.find_linear(n), anatomy, {}) for n in names}

    def unit_choice(self, plan: Plan, unit: Unit, anatomy: ModelAnatomy) -> LayerChoice:
        """Give the level ``plan`` sets ``unit`` to: the choice that, fitted to each of the unit's linears (the
        runtime's fallback where a width cannot hold its format), gives every one its choice in the plan. A
        unit's first linear alone can mislead: on a 576-wide model a ``Q4_K`` MLP stores gate/up in ``Q5_0``.
        A unit that no one level explains (a plan edited by hand) gives its first linear's choice."""
        got = [plan.choice_for(n) for n in unit.linears]
        sites = [anatomy.find_linear(n) for n in unit.linears]
        for c in dict.fromkeys(got):
            if all(self._fitted(c, s, anatomy, plan.blocks) == g for s, g in zip(sites, got, strict=True)):
                return c
        return got[0]

    def _fitted(
        self, choice: LayerChoice, site: LinearSite, anatomy: ModelAnatomy, blocks: Mapping[int, BlockChoice]
    ) -> LayerChoice:
        """Give ``choice`` with its format replaced by the runtime's fallback where the linear's width
        (after structure) cannot hold it (dense when no fallback the runtime runs fits)."""
        fmt = choice.fmt
        if fmt is None:
            return choice
        bc = blocks.get(site.block, BlockChoice())
        _, in_f = site.shape_after(*anatomy.blocks[site.block].fractions(bc.keep_heads, bc.keep_mlp_channels))
        name: str | None = formats.fallback(fmt.name, in_f, self.runtime) or fmt.name  # what the runtime stores there
        if name == fmt.name:
            return choice
        if name is not None and self.runtime_formats is not None and name not in self.runtime_formats:
            name = None
        return with_format(choice, name)

    # ---- baselines and extremes -----------------------------------------------------------
    def baseline_params(self, anatomy: ModelAnatomy) -> dict[str, dict[str, Any]]:
        """Give Optuna parameters for each baseline the space can express (others are skipped, and so is
        one that comes out as an earlier baseline's plan: on rows no K-quant fits, ``Q4_K`` is ``Q5_0``)."""
        out: dict[str, dict[str, Any]] = {}
        for bname, setting in self.baselines.items():
            params = self.uniform_params(anatomy, setting)
            if params is None or params in out.values():
                continue
            if "format" in setting and setting["format"] not in params.values():
                continue  # every tensor fell back to another format: that format's own baseline covers it
            out[bname] = params
        return out

    def uniform_params(
        self,
        anatomy: ModelAnatomy,
        setting: Mapping[str, Any],
        per_block: Mapping[int, Mapping[str, Any]] | None = None,
    ) -> dict[str, Any] | None:
        """Give the parameters of one setting (unset knobs at their no-op level; ``per_block``
        replaces it for some blocks), or None when a wanted level is not in the space."""
        per_block = per_block or {}
        params: dict[str, Any] = {}
        for u in self.units(anatomy):
            s = per_block.get(u.block, setting) if u.block is not None else setting
            lv = self.unit_levels(u.group, u.linears, anatomy)
            for knob, vals in lv.items():
                want = s.get(knob, _NOOP.get(knob, vals[0]))
                if knob == "group_size" and s.get("bits", 16) > 4:
                    continue
                if knob == "format":  # as the runtime's quantizer does where a row cannot hold it
                    want = _fall_back(want, vals, anatomy.find_linear(u.linears[0]).in_features, self.runtime)
                if want not in vals:
                    return None
                if len(vals) > 1:
                    params[u.param(knob)] = want
        emb = self.embedding_levels(anatomy)
        if len(emb) > 1:
            # the embedding / head as the runtime's own recipes store it next to a uniform format
            quantized = setting.get("format", DENSE) != DENSE
            want = setting.get("embedding_format", (self.head_format or DENSE) if quantized else DENSE)
            want = _fall_back(want, emb, anatomy.embeddings[0].cols, self.runtime)
            if want not in emb:
                return None
            params[EMBEDDING_PARAM] = want
        for knob, vals in self.structure.items():
            want = setting.get(knob, _NOOP[knob])
            if want not in vals:
                return None
            if len(vals) <= 1:
                continue
            params.update({self.structure_param(knob, b.index): want for b in anatomy.blocks})
        return params

    def mixed_seed_params(self, anatomy: ModelAnatomy, sensitivity_order: Sequence[int]) -> dict[str, dict[str, Any]]:
        """Give seeds between adjacent quantization baselines: the most sensitive blocks keep the
        finer format, the rest take the coarser one (at 25 % and 50 % of blocks kept finer).

        ``sensitivity_order`` lists blocks most sensitive first (e.g. by measured block distance).
        Only for block or linear granularity; pairs whose formats the space lacks are skipped.
        """
        if self.granularity == "model":
            return {}
        ladder = [
            (name, s)
            for name, s in self.baselines.items()
            if s and (set(s) <= {"bits", "group_size"} or set(s) == {"format"})
        ]
        ladder.sort(key=lambda item: -_nominal_bits(item[1]))
        out: dict[str, dict[str, Any]] = {}
        for (fine_name, fine), (coarse_name, coarse) in itertools.pairwise(ladder):
            for frac in (0.25, 0.5):
                keep = list(sensitivity_order)[: max(1, round(frac * anatomy.num_blocks))]
                params = self.uniform_params(anatomy, coarse, dict.fromkeys(keep, fine))
                if params is not None:
                    out[f"{coarse_name}+{round(frac * 100)}% {fine_name}"] = params
        return out

    def extreme_plans(self, ctx: SpaceContext) -> list[Plan]:
        """Give uniform plans at every combination of linear levels with the most aggressive
        structure: with per-layer additive costs, the cheapest plan in the space is among them."""
        levels: dict[str, tuple[Any, ...]] = dict(self.linear)
        for g in GROUPS:
            for k, v in self.overrides.get(g, {}).items():
                levels[k] = tuple(dict.fromkeys((*levels.get(k, ()), *v)))
        if "format" in levels:  # unsettled ``runtime`` levels stand for no format yet
            levels["format"] = tuple(v for v in levels["format"] if v != RUNTIME) or (DENSE,)
        emb = self.embedding_levels(ctx.anatomy)
        if emb:
            levels[EMBEDDING_PARAM] = emb
        struct = {k: (max(v) if k == "drop_blocks" else min(v)) for k, v in self.structure.items()}
        plans = []
        for combo in itertools.product(*levels.values()):
            setting = {**dict(zip(levels, combo, strict=True)), **struct}
            params = {EMBEDDING_PARAM: setting[EMBEDDING_PARAM]} if emb else {}
            for u in self.units(ctx.anatomy):  # a level missing in a unit: its first
                for k, vals in self.unit_levels(u.group, u.linears, ctx.anatomy).items():
                    want = setting[k]
                    if k == "format":
                        want = _fall_back(want, vals, ctx.anatomy.find_linear(u.linears[0]).in_features, self.runtime)
                    params[u.param(k)] = want if want in vals else vals[0]
            for knob, val in struct.items():
                params[knob] = val
                params.update({Unit.of_block(b.index).param(knob): val for b in ctx.anatomy.blocks})
            try:
                plans.append(self.plan_from_params(params, ctx))
            except PlanError:
                continue
        return plans


def _storable(levels: Sequence[str], widths: set[int]) -> tuple[str, ...]:
    """Give the format levels that can store rows of at least one width in ``widths`` (dense always can)."""
    ok = tuple(f for f in levels if f == DENSE or any(formats.get(f).check((1, w)) is None for w in widths))
    return ok or (DENSE,)


def _fall_back(want: str, levels: Sequence[str], width: int, runtime: str) -> str:
    """Give ``want``, or the first format of the runtime's fallback chain for this row width that the
    levels offer (``want`` unchanged when none is: the caller then finds it missing)."""
    name: str | None = want
    while name is not None and name != DENSE and name not in levels:
        name = formats.fallback(name, width, runtime)
    return name if name is not None else want


def _nominal_bits(setting: Mapping[str, Any]) -> float:
    """Give a baseline's bits per weight on a 256-wide row (for ordering baselines fine to coarse)."""
    if "format" in setting:
        return 16.0 if setting["format"] == DENSE else formats.get(setting["format"]).bits_per_weight((1, 256))
    return float(setting["bits"])


_NOOP: dict[str, Any] = {
    "format": DENSE,
    "bits": 16,
    "act_bits": 16,
    "sparsity": 0.0,
    "rank_ratio": None,
    "keep_heads_ratio": 1.0,
    "keep_mlp_ratio": 1.0,
    "drop_blocks": 0,
}


def _structure_ok(knob: str, v: Any) -> bool:
    if knob == "drop_blocks":
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1


def _check_level(fail: Any, where: str, knob: str, level: Any) -> None:
    """Refuse a level that no layer could take, naming where it is."""
    setting = {knob: level, "bits": 4} if knob == "group_size" else {knob: level}
    if knob == "format" and level == RUNTIME:
        return  # stands for the target's formats; settled by ``for_profile``
    try:
        if knob in ("bits", "act_bits") and (not isinstance(level, int) or isinstance(level, bool)):
            raise PlanError(f"{knob} must be an integer")
        layer_choice(setting)
    except (PlanError, TypeError, ValueError) as exc:
        raise fail(f"invalid level {level!r} in {where} ({str(exc).split(': ', 1)[-1]})") from None


def layer_choice(setting: Mapping[str, Any]) -> LayerChoice:
    """Turn knob levels into a LayerChoice (``"2:4"`` as a sparsity level means the 2:4 pattern,
    ``dense`` as a format the base model's own weights)."""
    s = dict(setting)
    if s.get("format") == DENSE:
        s.pop("format")
    if s.get("sparsity") == "2:4":
        s["sparsity"], s["sparsity_pattern"] = 0.5, "2:4"
    if s.get("bits", 16) > 4:
        s.pop("group_size", None)
    if isinstance(s.get("sparsity"), int):
        s["sparsity"] = float(s["sparsity"])
    return LayerChoice.from_dict(s, "search space level")
