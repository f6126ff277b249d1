"""Compression techniques, each a pure function on one weight / linear / block, and ``apply_plan_to``.

Order inside ``apply_plan_to``: structure (heads, MLP channels, then dropped blocks) → low-rank →
prune → quantize
(RTN or GPTQ) → activation fake-quant hooks. GPTQ and SVD-LLM read calibration Hessians (``hessian.py``).
"""

from autocompress.compress.apply import apply_plan_to, compress_weight, decompose, needs_hessians
from autocompress.compress.gptq import GPTQSettings, gptq_quantize
from autocompress.compress.hessian import Hessians, calibration_hessians, collect_hessians, find_hessians
from autocompress.compress.lowrank import (
    SVD,
    asvd_of,
    factorized_linear,
    factorized_module,
    factors_from_svd,
    svd_factorize,
    svd_of,
    whitened_svd_of,
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
from autocompress.compress.variants import CacheInfo, VariantCache

__all__ = [
    "SVD",
    "CacheInfo",
    "GPTQSettings",
    "Hessians",
    "VariantCache",
    "apply_plan_to",
    "asvd_of",
    "calibration_hessians",
    "collect_hessians",
    "compress_weight",
    "decompose",
    "dense_weight",
    "drop_blocks",
    "factorized_linear",
    "factorized_module",
    "factors_from_svd",
    "find_hessians",
    "gptq_quantize",
    "head_scores",
    "input_channel_scores",
    "kv_group_scores",
    "mlp_channel_scores",
    "needs_hessians",
    "prune_mask",
    "prune_scores",
    "rtn_quantize",
    "rtn_scales",
    "shrink_heads",
    "shrink_mlp",
    "slice_linear",
    "svd_factorize",
    "svd_of",
    "top_indices",
    "whitened_svd_of",
]
