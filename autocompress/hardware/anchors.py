"""Published end-to-end anchors: predict them from model configs alone and compare (hardware.md §1.3).

Each profile lists its anchors (``anchors:`` in the YAML): role ``fit`` anchors set the profile's
efficiency and overhead fields, ``holdout`` anchors are only checked. Models are described by
their public config shapes (no weights), built with ``llama_like_anatomy``.
"""

from __future__ import annotations

from dataclasses import dataclass

from autocompress.errors import ProfileError
from autocompress.hardware.cost import CostModel
from autocompress.hardware.profile import Anchor, HardwareProfile
from autocompress.model.anatomy import BlockInfo, EmbeddingSite, LinearSite, ModelAnatomy
from autocompress.plan import LayerChoice, ModelRef, Plan

# name: (blocks, hidden, heads, kv_heads, mlp, vocab, tied) from each model's public config.json
ANCHOR_MODELS: dict[str, tuple[int, int, int, int, int, int, bool]] = {
    "smollm2-135m": (30, 576, 9, 3, 1536, 49152, True),
    "tinyllama-1.1b": (22, 2048, 32, 4, 5632, 32000, False),
    "qwen2.5-1.5b": (28, 1536, 12, 2, 8960, 151936, True),
    "llama-3.2-1b": (16, 2048, 32, 8, 8192, 128256, True),
    "llama-3.2-3b": (28, 3072, 24, 8, 8192, 128256, True),
    "llama-3.1-8b": (32, 4096, 32, 8, 14336, 128256, False),
    "llama-2-7b": (32, 4096, 32, 32, 11008, 32000, False),
    "llama-2-13b": (40, 5120, 40, 40, 13824, 32000, False),
}


def llama_like_anatomy(
    name: str = "synthetic",
    n_blocks: int = 16,
    hidden: int = 2048,
    heads: int = 32,
    kv: int = 8,
    mlp: int = 8192,
    vocab: int = 32000,
    tied: bool = True,
) -> ModelAnatomy:
    """Give a Llama-shaped anatomy (pure data: no weights exist anywhere)."""
    d = hidden // heads
    roles = [("q", heads * d, hidden), ("k", kv * d, hidden), ("v", kv * d, hidden), ("o", hidden, heads * d)]
    roles += [("gate", mlp, hidden), ("up", mlp, hidden), ("down", hidden, mlp)]
    blocks = tuple(
        BlockInfo(
            index=i,
            prefix=f"layers.{i}",
            linears=tuple(LinearSite(f"layers.{i}.{r}", i, r, inf, out) for r, out, inf in roles),
            num_heads=heads,
            num_kv_heads=kv,
            head_dim=d,
            mlp_dim=mlp,
        )
        for i in range(n_blocks)
    )
    return ModelAnatomy(
        name=name,
        model_hash="0" * 64,
        architecture="llama",
        task="causal-lm",
        hidden_size=hidden,
        vocab_size=vocab,
        max_positions=4096,
        blocks=blocks,
        other_params=vocab * hidden * (1 if tied else 2) + (2 * n_blocks + 1) * hidden,
        tied_embeddings=tied,
        embeddings=(EmbeddingSite("embed_tokens", "embed", vocab, hidden, tied),)
        + (() if tied else (EmbeddingSite("lm_head", "head", vocab, hidden),)),
    )


def anchor_anatomy(model: str) -> ModelAnatomy:
    """Give the anatomy of an anchor model by name (see ``ANCHOR_MODELS``)."""
    if model not in ANCHOR_MODELS:
        raise ProfileError(f"unknown anchor model {model!r}; known: {', '.join(ANCHOR_MODELS)}")
    n, h, heads, kv, mlp, vocab, tied = ANCHOR_MODELS[model]
    return llama_like_anatomy(model, n, h, heads, kv, mlp, vocab, tied)


@dataclass(frozen=True)
class AnchorResult:
    """One anchor: published vs predicted decode tokens/s."""

    profile: str
    anchor: Anchor
    predicted_tok_s: float

    @property
    def ratio(self) -> float:
        """Predicted / published tokens per second."""
        return self.predicted_tok_s / self.anchor.decode_tok_s


def predict_anchor(profile: HardwareProfile, anchor: Anchor) -> AnchorResult:
    """Give the predicted decode tokens/s for one anchor, from the model config alone."""
    a = anchor_anatomy(anchor.model)
    grid = {"format": anchor.format} if anchor.format else {"bits": anchor.bits, "group_size": anchor.group_size}
    if not anchor.format:
        grid["symmetric"] = anchor.symmetric
    choice = LayerChoice(
        **grid,
        sparsity=0.5 if anchor.sparsity_pattern == "2:4" else 0.0,
        sparsity_pattern="2:4" if anchor.sparsity_pattern == "2:4" else "unstructured",
    )
    plan = Plan(model=ModelRef.of(a), default=choice)
    cost = CostModel(profile, a, context_tokens=anchor.context_tokens).predict(plan)
    return AnchorResult(profile.id, anchor, cost.tokens_per_s)


def check_anchors(profiles: list[HardwareProfile]) -> list[AnchorResult]:
    """Give predicted vs published for every anchor of every profile."""
    return [predict_anchor(p, a) for p in profiles for a in p.anchors]
