"""Apply a whole plan to a model, deterministically, in one fixed order.

Order (each step sees the result of the previous one):

1. structure: per kept block, shrink attention heads, then MLP channels (``structure.py``);
2. drop blocks, last among the structural steps, so plan block indices always mean the original
   numbering (it happens after every per-linear step below, which address linears by their
   original names; dropped blocks are never touched);
3. low-rank: a layer with ``rank_ratio`` becomes ``nn.Sequential(Linear(in, r), Linear(r, out))``,
   r = ``choice.rank_for(out, in)`` of its shape after step 1 (capped at min(out, in));
4. prune: a keep-mask on the weight, or on both factors of a low-rank layer. Wanda on the first
   factor uses the layer's input norms; on the second factor it uses the norms of the first
   factor's outputs estimated from the diagonal statistics, Σ_j A_kj² · input_sq_norm_j (exact if
   input channels were uncorrelated; the full covariance is not collected);
5. quantize: RTN on the (pruned) weight, or on both factors.

Input norms of layers whose inputs shrank in step 1 (o-proj, down/fc2) are indexed by the kept
channels. Compressed per-linear results (and full SVDs, so any rank reuses them) are kept in a
module-level LRU cache bounded by bytes: re-applying a choice already seen costs a copy.
"""

from __future__ import annotations

import copy
import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from autocompress.compress.lowrank import SVD, factorized_module, factors_from_svd, svd_of
from autocompress.compress.prune import prune_mask
from autocompress.compress.quantize import rtn_quantize
from autocompress.compress.structure import dense_weight, drop_blocks, shrink_heads, shrink_mlp
from autocompress.errors import PlanError
from autocompress.plan import LayerChoice, Plan

if TYPE_CHECKING:
    from autocompress.calib import ActivationStats
    from autocompress.model.anatomy import LinearSite, ModelAnatomy

DEFAULT_CACHE_BYTES = 1_500_000_000


@dataclass(frozen=True)
class CacheInfo:
    """Size and hit counters of the per-linear result / SVD cache."""

    entries: int
    bytes: int
    max_bytes: int
    hits: int
    misses: int


class _ByteLRU:
    """Least-recently-used cache of tensors (or SVDs) bounded by their total size in bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[tuple, tuple[Any, int]] = OrderedDict()
        self.bytes = self.hits = self.misses = 0

    def get(self, key: tuple) -> Any | None:
        item = self._items.get(key)
        if item is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return item[0]

    def put(self, key: tuple, value: Any, nbytes: int) -> None:
        if nbytes > self.max_bytes or key in self._items:
            return
        self._items[key] = (value, nbytes)
        self.bytes += nbytes
        self.evict()

    def evict(self) -> None:
        while self.bytes > self.max_bytes and self._items:
            _, (_, nbytes) = self._items.popitem(last=False)
            self.bytes -= nbytes

    def clear(self) -> None:
        self._items.clear()
        self.bytes = self.hits = self.misses = 0


_CACHE = _ByteLRU(DEFAULT_CACHE_BYTES)


def clear_cache() -> None:
    """Empty the per-linear result and SVD cache (and reset its counters)."""
    _CACHE.clear()


def set_cache_limit(max_bytes: int) -> None:
    """Bound the cache to ``max_bytes`` (0 disables it), evicting the oldest entries now if needed."""
    _CACHE.max_bytes = int(max_bytes)
    _CACHE.evict()


def cache_info() -> CacheInfo:
    """Give the cache's size and hit counters."""
    return CacheInfo(len(_CACHE._items), _CACHE.bytes, _CACHE.max_bytes, _CACHE.hits, _CACHE.misses)


def _digest(t: torch.Tensor | None) -> str | None:
    if t is None:
        return None
    t = t.detach().contiguous().cpu()
    return hashlib.sha1(f"{t.dtype}{tuple(t.shape)}".encode() + t.view(torch.uint8).numpy().tobytes()).hexdigest()


def _effective(choice: LayerChoice) -> tuple:
    """Give only the fields that change the weights (so equivalent choices share cache entries)."""
    q = (choice.bits, choice.group_size, choice.symmetric) if choice.quantized else None
    p = (choice.sparsity, choice.sparsity_pattern, choice.prune_method) if choice.pruned else None
    return q, p, choice.rank_ratio


def _needs_stats(choice: LayerChoice) -> bool:
    return choice.pruned and choice.prune_method == "wanda"


def compress_weight(
    weight: torch.Tensor, choice: LayerChoice, input_sq_norm: torch.Tensor | None = None, svd: SVD | None = None
) -> tuple[torch.Tensor, ...]:
    """Give the compressed fp32 weight (1-tuple) or low-rank factors (A, B) of one [out, in] weight.

    Applies low-rank, then prune, then quantize. ``svd`` may be passed to reuse a cached SVD.
    """
    out_f, in_f = weight.shape
    rank = choice.rank_for(out_f, in_f)
    if rank is None:
        return (_prune_quantize(weight.detach().float(), choice, input_sq_norm),)
    A, B = factors_from_svd(svd if svd is not None else svd_of(weight), min(rank, out_f, in_f))
    A = _prune_quantize(A, choice, input_sq_norm)
    # the second factor's inputs are A·x: their squared norms, assuming uncorrelated input channels
    mid_norm = (A.double().square() @ input_sq_norm.double()).float() if input_sq_norm is not None else None
    return A, _prune_quantize(B, choice, mid_norm)


