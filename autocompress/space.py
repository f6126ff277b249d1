"""Search spaces: which knobs and levels are open, at which granularity, and how an Optuna
trial's parameters become a ``Plan``. Spaces are YAML files under ``search_spaces/``."""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from autocompress._io import read_yaml
from autocompress.errors import PlanError, SpaceError
from autocompress.model.anatomy import ModelAnatomy
from autocompress.plan import BlockChoice, LayerChoice, ModelRef, Plan, Provenance

LINEAR_KNOBS = (
    "bits", "group_size", "symmetric", "quant_method", "act_bits", "sparsity", "prune_method", "rank_ratio", "lowrank_method",
)  # fmt: skip
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
FIELDS = ("name", "description", "granularity", "tie", "linear", "overrides", "structure", "alignment", "baselines")


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
                if k not in LINEAR_KNOBS and k not in STRUCTURE_KNOBS:
                    raise fail(f"baselines.{bname}.{k} is not a knob")
                if k in LINEAR_KNOBS:
                    _check_level(fail, f"baselines.{bname}.{k}", k, v)
                elif not _structure_ok(k, v):
                    raise fail(f"baselines.{bname}.{k} level {v!r} is out of range")

    def for_runtime(self, runtime: str) -> SearchSpace:
        """Give this space with ``tie: auto`` settled for a target runtime (``fused`` or ``none``)."""
        if self.tie != "auto":
            return self
        return replace(self, tie="fused" if runtime_fuses_projections(runtime) else "none")

    def definition(self) -> str:
        """Give a canonical text of every level, override and baseline (what a study and caches key on)."""
        fields = {k: v for k, v in vars(self).items() if k != "tie" or self.granularity == "linear"}  # else no effect
        return repr(sorted((k, repr(v)) for k, v in fields.items()))

    def levels_for(self, group: str) -> dict[str, tuple[Any, ...]]:
        return {**self.linear, **self.overrides.get(group, {})}

    # ---- parameters -> plan ----------------------------------------------------------
    def _units(self, anatomy: ModelAnatomy) -> list[tuple[str, str, list[str]]]:
        """Give (param prefix, group, linear names) for each unit that shares one linear choice."""
        if self.granularity == "model":
            return [(f"{g}.", g, [s.name for s in anatomy.linears if s.group == g]) for g in GROUPS]
        if self.granularity == "block":
            return [
                (f"b{b.index}.{g}.", g, [s.name for s in b.linears if s.group == g])
                for b in anatomy.blocks
                for g in GROUPS
            ]
        # "b<block>.<role>." (a block's index first, as the sensitivity table expects); with ties,
        # q/k/v of a block share "b<block>.qkv." and gate/up "b<block>.gate_up."
        units: dict[str, tuple[str, str, list[str]]] = {}
        for s in anatomy.linears:
            role = FUSED_ROLES.get(s.role, s.role) if self.tie == "fused" else s.role
            key = f"b{s.block}.{role}."
            if key in units and role == s.role:  # two linears with one role in a block: keep them apart
                key = f"b{s.block}.{s.name}."
            units.setdefault(key, (key, s.group, []))[2].append(s.name)
        return list(units.values())

    def suggest(self, trial: Any, ctx: SpaceContext) -> Plan:
        """Ask an Optuna trial for every open knob and give the resulting plan."""
        params: dict[str, Any] = {}
        for prefix, group, _ in self._units(ctx.anatomy):
            for knob, vals in self.levels_for(group).items():
                bits = params.get(f"{prefix}bits", self.levels_for(group).get("bits", (16,))[0])
                if knob == "group_size" and bits > 4:
                    continue  # 8-bit and dense layers have no groups
                if len(vals) > 1:
                    params[prefix + knob] = trial.suggest_categorical(prefix + knob, list(vals))
        for knob, vals in self.structure.items():
            if len(vals) <= 1:
                continue
            if knob == "drop_blocks":
                params[knob] = trial.suggest_categorical(knob, list(vals))
            else:
                per_block = self.granularity != "model"
                for b in ctx.anatomy.blocks if per_block else ctx.anatomy.blocks[:1]:
                    key = f"b{b.index}.{knob}" if per_block else knob
                    params[key] = trial.suggest_categorical(key, list(vals))
        return self.plan_from_params(params, ctx)

    def plan_from_params(self, params: Mapping[str, Any], ctx: SpaceContext) -> Plan:
        """Build the plan that a set of trial parameters stands for (single levels fill the rest)."""
        a = ctx.anatomy
        layers: dict[str, LayerChoice] = {}
        for prefix, group, names in self._units(a):
            lv = self.levels_for(group)
            setting = {k: params.get(prefix + k, v[0]) for k, v in lv.items()}
            choice = layer_choice(setting)
            if not choice.is_identity:
                for n in names:
                    layers[n] = choice

        def structure_value(knob: str, block: int) -> Any:
            vals = self.structure.get(knob, (1.0,))
            key = knob if self.granularity == "model" else f"b{block}.{knob}"
            return params.get(key, params.get(knob, vals[0]))

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
        model = ModelRef.of(a)
        return Plan(model=model, layers=layers, blocks=blocks, drop_blocks=drops, provenance=ctx.provenance)

    # ---- baselines and extremes -----------------------------------------------------------
    def baseline_params(self, anatomy: ModelAnatomy) -> dict[str, dict[str, Any]]:
        """Give Optuna parameters for each baseline the space can express (others are skipped)."""
        out = {}
        for bname, setting in self.baselines.items():
            params = self._uniform_params(anatomy, setting)
            if params is not None:
                out[bname] = params
        return out

    def _uniform_params(
        self,
        anatomy: ModelAnatomy,
        setting: Mapping[str, Any],
        per_block: Mapping[int, Mapping[str, Any]] | None = None,
    ) -> dict[str, Any] | None:
        """Give the parameters of one setting (unset knobs at their no-op level; ``per_block``
        replaces it for some blocks), or None when a wanted level is not in the space."""
        per_block = per_block or {}
        params: dict[str, Any] = {}
        for prefix, group, names in self._units(anatomy):
            block = anatomy.find_linear(names[0]).block if self.granularity != "model" else None
            s = per_block.get(block, setting) if block is not None else setting
            lv = self.levels_for(group)
            for knob, vals in lv.items():
                want = s.get(knob, _NOOP.get(knob, vals[0]))
                if knob == "group_size" and s.get("bits", 16) > 4:
                    continue
                if want not in vals:
                    return None
                if len(vals) > 1:
                    params[prefix + knob] = want
        for knob, vals in self.structure.items():
            want = setting.get(knob, _NOOP[knob])
            if want not in vals:
                return None
            if len(vals) <= 1:
                continue
            if knob == "drop_blocks" or self.granularity == "model":
                params[knob] = want
            else:
                params.update({f"b{b.index}.{knob}": want for b in anatomy.blocks})
        return params

    def mixed_seed_params(self, anatomy: ModelAnatomy, sensitivity_order: Sequence[int]) -> dict[str, dict[str, Any]]:
        """Give seeds between adjacent quantization baselines: the most sensitive blocks keep the
        finer format, the rest take the coarser one (at 25 % and 50 % of blocks kept finer).

        ``sensitivity_order`` lists blocks most sensitive first (e.g. by measured block distance).
        Only for block or linear granularity; pairs whose formats the space lacks are skipped.
        """
        if self.granularity == "model":
            return {}
        ladder = [(name, s) for name, s in self.baselines.items() if set(s) <= {"bits", "group_size"} and s]
        ladder.sort(key=lambda item: -item[1]["bits"])
        out: dict[str, dict[str, Any]] = {}
        for (fine_name, fine), (coarse_name, coarse) in itertools.pairwise(ladder):
            for frac in (0.25, 0.5):
                keep = list(sensitivity_order)[: max(1, round(frac * anatomy.num_blocks))]
                params = self._uniform_params(anatomy, coarse, dict.fromkeys(keep, fine))
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
        struct = {k: (max(v) if k == "drop_blocks" else min(v)) for k, v in self.structure.items()}
        plans = []
        for combo in itertools.product(*levels.values()):
            setting = {**dict(zip(levels, combo, strict=True)), **struct}
            params = {}
            for prefix, group, _ in self._units(ctx.anatomy):  # a level missing in one group: use that group's first
                for k, vals in self.levels_for(group).items():
                    params[prefix + k] = setting[k] if setting[k] in vals else vals[0]
            for knob, val in struct.items():
                params[knob] = val
                params.update({f"b{b.index}.{knob}": val for b in ctx.anatomy.blocks})
            try:
                plans.append(self.plan_from_params(params, ctx))
            except PlanError:
                continue
        return plans


_NOOP: dict[str, Any] = {
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
    try:
        if knob in ("bits", "act_bits") and (not isinstance(level, int) or isinstance(level, bool)):
            raise PlanError(f"{knob} must be an integer")
        layer_choice(setting)
    except (PlanError, TypeError, ValueError) as exc:
        raise fail(f"invalid level {level!r} in {where} ({str(exc).split(': ', 1)[-1]})") from None


def layer_choice(setting: Mapping[str, Any]) -> LayerChoice:
    """Turn knob levels into a LayerChoice (``"2:4"`` as a sparsity level means the 2:4 pattern)."""
    s = dict(setting)
    if s.get("sparsity") == "2:4":
        s["sparsity"], s["sparsity_pattern"] = 0.5, "2:4"
    if s.get("bits", 16) > 4:
        s.pop("group_size", None)
    if isinstance(s.get("sparsity"), int):
        s["sparsity"] = float(s["sparsity"])
    return LayerChoice.from_dict(s, "search space level")
