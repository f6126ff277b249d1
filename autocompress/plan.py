"""The compression plan: pure data (no torch), YAML round-trip, canonical hash, validation.

A plan says, for one base model, what happens to every linear layer (bits, group size,
sparsity, low-rank), to every block's width (attention heads, MLP channels) and to depth
(dropped blocks). ``apply_plan`` turns it into weights deterministically; the cost model
prices it without weights.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from autocompress._io import atomic_write_text, parse_yaml, read_text
from autocompress.errors import PlanError

if TYPE_CHECKING:
    from autocompress.model.anatomy import ModelAnatomy

SCHEMA_VERSION = 1
SPARSITY_PATTERNS = ("unstructured", "2:4")
PRUNE_METHODS = ("wanda", "magnitude")
# imatrix: scales fitted to importance-weighted error (llama.cpp); gptq-imatrix: GPTQ codes on such a grid
QUANT_METHODS = ("rtn", "imatrix", "gptq", "gptq-imatrix")
GPTQ_METHODS = ("gptq", "gptq-imatrix")  # the methods that choose codes with the calibration Hessian
LOWRANK_METHODS = ("svd", "asvd", "svd-llm")
ACT_BITS = (8, 16)


def _require(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise PlanError(f"{where}: {msg}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class LayerChoice:
    """What happens to one tensor (a linear layer, or the token embedding / output head). The
    defaults leave it untouched.

    ``format`` names a storage format of the registry (``autocompress.formats``: ``Q4_K``,
    ``IQ4_NL``, ``int4-g128-asym``...); None keeps the base model's dense weights. ``bits``,
    ``group_size`` and ``symmetric`` are read-only facts of the format (16 / None / True when
    dense); they are also accepted as input, the way plans written before formats existed said it,
    and then name the generic integer grid ``int{bits}-g{group_size}-{sym|asym}`` (``-ch-`` for one
    scale per output row), which reproduces those plans' weights bit for bit.
    ``quant_method`` rtn (round to nearest, the runtime's reference quantizer), imatrix (scales fitted
    to the importance-weighted error, the input's Σx² per column, as llama.cpp does with an
    imatrix), gptq (error-compensated codes on the format's reference grid, from the calibration
    Hessian) or gptq-imatrix (the grid fitted as imatrix fits it, with the Hessian's diagonal, the
    input's Σx², as importance; then GPTQ's codes on it).
    ``rank_ratio`` is the kept rank as a fraction of the break-even rank r* = m·n/(m+n), so every
    value in (0, 1] stores fewer numbers than the dense layer; the rank is rounded to a multiple of 8.
    ``lowrank_method`` svd, asvd (activation-scaled) or svd-llm (Hessian-whitened);
    ``act_bits`` 8 fake-quantizes the layer's input per token (W8A8), 16 leaves it alone.
    Fields added later default to the earlier behaviour and are left out of the YAML (and the
    hash) when at their default.
    """

    bits: int = 16
    group_size: int | None = None
    symmetric: bool = True
    sparsity: float = 0.0
    sparsity_pattern: str = "unstructured"
    prune_method: str = "wanda"
    rank_ratio: float | None = None
    quant_method: str = "rtn"
    lowrank_method: str = "svd"
    act_bits: int = 16
    format: str | None = None

    def __post_init__(self) -> None:
        where = "layer choice"
        _require(
            _is_int(self.bits) and 2 <= self.bits <= 16, where, f"bits must be an integer in 2..16, got {self.bits!r}"
        )
        _require(
            self.group_size is None or (_is_int(self.group_size) and self.group_size >= 1),
            where,
            f"group_size must be a positive integer or null, got {self.group_size!r}",
        )
        _require(isinstance(self.symmetric, bool), where, f"symmetric must be true/false, got {self.symmetric!r}")
        self._settle_format(where)
        _require(
            _is_num(self.sparsity) and 0.0 <= self.sparsity < 1.0,
            where,
            f"sparsity must be in [0, 1), got {self.sparsity!r}",
        )
        _require(
            self.sparsity_pattern in SPARSITY_PATTERNS,
            where,
            f"sparsity_pattern must be one of {list(SPARSITY_PATTERNS)}, got {self.sparsity_pattern!r}",
        )
        if self.sparsity_pattern == "2:4":
            _require(self.sparsity == 0.5, where, f"sparsity_pattern 2:4 means sparsity 0.5, got {self.sparsity!r}")
        _require(
            self.prune_method in PRUNE_METHODS,
            where,
            f"prune_method must be one of {list(PRUNE_METHODS)}, got {self.prune_method!r}",
        )
        _require(
            self.rank_ratio is None or (_is_num(self.rank_ratio) and 0.0 < self.rank_ratio <= 1.0),
            where,
            f"rank_ratio must be in (0, 1] or null, got {self.rank_ratio!r}",
        )
        for name, allowed in (
            ("quant_method", QUANT_METHODS),
            ("lowrank_method", LOWRANK_METHODS),
            ("act_bits", ACT_BITS),
        ):
            value = getattr(self, name)
            _require(
                type(value) is type(allowed[0]) and value in allowed,
                where,
                f"{name} must be one of {list(allowed)}, got {value!r}",
            )

    def _settle_format(self, where: str) -> None:
        """Make ``format`` and the (bits, group_size, symmetric) facts agree; either may be given."""
        legacy = (self.bits, self.group_size, self.symmetric)
        if self.format is None and self.bits >= 16:  # dense: group_size / symmetric never mattered
            object.__setattr__(self, "group_size", None)
            object.__setattr__(self, "symmetric", True)
            return
        from autocompress import formats  # imported here: the registry needs torch, dense plans do not

        if self.format is None:
            try:
                fmt = formats.generic(self.bits, self.group_size, self.symmetric)
            except formats.FormatError as exc:
                raise PlanError(f"{where}: {exc}") from None
            object.__setattr__(self, "format", fmt.name)
        else:
            _require(isinstance(self.format, str), where, f"format must be a format name, got {self.format!r}")
            try:
                fmt = formats.get(self.format)
            except formats.FormatError as exc:
                raise PlanError(f"{where}: {exc}") from None
            facts = _facts(fmt)
            _require(
                legacy in (facts, (16, None, True)),
                where,
                f"format {fmt.name} is {facts[0]}-bit; give either format or bits/group_size/symmetric, not both",
            )
        bits, group_size, symmetric = _facts(fmt)
        object.__setattr__(self, "bits", bits)
        object.__setattr__(self, "group_size", group_size)
        object.__setattr__(self, "symmetric", symmetric)

    @property
    def quantized(self) -> bool:
        """True when the tensor is stored in a format other than the base model's dense weights."""
        return self.format is not None

    @property
    def pruned(self) -> bool:
        return self.sparsity > 0.0

    @property
    def by_gptq(self) -> bool:
        """True when GPTQ chooses the stored codes (quantized, with a method of ``GPTQ_METHODS``)."""
        return self.quantized and self.quant_method in GPTQ_METHODS

    @property
    def is_identity(self) -> bool:
        """True when the choice changes nothing (fields such as group_size then do not matter)."""
        return not self.quantized and not self.pruned and self.rank_ratio is None and self.act_bits == 16

    @property
    def fmt(self):  # -> formats.Format (not annotated: plan.py stays importable without torch)
        """Give the registry format of this choice (None when dense)."""
        from autocompress import formats

        return None if self.format is None else formats.get(self.format)

    def rank_for(self, out_features: int, in_features: int) -> int | None:
        """Give the kept rank for an out×in layer (a multiple of 8, at least 8, never above r*), or None."""
        if self.rank_ratio is None:
            return None
        r_star = out_features * in_features / (out_features + in_features)
        rank = max(8, round(self.rank_ratio * r_star / 8.0) * 8)
        if rank > r_star:  # rounding up past break-even: take the multiple of 8 below it
            rank = int(r_star // 8) * 8
        if rank < 8:
            raise PlanError(
                f"rank_ratio: a {out_features}×{in_features} layer has break-even rank {r_star:.1f} < 8; "
                "no multiple-of-8 rank pays off, leave it dense"
            )
        return rank

    def to_dict(self) -> dict[str, Any]:
        """Give only the fields that differ from the defaults (keeps plan files short); the format
        stands for bits / group_size / symmetric."""
        default = LayerChoice()
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name not in _FORMAT_FACTS and getattr(self, f.name) != getattr(default, f.name)
        }

    def hash_dict(self) -> dict[str, Any]:
        """Give what the plan hash covers of this choice: ``to_dict``, except that a generic integer
        grid is written as the bits / group_size / symmetric it was named by before formats existed,
        so plans written then keep their hash (and their cached evaluations)."""
        d = self.to_dict()
        if self.format is not None and self.format.startswith("int"):
            from autocompress import formats

            if formats.generic(self.bits, self.group_size, self.symmetric).name == self.format:
                d.pop("format")
                d.update({"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric})
                d = {k: v for k, v in d.items() if v != getattr(LayerChoice(), k) or k == "bits"}
        return d

    @classmethod
    def from_dict(cls, data: Any, where: str) -> LayerChoice:
        _require(isinstance(data, Mapping), where, f"expected a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(map(str, data)) - known)
        _require(not unknown, where, f"unknown field(s) {unknown}; allowed: {sorted(known)}")
        if _is_int(data.get("sparsity")):
            data = {**data, "sparsity": float(data["sparsity"])}
        if _is_int(data.get("rank_ratio")):
            data = {**data, "rank_ratio": float(data["rank_ratio"])}
        try:
            return cls(**data)
        except PlanError as exc:
            raise PlanError(f"{where}: {str(exc).split(': ', 1)[1]}") from None


_FORMAT_FACTS = ("bits", "group_size", "symmetric")


def _facts(fmt: Any) -> tuple[int, int | None, bool]:
    """Give (bits, group_size, symmetric) of a registry format, as LayerChoice reports them."""
    return (min(fmt.bits, 16), fmt.group_size, bool(fmt.symmetric))


@dataclass(frozen=True)
class BlockChoice:
    """Width of one block: query heads kept (whole KV groups) and MLP channels kept."""

    keep_heads: int | None = None
    keep_mlp_channels: int | None = None

    def __post_init__(self) -> None:
        for name in ("keep_heads", "keep_mlp_channels"):
            v = getattr(self, name)
            _require(
                v is None or (_is_int(v) and v >= 1),
                "block choice",
                f"{name} must be a positive integer or null, got {v!r}",
            )

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: Any, where: str) -> BlockChoice:
        _require(isinstance(data, Mapping), where, f"expected a mapping, got {type(data).__name__}")
        unknown = sorted(set(map(str, data)) - {"keep_heads", "keep_mlp_channels"})
        _require(not unknown, where, f"unknown field(s) {unknown}; allowed: ['keep_heads', 'keep_mlp_channels']")
        try:
            return cls(**data)
        except PlanError as exc:
            raise PlanError(f"{where}: {str(exc).split(': ', 1)[1]}") from None


@dataclass(frozen=True)
class ModelRef:
    """Which base model a plan is for."""

    name: str
    hash: str
    architecture: str
    num_blocks: int

    @classmethod
    def of(cls, anatomy: ModelAnatomy) -> ModelRef:
        """Give the reference to the model an anatomy describes."""
        return cls(anatomy.name, anatomy.model_hash, anatomy.architecture, anatomy.num_blocks)


@dataclass(frozen=True)
class Provenance:
    """Where a plan came from. Only ``data_hash`` and ``seed`` affect the weights."""

    data_hash: str | None = None
    data: Mapping[str, Any] = field(default_factory=dict)  # the DataConfig that produced data_hash
    seed: int = 0
    profile: str | None = None
    space: str | None = None
    study: str | None = None
    trial: int | None = None
    versions: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RecoverySpec:
    """Distillation after compression (``autocompress.recover``): every setting that shapes the weights.

    ``steps`` is the exact number of optimizer steps taken (a minutes budget is turned into steps
    when it runs, so re-applying the plan repeats it exactly); ``data_hash`` is the hash of the
    training sequences (drawn from the calibration documents only).
    """

    steps: int
    tokens: int  # training sequences × seq_len drawn from the calibration documents
    seq_len: int
    batch_size: int
    lr: float
    warmup_steps: int
    temperature: float
    hidden_weight: float
    seed: int
    data_hash: str

    def __post_init__(self) -> None:
        where = "plan.recovery"
        for name in ("steps", "tokens", "seq_len", "batch_size", "warmup_steps", "seed"):
            v = getattr(self, name)
            low = 0 if name in ("steps", "warmup_steps", "seed") else 1
            _require(_is_int(v) and v >= low, f"{where}.{name}", f"must be an integer >= {low}, got {v!r}")
        for name in ("lr", "temperature"):
            v = getattr(self, name)
            _require(_is_num(v) and v > 0, f"{where}.{name}", f"must be a positive number, got {v!r}")
        _require(
            _is_num(self.hidden_weight) and self.hidden_weight >= 0,
            f"{where}.hidden_weight",
            f"must be a number >= 0, got {self.hidden_weight!r}",
        )
        _require(isinstance(self.data_hash, str), f"{where}.data_hash", "must be a string")

    @classmethod
    def from_dict(cls, data: Any) -> RecoverySpec:
        _require(isinstance(data, Mapping), "plan.recovery", f"expected a mapping, got {type(data).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(map(str, data)) - set(known))
        _require(not unknown, "plan.recovery", f"unknown field(s) {unknown}; allowed: {sorted(known)}")
        missing = [k for k in known if k not in data]
        _require(not missing, "plan.recovery", f"missing field(s) {missing}")
        floats = ("lr", "temperature", "hidden_weight")
        return cls(**{k: float(v) if k in floats and _is_int(v) else v for k, v in data.items()})


@dataclass(frozen=True)
class Plan:
    """A complete, reproducible compression recipe for one base model."""

    model: ModelRef
    default: LayerChoice = LayerChoice()
    layers: Mapping[str, LayerChoice] = field(default_factory=dict)
    blocks: Mapping[int, BlockChoice] = field(default_factory=dict)
    drop_blocks: tuple[int, ...] = ()
    provenance: Provenance = Provenance()
    recovery: RecoverySpec | None = None  # distillation after compression; None (left out of YAML and hash) = none

    def choice_for(self, linear_name: str) -> LayerChoice:
        """Give the effective choice for one block linear (its own entry, else the plan default)."""
        return self.layers.get(linear_name, self.default)

    def embedding_choice(self, name: str) -> LayerChoice:
        """Give the choice for the token embedding / output head (its own entry, else dense: the
        plan default covers block linears only)."""
        return self.layers.get(name, _DENSE)

    def block_choice(self, index: int) -> BlockChoice:
        return self.blocks.get(index, BlockChoice())

    @property
    def is_uncompressed(self) -> bool:
        """True when the plan changes nothing: every linear as is, full widths, no block dropped."""
        return (
            self.default.is_identity
            and all(c.is_identity for c in self.layers.values())
            and all(b == BlockChoice() for b in self.blocks.values())
            and not self.drop_blocks
        )

    # ---- serialisation -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        prov = asdict(self.provenance)
        prov["versions"] = dict(sorted(self.provenance.versions.items()))
        prov["data"] = dict(sorted(self.provenance.data.items()))
        out = {
            "schema_version": SCHEMA_VERSION,
            "model": asdict(self.model),
            "default": self.default.to_dict(),
            "layers": {k: self.layers[k].to_dict() for k in sorted(self.layers)},
            "blocks": {int(k): self.blocks[k].to_dict() for k in sorted(self.blocks)},
            "drop_blocks": sorted(self.drop_blocks),
            "provenance": prov,
        }
        if self.recovery is not None:
            out["recovery"] = asdict(self.recovery)
        return out

    def to_yaml(self) -> str:
        """Give the plan file's text: a header with the plan hash and the content's checksum, then the YAML."""
        body = yaml.safe_dump(self.to_dict(), sort_keys=True, default_flow_style=False, width=100)
        # checksum of the content as read back, so what is written is exactly what load verifies
        checksum = content_checksum(yaml.safe_load(body))
        return f"# autocompress plan {self.hash()[:16]}\n{CHECKSUM_PREFIX}{checksum}\n{body}"

    def save(self, path: str | Path) -> Path:
        """Write the plan as YAML (atomically, with a fresh checksum) and give the path."""
        atomic_write_text(path, self.to_yaml())
        return Path(path)

    @classmethod
    def from_dict(cls, data: Any) -> Plan:
        _require(isinstance(data, Mapping), "plan", "the file must hold a mapping at the top level")
        allowed = {"schema_version", "model", "default", "layers", "blocks", "drop_blocks", "provenance", "recovery"}
        unknown = sorted(set(map(str, data)) - allowed)
        _require(not unknown, "plan", f"unknown top-level field(s) {unknown}")
        _require(
            data.get("schema_version") == SCHEMA_VERSION,
            "plan.schema_version",
            f"expected {SCHEMA_VERSION}, got {data.get('schema_version')!r}"
            + (" (missing: is the file truncated?)" if "schema_version" not in data else ""),
        )
        m = data.get("model")
        _require(isinstance(m, Mapping), "plan.model", "missing or not a mapping")
        for key, typ in (("name", str), ("hash", str), ("architecture", str)):
            _require(isinstance(m.get(key), typ), f"plan.model.{key}", "missing or not a string")
        _require(
            _is_int(m.get("num_blocks")) and m["num_blocks"] >= 1,
            "plan.model.num_blocks",
            "missing or not a positive integer",
        )
        extra = sorted(set(map(str, m)) - {"name", "hash", "architecture", "num_blocks"})
        _require(not extra, "plan.model", f"unknown field(s) {extra}")
        model = ModelRef(m["name"], m["hash"], m["architecture"], m["num_blocks"])
        default = LayerChoice.from_dict(data.get("default") or {}, "plan.default")
        layers_raw = data.get("layers") or {}
        _require(isinstance(layers_raw, Mapping), "plan.layers", "must be a mapping of layer name to choice")
        layers = {str(k): LayerChoice.from_dict(v, f"plan.layers.{k}") for k, v in layers_raw.items()}
        blocks_raw = data.get("blocks") or {}
        _require(isinstance(blocks_raw, Mapping), "plan.blocks", "must be a mapping of block index to choice")
        blocks: dict[int, BlockChoice] = {}
        for k, v in blocks_raw.items():
            _require(_is_int(k), f"plan.blocks.{k}", "block keys must be integers")
            blocks[k] = BlockChoice.from_dict(v, f"plan.blocks.{k}")
        drops = data.get("drop_blocks") or []
        _require(
            isinstance(drops, list) and all(_is_int(i) for i in drops),
            "plan.drop_blocks",
            "must be a list of block indices",
        )
        _require(len(set(drops)) == len(drops), "plan.drop_blocks", "lists a block twice")
        p = data.get("provenance") or {}
        _require(isinstance(p, Mapping), "plan.provenance", "must be a mapping")
        pextra = sorted(set(map(str, p)) - {f.name for f in fields(Provenance)})
        _require(not pextra, "plan.provenance", f"unknown field(s) {pextra}")
        _require(_is_int(p.get("seed", 0)), "plan.provenance.seed", "must be an integer")
        pdata = p.get("data") or {}
        _require(isinstance(pdata, Mapping), "plan.provenance.data", "must be a mapping")
        versions = p.get("versions") or {}
        _require(isinstance(versions, Mapping), "plan.provenance.versions", "must be a mapping")
        for key in ("data_hash", "profile", "space", "study"):
            _require(
                p.get(key) is None or isinstance(p.get(key), str), f"plan.provenance.{key}", "must be a string or null"
            )
        _require(
            p.get("trial") is None or _is_int(p.get("trial")), "plan.provenance.trial", "must be an integer or null"
        )
        prov = Provenance(
            data_hash=p.get("data_hash"),
            data={str(k): v for k, v in pdata.items()},
            seed=p.get("seed", 0),
            profile=p.get("profile"),
            space=p.get("space"),
            study=p.get("study"),
            trial=p.get("trial"),
            versions={str(k): str(v) for k, v in versions.items()},
        )
        return cls(
            model=model,
            default=default,
            layers=layers,
            blocks=blocks,
            drop_blocks=tuple(sorted(drops)),
            provenance=prov,
            recovery=RecoverySpec.from_dict(data["recovery"]) if data.get("recovery") is not None else None,
        )

    @classmethod
    def from_yaml(cls, text: str, source: str = "plan") -> Plan:
        data = parse_yaml(text, PlanError, source)
        if data is None:
            raise PlanError(f"{source}: the file is empty")
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: str | Path, force: bool = False) -> Plan:
        """Read a plan file; any problem is a ``PlanError`` naming the file and the field.

        A file written by ``save`` carries the checksum of its content (``# sha256 ...``, second
        header line): a file whose content no longer matches it (cut short, or edited by hand) is
        refused, so it never loads as another plan. The checksum covers the parsed content, not the
        bytes: comments, spacing and key order may change. ``force=True`` (``--force`` on the
        command line) accepts an edited file as it now reads; its hash is computed from that
        content, and saving it writes a new checksum. Files without a checksum line (written before
        plans carried one, or written by hand from scratch) load as before, unchecked.
        """
        text = read_text(path, PlanError, "plan file")
        data = parse_yaml(text, PlanError, str(path))
        if data is None:
            raise PlanError(f"{path}: the file is empty")
        stated = stated_checksum(text)
        if not force and stated is not None and stated != content_checksum(data):
            raise PlanError(
                f"{path}: the content does not match the checksum in its header (the file was edited or cut "
                "short); to use an edited plan as it now reads, pass --force (Plan.load(path, force=True))"
            )
        try:
            return cls.from_dict(data)
        except PlanError as exc:
            raise PlanError(f"{path}: {exc}") from None

    # ---- identity ------------------------------------------------------------------
    def hash(self) -> str:
        """Give the canonical sha256 of everything that determines the weights.

        Profile, study and library versions are left out: the same choices on the same
        model and data give the same weights on any target, so quality caches by this hash.
        """
        d = self.to_dict()
        default = self.default.hash_dict()
        layers = {k: self.layers[k].hash_dict() for k in sorted(self.layers)}
        key = {
            "model": d["model"]["hash"],
            "default": default,
            "layers": {k: v for k, v in layers.items() if v != default},
            "blocks": {str(k): v for k, v in d["blocks"].items() if v},
            "drop_blocks": d["drop_blocks"],
            "data_hash": self.provenance.data_hash,
            "seed": self.provenance.seed,
        }
        if self.recovery is not None:  # absent for plans without recovery, so their hash is unchanged
            key["recovery"] = d["recovery"]
        return hashlib.sha256(json.dumps(key, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def with_provenance(self, **changes: Any) -> Plan:
        return replace(self, provenance=replace(self.provenance, **changes))

    # ---- validation against a model -------------------------------------------------
    def validate(self, anatomy: ModelAnatomy) -> None:
        """Check the plan fits this model; raise ``PlanError`` naming the first problem."""
        if self.model.hash != anatomy.model_hash:
            raise PlanError(
                f"plan was made for model {self.model.name!r} (hash {self.model.hash[:12]}), "
                f"but the loaded model is {anatomy.name!r} (hash {anatomy.model_hash[:12]})"
            )
        n = anatomy.num_blocks
        for i in self.drop_blocks:
            _require(0 <= i < n, "plan.drop_blocks", f"block {i} does not exist (model has blocks 0..{n - 1})")
        _require(len(self.drop_blocks) < n, "plan.drop_blocks", f"drops all {n} blocks; at least one must stay")
        for i, bc in self.blocks.items():
            _require(0 <= i < n, f"plan.blocks.{i}", f"block {i} does not exist (model has blocks 0..{n - 1})")
            blk = anatomy.blocks[i]
            if bc.keep_heads is not None:
                g = blk.num_heads // blk.num_kv_heads
                _require(
                    bc.keep_heads <= blk.num_heads and bc.keep_heads % g == 0,
                    f"plan.blocks.{i}.keep_heads",
                    f"must be a multiple of {g} (query heads per KV head) between {g} and {blk.num_heads}, got {bc.keep_heads}",
                )
            if bc.keep_mlp_channels is not None:
                _require(
                    bc.keep_mlp_channels <= blk.mlp_dim,
                    f"plan.blocks.{i}.keep_mlp_channels",
                    f"must be between 1 and {blk.mlp_dim}, got {bc.keep_mlp_channels}",
                )
        for name in self.layers:
            if anatomy.find_linear(name) is None and anatomy.find_embedding(name) is None:
                close = [s.name for s in anatomy.linears if s.name.split(".")[-1] == name.split(".")[-1]][:2]
                hint = f"; e.g. {close}" if close else ""
                raise PlanError(f"plan.layers: unknown layer {name!r} in {anatomy.name}{hint}")
        for site in anatomy.linears:
            if site.block in self.drop_blocks:
                continue
            c = self.choice_for(site.name)
            where = f"plan.layers.{site.name}" if site.name in self.layers else "plan.default"
            blk = anatomy.blocks[site.block]
            bc = self.block_choice(site.block)
            out_f, in_f = site.shape_after(*blk.fractions(bc.keep_heads, bc.keep_mlp_channels))
            if c.rank_ratio is not None:  # the factors' rows are in and rank wide
                rank = min(c.rank_for(out_f, in_f), out_f, in_f)
                _check_format(c, (rank, in_f), site.name, where)
                _check_format(c, (out_f, rank), site.name, where)
            else:
                _check_format(c, (out_f, in_f), site.name, where)
            if c.sparsity_pattern == "2:4":
                _require(
                    site.in_features % 4 == 0,
                    where,
                    f"2:4 needs in_features divisible by 4, {site.name} has {site.in_features}",
                )
        for emb in anatomy.embeddings:
            c = self.embedding_choice(emb.name)
            where = f"plan.layers.{emb.name}"
            _require(
                c.sparsity == 0.0 and c.rank_ratio is None and c.act_bits == 16,
                where,
                "the token embedding / output head takes a format only (no sparsity, rank or act_bits)",
            )
            _require(c.quant_method == "rtn", where, "the token embedding / output head is quantized with rtn only")
            _check_format(c, (emb.rows, emb.cols), emb.name, where)


_DENSE = LayerChoice()


def with_format(choice: LayerChoice, fmt: str | None) -> LayerChoice:
    """Give ``choice`` stored in another format (None: dense), its other fields unchanged."""
    return replace(choice, format=fmt, bits=16, group_size=None, symmetric=True)


def _check_format(choice: LayerChoice, shape: tuple[int, int], name: str, where: str) -> None:
    """Refuse a format that cannot store a tensor of this (out, in) shape, naming llama.cpp's fallback."""
    fmt = choice.fmt
    if fmt is None:
        return
    reason = fmt.check(shape)
    if reason is None:
        return
    from autocompress import formats

    alt = formats.fallback(fmt.name, shape[1])
    hint = f"; the runtime's fallback is {alt}" if alt else ""
    raise PlanError(f"{where}: {fmt.name} cannot store {name} ({shape[0]}x{shape[1]}): {reason}{hint}")


def load_plan(path: str | Path, force: bool = False) -> Plan:
    """Read a plan from a YAML file (see ``Plan.load``: ``force`` accepts a hand-edited file)."""
    return Plan.load(path, force=force)


CHECKSUM_PREFIX = "# sha256 "  # second header line of a plan file: the checksum of its content


def content_checksum(data: Any) -> str:
    """Give the sha256 of parsed plan content as canonical JSON (keys sorted), the same for any key order."""

    def canonical(v: Any) -> Any:
        if isinstance(v, Mapping):  # keys as text: a block index and its digits mean the same key here
            return {str(k): canonical(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [canonical(x) for x in v]
        return v

    text = json.dumps(canonical(data), sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def stated_checksum(text: str) -> str | None:
    """Give the checksum a plan file's header states (whatever follows ``# sha256``), or None without one."""
    for line in text.splitlines():
        if not line.startswith("#"):
            break  # the header is the comment lines before the content
        if line.startswith(CHECKSUM_PREFIX.rstrip()):
            return line[len(CHECKSUM_PREFIX) :].strip()
    return None