def _prune_quantize(w: torch.Tensor, choice: LayerChoice, input_sq_norm: torch.Tensor | None) -> torch.Tensor:
    if choice.pruned:
        mask = prune_mask(w, choice.sparsity, choice.sparsity_pattern, choice.prune_method, input_sq_norm)
        w = w.masked_fill(~mask, 0.0)
    if choice.quantized:
        w = rtn_quantize(w, choice.bits, choice.group_size, choice.symmetric)
    return w


def _stats_norm(stats: ActivationStats | None, site: LinearSite, keep: torch.Tensor | None) -> torch.Tensor | None:
    if stats is None:
        return None
    norm = stats.input_sq_norms.get(site.name)
    if norm is None:
        raise PlanError(f"activation statistics have no input norms for {site.name!r}; recollect them for this model")
    if norm.shape != (site.in_features,):
        raise PlanError(f"input norms for {site.name} have shape {tuple(norm.shape)}, expected ({site.in_features},)")
    return norm.index_select(0, keep) if keep is not None else norm


def _compressed(
    model_hash: str,
    site: LinearSite,
    struct_key: str | None,
    weight: torch.Tensor,
    choice: LayerChoice,
    norm: torch.Tensor | None,
) -> tuple[torch.Tensor, ...]:
    norm = norm if _needs_stats(choice) else None
    key = ("linear", model_hash, site.name, tuple(weight.shape), struct_key, _effective(choice), _digest(norm))
    result = _CACHE.get(key)
    if result is None:
        svd = None
        if choice.rank_ratio is not None:
            svd_key = ("svd", model_hash, site.name, tuple(weight.shape), struct_key)
            svd = _CACHE.get(svd_key)
            if svd is None:
                svd = svd_of(weight)
                _CACHE.put(svd_key, svd, svd.nbytes)
        try:
            result = compress_weight(weight, choice, norm, svd)
        except PlanError as exc:
            raise PlanError(f"{site.name}: {exc}") from None
        _CACHE.put(key, result, sum(t.numel() * t.element_size() for t in result))
    return result


def _check_stats_present(anatomy: ModelAnatomy, plan: Plan, stats: ActivationStats | None) -> None:
    if stats is not None:
        return
    for site in anatomy.linears:
        if site.block not in plan.drop_blocks and _needs_stats(plan.choice_for(site.name)):
            raise PlanError(
                f"{site.name} uses Wanda pruning, which needs activation statistics: pass calibration stats "
                "or set prune_method: magnitude"
            )


def apply_plan_to(
    model: nn.Module, anatomy: ModelAnatomy, plan: Plan, stats: ActivationStats | None = None, *, inplace: bool = False
) -> nn.Module:
    """Give the model compressed as the plan says (a deep copy unless ``inplace``); see the module doc for the order.

    ``model`` must be the uncompressed model ``anatomy`` describes (its hash keys the cache);
    ``stats`` are activation statistics of that model, needed for Wanda and used for structure.
    """
    plan.validate(anatomy)
    _check_stats_present(anatomy, plan, stats)
    work = model if inplace else copy.deepcopy(model)
    dropped = set(plan.drop_blocks)
    in_keep: dict[str, torch.Tensor] = {}  # linear name -> kept input channels (inputs shrank)
    struct_keys: dict[str, str] = {}  # linear name -> digest of its block part's kept units
    with torch.no_grad():
        for blk in anatomy.blocks:
            if blk.index in dropped:
                continue
            bc = plan.block_choice(blk.index)
            if bc.keep_heads is not None and bc.keep_heads < blk.num_heads:
                _record(blk.linears, "attn", shrink_heads(work, blk.index, bc.keep_heads, stats), in_keep, struct_keys)
            if bc.keep_mlp_channels is not None and bc.keep_mlp_channels < blk.mlp_dim:
                kept = shrink_mlp(work, blk.index, bc.keep_mlp_channels, stats)
                _record(blk.linears, "mlp", kept, in_keep, struct_keys)
        for site in anatomy.linears:
            choice = plan.choice_for(site.name)
            if site.block in dropped or not (choice.quantized or choice.pruned or choice.rank_ratio is not None):
                continue
            module = work.get_submodule(site.name)
            weight = dense_weight(module)
            norm = _stats_norm(stats, site, in_keep.get(site.name))
            result = _compressed(anatomy.model_hash, site, struct_keys.get(site.name), weight, choice, norm)
            if len(result) == 1:
                weight.copy_(result[0])
            else:
                bias = getattr(module, "bias", None)
                A, B = (t.to(weight.dtype, copy=True) for t in result)
                work.set_submodule(site.name, factorized_module(A, B, bias))
        if dropped:
            drop_blocks(work, sorted(dropped))
    return work


def _record(
    linears: tuple[LinearSite, ...],
    group: str,
    kept: torch.Tensor,
    in_keep: dict[str, torch.Tensor],
    keys: dict[str, str],
) -> None:
    key = f"{group}:{_digest(kept)}"
    for site in linears:
        if site.group == group:
            keys[site.name] = key
            if site.role in ("o", "down", "fc2"):
                in_keep[site.name] = kept
