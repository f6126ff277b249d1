"""Compression techniques, each a pure function on one weight / linear / block, and ``apply_plan_to``.

Order inside ``apply_plan_to``: structure (heads, MLP channels, then dropped blocks) → low-rank →
prune → quantize.
"""

from autocompress.compress.apply import (
    CacheInfo,
    apply_plan_to,
    cache_info,
    clear_cache,
    compress_weight,
    set_cache_limit,
)
from autocompress.compress.lowrank import (
    SVD,
    factorized_linear,
    factorized_module,
    factors_from_svd,
    svd_factorize,
    svd_of,
)
from autocompress.compress.prune import (
    head_scores,
    input_channel_scores,
    kv_group_scores,
    mlp_channel_scores,
    prune_mask,
    prune_scores,
    top_indices,
)
from autocompress.compress.quantize import rtn_quantize, rtn_scales
from autocompress.compress.structure import dense_weight, drop_blocks, shrink_heads, shrink_mlp, slice_linear

__all__ = [
    "SVD",
    "CacheInfo",
    "apply_plan_to",
    "cache_info",
    "clear_cache",
    "compress_weight",
    "dense_weight",
    "drop_blocks",
    "factorized_linear",
    "factorized_module",
    "factors_from_svd",
    "head_scores",
    "input_channel_scores",
    "kv_group_scores",
    "mlp_channel_scores",
    "prune_mask",
    "prune_scores",
    "rtn_quantize",
    "rtn_scales",
    "set_cache_limit",
    "shrink_heads",
    "shrink_mlp",
    "slice_linear",
    "svd_factorize",
    "svd_of",
    "top_indices",
]
