"""Pruning: unstructured / 2:4 keep-masks (magnitude, Wanda) and structured importance scores.

Scores are compared per output row, as in Wanda (Sun et al. 2023): |W_ij| for magnitude,
|W_ij|·sqrt(Σ_tokens x_j²) for Wanda. Ties are broken by position (lower input index is pruned
first) through stable sorts, so masks are deterministic.

Structured scores (Minitron / Wanda-style, weight × activation): MLP channel j scores
sqrt(input_sq_norm_j of down/fc2) · ||column j of down/fc2||; an attention head scores the sum of
the same quantity over its dims of the o-projection input; a KV group scores the sum of its
query heads. Without statistics the activation factor is left out (weight-only importance).
"""

from __future__ import annotations

import torch

from autocompress.errors import PlanError


def prune_scores(weight: torch.Tensor, method: str, input_sq_norm: torch.Tensor | None = None) -> torch.Tensor:
    """Give the per-weight importance [out, in] used to choose which weights to zero."""
    score = weight.detach().float().abs()
    if method == "magnitude":
        return score
    if method != "wanda":
        raise PlanError(f"unknown prune_method {method!r}; choose 'wanda' or 'magnitude'")
    if input_sq_norm is None:
        raise PlanError(
            "Wanda pruning needs activation statistics (input norms): pass calibration stats or use 'magnitude'"
        )
    if input_sq_norm.shape != (weight.shape[1],):
        raise PlanError(f"input norms have shape {tuple(input_sq_norm.shape)}, the weight has {weight.shape[1]} inputs")
    return score * input_sq_norm.float().clamp(min=0.0).sqrt().unsqueeze(0)


def prune_mask(
    weight: torch.Tensor,
    sparsity: float,
    pattern: str = "unstructured",
    method: str = "magnitude",
    input_sq_norm: torch.Tensor | None = None,
) -> torch.Tensor:
    """Give the boolean keep-mask [out, in]: round(sparsity·in) zeros per row, or 2 of every 4 for "2:4"."""
    out_features, in_features = weight.shape
    if pattern == "2:4":
        if in_features % 4:
            raise PlanError(f"2:4 sparsity needs an input size divisible by 4, got {in_features}")
        score = prune_scores(weight, method, input_sq_norm).reshape(out_features, in_features // 4, 4)
        order = torch.argsort(score, dim=-1, stable=True)
        mask = torch.ones_like(score, dtype=torch.bool)
        mask.scatter_(-1, order[..., :2], False)
        return mask.reshape(out_features, in_features)
    if pattern != "unstructured":
        raise PlanError(f"unknown sparsity_pattern {pattern!r}; choose 'unstructured' or '2:4'")
    num_zero = round(sparsity * in_features)
    if num_zero == 0:
        return torch.ones(out_features, in_features, dtype=torch.bool, device=weight.device)
    # same result as a stable sort (ties: lower index pruned first), in linear time per row
    score = prune_scores(weight, method, input_sq_norm)
    threshold = score.kthvalue(num_zero, dim=1, keepdim=True).values
    below = score < threshold
    tied = score == threshold
    still_needed = num_zero - below.sum(dim=1, keepdim=True)
    return ~(below | (tied & (tied.cumsum(dim=1) <= still_needed)))


def input_channel_scores(weight: torch.Tensor, input_sq_norm: torch.Tensor | None = None) -> torch.Tensor:
    """Give one score per input channel j of an [out, in] weight: ||W[:, j]|| · sqrt(input_sq_norm_j)."""
    score = weight.detach().float().norm(dim=0)
    if input_sq_norm is not None:
        if input_sq_norm.shape != score.shape:
            raise PlanError(
                f"input norms have shape {tuple(input_sq_norm.shape)}, the weight has {score.numel()} inputs"
            )
        score = score * input_sq_norm.to(score.device).float().clamp(min=0.0).sqrt()
    return score


def mlp_channel_scores(down_weight: torch.Tensor, down_input_sq_norm: torch.Tensor | None = None) -> torch.Tensor:
    """Give the importance of every MLP channel [mlp_dim] from the down/fc2 weight [hidden, mlp_dim]."""
    return input_channel_scores(down_weight, down_input_sq_norm)


def head_scores(
    o_weight: torch.Tensor, num_heads: int, head_dim: int, o_input_sq_norm: torch.Tensor | None = None
) -> torch.Tensor:
    """Give the importance of every query head [num_heads] from the o-projection weight [hidden, heads·head_dim]."""
    return input_channel_scores(o_weight, o_input_sq_norm).reshape(num_heads, head_dim).sum(dim=1)


def kv_group_scores(query_head_scores: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Give the importance of every KV group: the sum of its query heads (head h uses KV head h // heads_per_kv)."""
    return query_head_scores.reshape(num_kv_heads, -1).sum(dim=1)


def top_indices(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Give the indices of the ``keep`` highest scores in their original order (ties: lower index kept)."""
    if not 1 <= keep <= scores.numel():
        raise PlanError(f"cannot keep {keep} of {scores.numel()} units")
    order = torch.argsort(-scores.double(), stable=True)
    return torch.sort(order[:keep]).values
