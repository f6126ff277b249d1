"""ModelAnatomy: the shape facts of a transformer that the plan, space and cost model need.

Pure data (no torch): blocks, each block's linears with their roles, heads and widths.
Built from a loaded model by ``anatomy_of``; serialisable so a study can keep it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any

ATTN_ROLES = ("q", "k", "v", "qkv", "o")
MLP_ROLES = ("gate", "up", "gate_up", "down", "fc1", "fc2")
_HEADS_OUT = frozenset({"q", "k", "v", "qkv"})  # outputs shrink with kept heads
_HEADS_IN = frozenset({"o"})
_MLP_OUT = frozenset({"gate", "up", "gate_up", "fc1"})  # outputs shrink with kept MLP channels
_MLP_IN = frozenset({"down", "fc2"})


@dataclass(frozen=True)
class LinearSite:
    """One linear layer inside a block. ``transposed`` marks HF GPT-2 ``Conv1D`` (weight is in×out).

    A fused linear (role ``qkv`` or ``gate_up``) is one tensor to quantize or factorize; ``parts``
    gives the roles stacked along its output and their widths, e.g. (("q", 512), ("k", 128), ("v", 128)).
    """

    name: str
    block: int
    role: str
    in_features: int
    out_features: int
    transposed: bool = False
    parts: tuple[tuple[str, int], ...] = ()

    @property
    def group(self) -> str:
        return "attn" if self.role in ATTN_ROLES else "mlp"

    @property
    def params(self) -> int:
        return self.in_features * self.out_features

    def shape_after(self, head_frac: float = 1.0, mlp_frac: float = 1.0) -> tuple[int, int]:
        """Give the (out, in) shape once the block keeps ``head_frac`` of its heads and ``mlp_frac``
        of its MLP channels (whole heads and channels, so the products are integers in practice)."""
        out_f, in_f = self.out_features, self.in_features
        if self.role in _HEADS_OUT:
            out_f = max(1, round(out_f * head_frac))
        elif self.role in _HEADS_IN:
            in_f = max(1, round(in_f * head_frac))
        elif self.role in _MLP_OUT:
            out_f = max(1, round(out_f * mlp_frac))
        elif self.role in _MLP_IN:
            in_f = max(1, round(in_f * mlp_frac))
        return out_f, in_f


@dataclass(frozen=True)
class EmbeddingSite:
    """The token embedding or the output head: a [rows, cols] table a plan may store in a format.

    ``tied``: the output head is the embedding's own table, so one choice covers both (the plan
    names it by the embedding). ``rows`` is the vocabulary, ``cols`` the hidden size.
    """

    name: str
    role: str  # "embed" | "head"
    rows: int
    cols: int
    tied: bool = False

    @property
    def params(self) -> int:
        return self.rows * self.cols


@dataclass(frozen=True)
class BlockInfo:
    """One transformer block: its module path, linears and widths."""

    index: int
    prefix: str
    linears: tuple[LinearSite, ...]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    norms: tuple[str, ...] = ()  # norm modules in the block (pre / post attention and MLP, q / k norms)
    qk_norm: str = ""  # "per-head" | "per-projection" (over all heads' dims) | "" (none)
    sliding_window: int | None = None  # tokens this block's attention sees, None = the whole context

    @property
    def heads_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def fractions(self, keep_heads: int | None, keep_mlp_channels: int | None) -> tuple[float, float]:
        """Give the kept fractions (heads, MLP channels) of a block width choice."""
        head_frac = 1.0 if keep_heads is None else keep_heads / self.num_heads
        mlp_frac = 1.0 if keep_mlp_channels is None else keep_mlp_channels / self.mlp_dim
        return head_frac, mlp_frac


@dataclass(frozen=True)
class ModelAnatomy:
    """Everything about a model's structure that compression and costing need."""

    name: str
    model_hash: str
    architecture: str  # the config's model_type: "llama", "qwen3", "phi3", "gpt2", "bert"...
    task: str  # "causal-lm" | "encoder"
    hidden_size: int
    vocab_size: int
    max_positions: int
    blocks: tuple[BlockInfo, ...]
    other_params: int  # embeddings, norms, untied heads: everything outside block linears
    tied_embeddings: bool
    embeddings: tuple[EmbeddingSite, ...] = ()  # the token embedding and (untied) output head
    embedding_scale: float = 1.0  # the config's embedding multiplier (Granite), 1 where it names none

    def find_embedding(self, name: str) -> EmbeddingSite | None:
        return next((e for e in self.embeddings if e.name == name), None)

    @property
    def tensor_names(self) -> tuple[str, ...]:
        """Give every tensor a plan may set: block linears, then embedding / head."""
        return (*(s.name for s in self.linears), *(e.name for e in self.embeddings))

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def linears(self) -> tuple[LinearSite, ...]:
        return tuple(s for b in self.blocks for s in b.linears)

    @cached_property
    def _by_name(self) -> dict[str, LinearSite]:
        return {s.name: s for s in self.linears}

    def find_linear(self, name: str) -> LinearSite | None:
        return self._by_name.get(name)

    @property
    def block_linear_params(self) -> int:
        return sum(s.params for s in self.linears)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelAnatomy:
        def site(s: dict[str, Any]) -> LinearSite:
            return LinearSite(**{**s, "parts": tuple((r, int(w)) for r, w in s.get("parts", ()))})

        blocks = tuple(
            BlockInfo(**{**b, "linears": tuple(site(s) for s in b["linears"]), "norms": tuple(b.get("norms", ()))})
            for b in d["blocks"]
        )
        embeddings = tuple(EmbeddingSite(**e) for e in d.get("embeddings", ()))
        return cls(**{**d, "blocks": blocks, "embeddings": embeddings})
