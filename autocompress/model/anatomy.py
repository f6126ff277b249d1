"""ModelAnatomy: the shape facts of a transformer that the plan, space and cost model need.

Pure data (no torch): blocks, each block's linears with their roles, heads and widths.
Built from a loaded model by ``anatomy_of``; serialisable so a study can keep it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any

ATTN_ROLES = ("q", "k", "v", "qkv", "o")
MLP_ROLES = ("gate", "up", "down", "fc1", "fc2")


@dataclass(frozen=True)
class LinearSite:
    """One linear layer inside a block. ``transposed`` marks HF GPT-2 ``Conv1D`` (weight is in×out)."""

    name: str
    block: int
    role: str
    in_features: int
    out_features: int
    transposed: bool = False

    @property
    def group(self) -> str:
        return "attn" if self.role in ATTN_ROLES else "mlp"

    @property
    def params(self) -> int:
        return self.in_features * self.out_features


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

    @property
    def heads_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass(frozen=True)
class ModelAnatomy:
    """Everything about a model's structure that compression and costing need."""

    name: str
    model_hash: str
    architecture: str  # "llama" | "gpt2" | "bert"
    task: str  # "causal-lm" | "encoder"
    hidden_size: int
    vocab_size: int
    max_positions: int
    blocks: tuple[BlockInfo, ...]
    other_params: int  # embeddings, norms, untied heads: everything outside block linears
    tied_embeddings: bool

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
        blocks = tuple(BlockInfo(**{**b, "linears": tuple(LinearSite(**s) for s in b["linears"])}) for b in d["blocks"])
        return cls(**{**d, "blocks": blocks})
