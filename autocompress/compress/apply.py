"""Apply a whole plan to a model, deterministically, in one fixed order.

Order (each step sees the result of the previous one):

1. structure: per kept block, shrink attention heads, then MLP channels (``structure.py``);
2. drop blocks, last among the structural steps, so plan block indices always mean the original
   numbering (it happens after every per-linear step below, which address linears by their
   original names; dropped blocks are never touched);
3. low-rank: a layer with ``rank_ratio`` becomes ``nn.Sequential(Linear(in, r), Linear(r, out))``,
   r = ``choice.rank_for(out, in)`` of its shape after step 1 (capped at min(out, in));
   The factors come from plain SVD, ASVD (input norms) or SVD-LLM (Hessian whitening);
4. prune: a keep-mask on the weight, or on both factors of a low-rank layer. Wanda on the first
   factor uses the layer's input norms; on the second factor it uses the norms of the first
   factor's outputs estimated from the diagonal statistics, Σ_j A_kj² · input_sq_norm_j (exact if
   input channels were uncorrelated);
5. quantize: RTN or GPTQ on the (pruned) weight, keeping the mask (pruned weights stay exactly 0),
   or on both factors: the first factor with the layer's Hessian H, the second with the Hessian of
   its inputs A·x, which is A·H·Aᵀ (A already pruned and quantized);
6. activation fake-quant (``act_bits`` 8): a forward pre-hook rounds the layer's input per token
   to a symmetric int8 grid (the module's weights and names are unchanged).

GPTQ and SVD-LLM need the calibration Hessians (``hessian.py``): passed as ``hessians=``, or found
on disk by (model hash, ``plan.provenance.data_hash``); GPTQ's damp / act-order come as
``gptq=`` (a ``GPTQSettings``; the default is what plans are applied with).

Input norms of layers whose inputs shrank in step 1 (o-proj, down/fc2) are indexed by the kept
channels. With ``cache=`` (a ``VariantCache``, owned by the caller: the workbench has one),
compressed per-linear results (and full SVDs, so any rank reuses them) are kept in memory under a
byte bound, and on disk when the cache has a folder: re-applying a choice already seen costs a copy.

Structure (heads, channels, blocks) is cut where the model lives; each linear is compressed on
``device`` (the workbench passes the CPU: the format registry creates its tensors there), in float32
from the model's weights as they are (bf16 ones on a GPU), and written back where the model lives.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from autocompress import formats
from autocompress.compress.gptq import PLAN_SETTINGS, GPTQSettings
from autocompress.compress.hessian import Hessians, find_hessians
from autocompress.compress.lowrank import SVD, asvd_of, factorized_module, factors_from_svd, svd_of, whitened_svd_of
from autocompress.compress.prune import prune_mask
from autocompress.compress.structure import dense_weight, drop_blocks, shrink_heads, shrink_mlp
from autocompress.compress.variants import VariantCache
from autocompress.device import cache_tag
from autocompress.errors import PlanError
from autocompress.plan import LayerChoice, Plan

if TYPE_CHECKING:
    from autocompress.calib import ActivationStats
    from autocompress.model.anatomy import LinearSite, ModelAnatomy

ACT_QMAX = 127
_NO_CACHE_BYTES = 0  # apply_plan_to without a cache: every variant computed afresh


def _digest(t: torch.Tensor | None) -> str | None:
    if t is None:
        return None
    t = t.detach().contiguous().cpu()
    return hashlib.sha1(f"{t.dtype}{tuple(t.shape)}".encode() + t.view(torch.uint8).numpy().tobytes()).hexdigest()


def _effective(choice: LayerChoice, gptq: GPTQSettings = PLAN_SETTINGS) -> tuple:
    """Give only the fields that change the weights (so equivalent choices share cache entries)."""
    q = (choice.format, choice.quant_method) if choice.quantized else None
    if choice.by_gptq:
        q = (*q, gptq.key())
    p = (choice.sparsity, choice.sparsity_pattern, choice.prune_method) if choice.pruned else None
    r = (choice.rank_ratio, choice.lowrank_method) if choice.rank_ratio is not None else None
    return q, p, r


def _changes_weight(choice: LayerChoice) -> bool:
    return choice.quantized or choice.pruned or choice.rank_ratio is not None


def _needs_stats(choice: LayerChoice) -> bool:
    wanda = choice.pruned and choice.prune_method == "wanda"
    imatrix = choice.quantized and choice.quant_method == "imatrix"  # the input's Σx² per column
    return wanda or imatrix or (choice.rank_ratio is not None and choice.lowrank_method == "asvd")


def _needs_hessian(choice: LayerChoice) -> bool:
    return choice.by_gptq or (choice.rank_ratio is not None and choice.lowrank_method == "svd-llm")


def decompose(
    weight: torch.Tensor, method: str, input_sq_norm: torch.Tensor | None = None, hessian: torch.Tensor | None = None
) -> SVD:
    """Give the full decomposition ``lowrank_method`` factors come from (see ``lowrank.py``)."""
    if method == "svd":
        return svd_of(weight)
    if method == "asvd":
        if input_sq_norm is None:
            raise PlanError("lowrank_method asvd needs activation statistics (input norms)")
        return asvd_of(weight, input_sq_norm)
    if method == "svd-llm":
        if hessian is None:
            raise PlanError("lowrank_method svd-llm needs the calibration Hessians")
        return whitened_svd_of(weight, hessian)
    raise PlanError(f"unknown lowrank_method {method!r}")


def compress_weight(
    weight: torch.Tensor,
    choice: LayerChoice,
    input_sq_norm: torch.Tensor | None = None,
    svd: SVD | None = None,
    hessian: torch.Tensor | None = None,
    record: Callable[[formats.QuantizedTensor], None] | None = None,
    *,
    gptq: GPTQSettings = PLAN_SETTINGS,
) -> tuple[torch.Tensor, ...]:
    """Give the compressed fp32 weight (1-tuple) or low-rank factors (A, B) of one [out, in] weight.

    Applies low-rank, then prune, then quantize. ``svd`` may be passed to reuse a cached
    decomposition; ``hessian`` (Σ x xᵀ of the layer's input) is needed by GPTQ and SVD-LLM.
    ``record`` receives the stored tensor (codes and scales) of a quantized, not factorized weight.
    ``gptq``: GPTQ's damp / act-order.
    """
    out_f, in_f = weight.shape
    rank = choice.rank_for(out_f, in_f)
    if rank is None:
        return (_prune_quantize(weight.detach().float(), choice, input_sq_norm, hessian, record, gptq),)
    if record is not None:
        raise PlanError("a low-rank linear is two stored tensors, not one: no packed exporter takes it")
    if svd is None:
        svd = decompose(weight, choice.lowrank_method, input_sq_norm, hessian)
    A, B = factors_from_svd(svd, min(rank, out_f, in_f))
    A = _prune_quantize(A, choice, input_sq_norm, hessian, gptq=gptq)
    # the second factor's inputs are A·x: their squared norms, assuming uncorrelated input channels
    mid_norm = (A.double().square() @ input_sq_norm.double()).float() if input_sq_norm is not None else None
    mid_h = (A.double() @ hessian.double() @ A.double().t()).float() if choice.by_gptq and hessian is not None else None
    return A, _prune_quantize(B, choice, mid_norm, mid_h, gptq=gptq)


def _prune_quantize(
    w: torch.Tensor,
    choice: LayerChoice,
    input_sq_norm: torch.Tensor | None,
    hessian: torch.Tensor | None = None,
    record: Callable[[formats.QuantizedTensor], None] | None = None,
    gptq: GPTQSettings = PLAN_SETTINGS,
) -> torch.Tensor:
    mask = None
    if choice.pruned:
        mask = prune_mask(w, choice.sparsity, choice.sparsity_pattern, choice.prune_method, input_sq_norm)
        w = w.masked_fill(~mask, 0.0)
    if choice.quantized:
        q = stored_tensor(w, choice, input_sq_norm, hessian, mask, gptq=gptq)
        if record is not None:
            record(q)
        w = _read_back(q, choice, mask)
    return w


def _read_back(q: formats.QuantizedTensor, choice: LayerChoice, mask: torch.Tensor | None) -> torch.Tensor:
    out = choice.fmt.dequantize(q)
    if mask is None or choice.fmt.is_float:
        return out
    return out.masked_fill_(~mask, 0.0)  # pruned weights stay 0 (grids without 0)


def stored_tensor(
    w: torch.Tensor,
    choice: LayerChoice,
    input_sq_norm: torch.Tensor | None = None,
    hessian: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    *,
    gptq: GPTQSettings = PLAN_SETTINGS,
) -> formats.QuantizedTensor:
    """Give ``w`` [out, in] as the choice's format stores it: codes and scale data (what a packed
    exporter writes; ``quantize_tensor`` is its dequantized value)."""
    fmt = choice.fmt
    if fmt.is_float:
        return fmt.quantize(w)
    if choice.by_gptq:
        if hessian is None:
            raise PlanError(f"quant_method {choice.quant_method} needs the calibration Hessians")
        h = hessian.to(w.device)
        # gptq-imatrix: the grid fitted with the input's Σx² per column (the Hessian's diagonal) as importance
        importance = h.diagonal().clamp(min=0) if choice.quant_method == "gptq-imatrix" else None
        return formats.gptq_quantize(w, h, fmt, mask=mask, importance=importance, **gptq.kwargs())
    if choice.quant_method == "imatrix":
        if input_sq_norm is None:
            raise PlanError("quant_method imatrix needs activation statistics (the input's squared norms)")
        return fmt.quantize(w, importance=input_sq_norm)
    return fmt.quantize(w)


def quantize_tensor(
    w: torch.Tensor,
    choice: LayerChoice,
    input_sq_norm: torch.Tensor | None = None,
    hessian: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    *,
    gptq: GPTQSettings = PLAN_SETTINGS,
) -> torch.Tensor:
    """Give ``w`` [out, in] stored in the choice's format and read back: exactly the values the
    runtime computes with (the format registry's dequantized codes and scales)."""
    return _read_back(stored_tensor(w, choice, input_sq_norm, hessian, mask, gptq=gptq), choice, mask)


def _stats_norm(stats: ActivationStats | None, site: LinearSite, keep: torch.Tensor | None) -> torch.Tensor | None:
    if stats is None:
        return None
    norm = stats.input_sq_norms.get(site.name)
    if norm is None:
        raise PlanError(f"activation statistics have no input norms for {site.name!r}; recollect them for this model")
    if norm.shape != (site.in_features,):
        raise PlanError(f"input norms for {site.name} have shape {tuple(norm.shape)}, expected ({site.in_features},)")
    return norm.index_select(0, keep.to(norm.device)) if keep is not None else norm


def _compressed(
    cache: VariantCache,
    model_hash: str,
    site: LinearSite,
    struct_key: str | None,
    weight: torch.Tensor,
    choice: LayerChoice,
    norm: torch.Tensor | None,
    hessian: tuple[str, Callable[[], torch.Tensor]] | None,
    gptq: GPTQSettings = PLAN_SETTINGS,
) -> tuple[torch.Tensor, ...]:
    """Give compress_weight's result from the memory or disk cache, computing it on a miss.

    ``hessian`` is (data hash, loader): the matrix is only materialised on a miss. The key holds the
    weight's dtype (a bf16 copy of a model compresses to other values than its fp32 original).
    """
    norm = norm if _needs_stats(choice) else None
    hessian = hessian if _needs_hessian(choice) else None
    h_id = hessian[0] if hessian is not None else None
    shape = _shape_key(weight)
    key = ("linear", model_hash, site.name, shape, struct_key, _effective(choice, gptq), _digest(norm), h_id)
    result = cache.get(key)
    if result is None:
        result = cache.disk_get(key)
    if result is None:
        h = hessian[1]() if hessian is not None else None
        if h is not None:
            h = h.to(weight.device)
        n = norm.to(weight.device) if norm is not None else None
        svd = None
        if choice.rank_ratio is not None:
            method = choice.lowrank_method
            dep = _digest(norm) if method == "asvd" else h_id if method == "svd-llm" else None
            svd_key = ("svd", model_hash, site.name, shape, struct_key, method, dep)
            svd = cache.get(svd_key)
            if svd is None:
                try:
                    svd = decompose(weight, method, n, h)
                except PlanError as exc:
                    raise PlanError(f"{site.name}: {exc}") from None
                cache.put(svd_key, svd, svd.nbytes)
        try:
            result = compress_weight(weight, choice, n, svd, h, gptq=gptq)
        except PlanError as exc:
            raise PlanError(f"{site.name}: {exc}") from None
        result = tuple(t.cpu() for t in result)  # the cache's bound is host memory (a no-op on the CPU)
        cache.disk_put(key, result)
    cache.put(key, result, sum(t.numel() * t.element_size() for t in result))
    return result


def _shape_key(weight: torch.Tensor) -> tuple:
    """Give the weight's shape, with its dtype when not float32 (so fp32 keys stay those of earlier versions)."""
    shape = tuple(weight.shape)
    return shape if weight.dtype == torch.float32 else (*shape, str(weight.dtype))


def _compressed_table(
    cache: VariantCache, model_hash: str, name: str, weight: torch.Tensor, choice: LayerChoice
) -> torch.Tensor:
    """Give the token embedding / output head table in the choice's format (memory / disk cached)."""
    key = ("table", model_hash, name, _shape_key(weight), _effective(choice))
    result = cache.get(key) or cache.disk_get(key)
    if result is None:
        try:
            result = (quantize_tensor(weight.detach().float().cpu(), choice),)  # the format code is CPU code
        except PlanError as exc:
            raise PlanError(f"{name}: {exc}") from None
        cache.disk_put(key, result)
    cache.put(key, result, result[0].numel() * result[0].element_size())
    return result[0]


def _check_stats_present(anatomy: ModelAnatomy, plan: Plan, stats: ActivationStats | None) -> None:
    if stats is not None:
        return
    for site in anatomy.linears:
        if site.block not in plan.drop_blocks and _needs_stats(plan.choice_for(site.name)):
            raise PlanError(
                f"{site.name} uses Wanda pruning or ASVD, which need activation statistics: pass calibration "
                "stats, or set prune_method: magnitude / lowrank_method: svd"
            )


def needs_hessians(plan: Plan) -> bool:
    """True when some choice of the plan uses GPTQ or SVD-LLM (so the calibration Hessians are needed)."""
    return any(_needs_hessian(c) for c in (plan.default, *plan.layers.values()))


def _resolve_hessians(anatomy: ModelAnatomy, plan: Plan, hessians: Hessians | None, tag: str) -> Hessians | None:
    needing = [
        s.name for s in anatomy.linears if s.block not in plan.drop_blocks and _needs_hessian(plan.choice_for(s.name))
    ]
    if not needing:
        return None
    found = hessians if hessians is not None else find_hessians(anatomy, plan.provenance.data_hash, tag)
    if found is None:
        raise PlanError(
            f"{needing[0]} uses GPTQ or SVD-LLM, which need calibration Hessians: collect them once with "
            "autocompress.compress.hessian.calibration_hessians(model, anatomy, data) and set "
            "plan.provenance.data_hash to that data's hash (or pass hessians=)"
        )
    if found.model_hash != anatomy.model_hash:
        raise PlanError("the calibration Hessians were collected on another model")
    return found


def _fake_quant_input(_module: nn.Module, args: tuple) -> tuple:
    """Round a linear's input per token onto a symmetric int8 grid (W8A8 simulation)."""
    x = args[0]
    scale = x.detach().abs().amax(dim=-1, keepdim=True).div(ACT_QMAX)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (torch.round(x / scale).clamp(-ACT_QMAX, ACT_QMAX) * scale, *args[1:])


def apply_plan_to(
    model: nn.Module,
    anatomy: ModelAnatomy,
    plan: Plan,
    stats: ActivationStats | None = None,
    *,
    inplace: bool = False,
    hessians: Hessians | None = None,
    stored: dict[str, formats.QuantizedTensor] | None = None,
    share_base: bool = False,
    cache: VariantCache | None = None,
    gptq: GPTQSettings = PLAN_SETTINGS,
    device: torch.device | None = None,
) -> nn.Module:
    """Give the model compressed as the plan says (a deep copy unless ``inplace``); see the module doc for the order.

    ``model`` must be the uncompressed model ``anatomy`` describes (its hash keys the cache);
    ``stats`` are activation statistics of that model, needed for Wanda / ASVD and used for
    structure; ``hessians`` (else found by the plan's data hash) are needed for GPTQ / SVD-LLM.
    ``stored``, when given, receives every quantized tensor as its format stores it (codes and
    scales, by linear / table name) for the packed exporters; those tensors skip the caches.
    ``share_base``: instead of a deep copy, a copy of the module tree that shares every tensor the
    plan leaves unchanged with ``model`` (copying only the weights it writes): the cheap way to
    evaluate a plan, for callers that only run the result, never train or edit it in place.
    ``cache``: the variant cache to read and fill (keyed by ``anatomy.model_hash``: give a model
    edited in place a cache of its own); without one every variant is computed afresh.
    ``gptq``: GPTQ's damp / act-order (the default is what plans are applied with).
    ``device``: where each linear is compressed (None: where the model's weights are); the result is
    written back into the model where it lives.
    """
    cache = cache if cache is not None else VariantCache(_NO_CACHE_BYTES)
    plan.validate(anatomy)
    _check_stats_present(anatomy, plan, stats)
    hess = _resolve_hessians(anatomy, plan, hessians, cache_tag(model))
    work = model
    if not inplace:
        work = shared_copy(model, _written(anatomy, plan)) if share_base else copy.deepcopy(model)
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
            if site.block in dropped:
                continue
            if _changes_weight(choice):
                keep = in_keep.get(site.name)
                where = (cache, anatomy.model_hash, device)
                _compress_site(work, where, site, choice, stats, hess, keep, struct_keys, stored, gptq)
            if choice.act_bits < 16:
                work.get_submodule(site.name).register_forward_pre_hook(_fake_quant_input)
        for emb in anatomy.embeddings:
            choice = plan.embedding_choice(emb.name)
            if choice.quantized:
                weight = work.get_submodule(emb.name).weight  # tied: the head's table too
                if stored is not None:
                    stored[emb.name] = stored_tensor(weight.detach().float().cpu(), choice)
                    weight.copy_(choice.fmt.dequantize(stored[emb.name]))
                else:
                    weight.copy_(_compressed_table(cache, anatomy.model_hash, emb.name, weight, choice))
        if dropped:
            drop_blocks(work, sorted(dropped))
    return work


def _written(anatomy: ModelAnatomy, plan: Plan) -> set[str]:
    """Give the names of the parameters ``apply_plan_to`` overwrites in place for ``plan``
    (everything else it changes, it replaces by new tensors or modules)."""
    dropped = set(plan.drop_blocks)
    names = {
        f"{site.name}.weight"
        for site in anatomy.linears
        if site.block not in dropped and _changes_weight(plan.choice_for(site.name))
    }
    names.update(f"{e.name}.weight" for e in anatomy.embeddings if plan.embedding_choice(e.name).quantized)
    return names


def shared_copy(model: nn.Module, own: set[str]) -> nn.Module:
    """Give a copy of ``model``'s module tree whose tensors are ``model``'s own, except those named in
    ``own``, which are copied (ties kept: a tensor reachable under several names is copied once)."""
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    copied = {id(t) for name, t in named if name in own}
    memo: dict[int, Any] = {id(t): t for _, t in named if id(t) not in copied}
    return copy.deepcopy(model, memo)


def _compress_site(
    work: nn.Module,
    where: tuple[VariantCache, str, torch.device | None],
    site: LinearSite,
    choice: LayerChoice,
    stats: ActivationStats | None,
    hess: Hessians | None,
    keep: torch.Tensor | None,
    struct_keys: dict[str, str],
    stored: dict[str, formats.QuantizedTensor] | None = None,
    gptq: GPTQSettings = PLAN_SETTINGS,
) -> None:
    cache, model_hash, device = where
    module = work.get_submodule(site.name)
    weight = dense_weight(module)
    src = weight if device is None else weight.to(device)  # the weight where it is compressed
    norm = _stats_norm(stats, site, keep)
    hessian = None
    if hess is not None:

        def load(name: str = site.name) -> torch.Tensor:
            h = hess.get(name)
            if keep is None:
                return h
            k = keep.to(h.device)
            return h.index_select(0, k).index_select(1, k)

        hessian = (hess.data_hash, load)
    if stored is not None and choice.quantized:  # the stored tensor is wanted: computed afresh, not cached
        h = hessian[1]().to(src.device) if hessian is not None and _needs_hessian(choice) else None
        try:
            n = norm.to(src.device) if norm is not None and _needs_stats(choice) else None
            result = compress_weight(
                src, choice, n, None, h, lambda q: stored.__setitem__(site.name, _on_cpu(q)), gptq=gptq
            )
        except PlanError as exc:
            raise PlanError(f"{site.name}: {exc}") from None
    else:
        result = _compressed(cache, model_hash, site, struct_keys.get(site.name), src, choice, norm, hessian, gptq)
    if len(result) == 1:
        weight.copy_(result[0])
    else:
        bias = getattr(module, "bias", None)
        A, B = (t.to(weight.device, weight.dtype, copy=True) for t in result)
        work.set_submodule(site.name, factorized_module(A, B, bias))


def _on_cpu(q: formats.QuantizedTensor) -> formats.QuantizedTensor:
    """Give ``q`` with its codes and scales on the CPU (what the exporters write; a no-op there)."""
    if q.codes.device.type == "cpu":
        return q
    return formats.QuantizedTensor(q.format, q.shape, q.codes.cpu(), {k: v.cpu() for k, v in q.params.items()})


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
