"""The analytic cost model: per-layer roofline for decode and prefill, memory and energy of a plan.

Every matmul costs ``max(flops / (peak * eta_c), bytes / (bw * eta_bw)) + kernel overhead``
(research/hardware.md §2.5). Bytes are the weights in the format the runtime really stores
(``Kernels.stored_bits``; scales/zeros; sparse formats only where the profile has the kernels).
Only the plan and the anatomy are read, never weights. Costs are cached per (effective shape,
LayerChoice) and per (block shape, block choice, its layers' choices), so pricing a plan is a
few dozen dict lookups.

Energy per decoded token (or per encoder forward) is ``active_W * busy + idle_W * overhead``:
busy is the roofline time, overhead the per-kernel/per-token launch and host time, during which
the device sits near idle. On edge devices platform power x time dominates (hardware.md §3.2).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from autocompress.errors import PlanError
from autocompress.hardware.profile import HardwareProfile
from autocompress.model.anatomy import BlockInfo, ModelAnatomy
from autocompress.plan import LayerChoice, Plan

MB = 1e6
_CACHE_LIMIT = 100_000  # distinct LayerChoices kept before the linear cache is reset
_SHRINK_OUT = frozenset({"q", "k", "v", "qkv"})  # outputs shrink with kept heads
_SHRINK_IN = frozenset({"o"})
_MLP_OUT = frozenset({"gate", "up", "fc1"})  # outputs shrink with kept MLP channels
_MLP_IN = frozenset({"down", "fc2"})
_DENSE = LayerChoice()

# (decode busy ms, decode overhead ms, prefill busy ms, prefill overhead ms, weight bytes[, kv bytes])
_Parts = tuple[float, ...]


@dataclass(frozen=True)
class Cost:
    """Predicted cost of one plan on one profile (decode is per token, batch as configured)."""

    latency_ms: float  # decode latency per token at context_tokens; one forward for encoders
    prefill_ms: float  # forward over prompt_tokens (time to first token, without sampling)
    memory_mb: float  # weights + KV cache + runtime overhead
    weights_mb: float  # stored format incl. scales/zeros/sparsity metadata, embeddings once
    kv_cache_mb: float
    energy_mj: float  # per decoded token (per forward for encoders)
    fits_memory: bool

    @property
    def tokens_per_s(self) -> float:
        return 1e3 / self.latency_ms

    def to_dict(self) -> dict[str, float | bool]:
        return asdict(self)


def _add(a: _Parts, b: _Parts) -> _Parts:
    return tuple(x + y for x, y in zip(a, b, strict=True))


class CostModel:
    """Prices plans for one (profile, anatomy, prompt length, context length, batch)."""

    def __init__(
        self,
        profile: HardwareProfile,
        anatomy: ModelAnatomy,
        prompt_tokens: int = 128,
        context_tokens: int = 1024,
        batch: int = 1,
    ) -> None:
        for name, v in (("prompt_tokens", prompt_tokens), ("context_tokens", context_tokens), ("batch", batch)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        self.profile = profile
        self.anatomy = anatomy
        self.prompt_tokens = prompt_tokens
        self.context_tokens = context_tokens
        self.batch = batch
        self._causal = anatomy.task != "encoder"
        # caches: choice -> effective shape -> parts; block width -> shapes; (width, choice) -> block parts
        self._linear_cache: dict[LayerChoice, dict[tuple[int, int], _Parts]] = {}
        self._shape_cache: dict[tuple[int, int | None, int | None], tuple[tuple[tuple[int, int], ...], _Parts]] = {}
        self._uniform_cache: dict[tuple[tuple[int, int | None, int | None], LayerChoice], _Parts] = {}
        sigs: dict[tuple, int] = {}
        self._blocks: list[tuple[int, int, tuple[str, ...]]] = []
        self._block_info: dict[int, BlockInfo] = {}
        for b in anatomy.blocks:
            shape = (b.num_heads, b.num_kv_heads, b.head_dim, b.mlp_dim)
            shape += tuple((s.role, s.out_features, s.in_features) for s in b.linears)
            sig = sigs.setdefault(shape, len(sigs))
            self._block_info.setdefault(sig, b)
            self._blocks.append((b.index, sig, tuple(s.name for s in b.linears)))
        self._fixed = self._fixed_parts()

    # ---- public ----------------------------------------------------------------------
    def predict(self, plan: Plan) -> Cost:
        """Give the predicted cost of ``plan`` (validate the plan against the anatomy once, beforehand)."""
        if plan.model.hash != self.anatomy.model_hash:
            raise PlanError(f"plan is for model {plan.model.name!r}, the cost model prices {self.anatomy.name!r}")
        layers, default, blocks, drops = plan.layers, plan.default, plan.blocks, plan.drop_blocks
        uniform, shapes_cache, linear_cache = self._uniform_cache, self._shape_cache, self._linear_cache
        dec_busy, dec_over, pre_busy, pre_over, wbytes, kvbytes = self._fixed
        for index, sig, names in self._blocks:
            if drops and index in drops:
                continue
            bc = blocks.get(index) if blocks else None
            skey = (sig, bc.keep_heads, bc.keep_mlp_channels) if bc else (sig, None, None)
            if not layers:  # one choice everywhere: one lookup per block
                parts = uniform.get((skey, default))
                if parts is None:
                    if len(uniform) > _CACHE_LIMIT:
                        uniform.clear()
                    parts = uniform[(skey, default)] = self._block_parts(skey, default)
                dec_busy += parts[0]
                dec_over += parts[1]
                pre_busy += parts[2]
                pre_over += parts[3]
                wbytes += parts[4]
                kvbytes += parts[5]
                continue
            block = shapes_cache.get(skey) or self._block_shapes(skey)
            shapes, attn = block
            dec_busy += attn[0]
            dec_over += attn[1]
            pre_busy += attn[2]
            pre_over += attn[3]
            kvbytes += attn[5]
            for name, shape in zip(names, shapes, strict=True):
                choice = layers.get(name, default)
                by_shape = linear_cache.get(choice)
                parts = by_shape.get(shape) if by_shape is not None else None
                if parts is None:
                    parts = self._linear(shape, choice)
                dec_busy += parts[0]
                dec_over += parts[1]
                pre_busy += parts[2]
                pre_over += parts[3]
                wbytes += parts[4]
        p = self.profile
        memory_mb = (wbytes + kvbytes) / MB + p.runtime_overhead_MB
        prefill_ms = pre_busy + pre_over
        if self._causal:
            latency_ms, busy, over = dec_busy + dec_over, dec_busy, dec_over
        else:
            latency_ms, busy, over = prefill_ms, pre_busy, pre_over
        return Cost(
            latency_ms=latency_ms,
            prefill_ms=prefill_ms,
            memory_mb=memory_mb,
            weights_mb=wbytes / MB,
            kv_cache_mb=kvbytes / MB,
            energy_mj=p.active_W * busy + p.idle_W * over,
            fits_memory=memory_mb <= p.usable_memory_GB * 1e3,
        )

    # ---- pieces ----------------------------------------------------------------------
    def _fixed_parts(self) -> _Parts:
        """Give what every plan pays: embeddings/norms storage, the fp16 lm_head, per-token overhead."""
        a, p = self.anatomy, self.profile
        tok_ms = p.per_token_overhead_ms
        parts: _Parts = (0.0, tok_ms, 0.0, tok_ms, a.other_params * 2.0, 0.0)
        if self._causal:
            # lm_head: a dense fp16 vocab x hidden matmul every decode token; prefill needs only the
            # last position's logits. Its weights are already in other_params (tied: counted once).
            d_busy, d_over, _, _, _ = self._matmul(a.vocab_size, a.hidden_size, _DENSE)
            parts = _add(parts, (d_busy, d_over, d_busy, d_over, 0.0, 0.0))
        return parts

    def _block_parts(self, skey: tuple[int, int | None, int | None], choice: LayerChoice) -> _Parts:
        """Give a whole block's parts when every linear in it has the same choice."""
        shapes, total = self._shape_cache.get(skey) or self._block_shapes(skey)
        for shape in shapes:
            total = _add(total, (*self._linear(shape, choice), 0.0))
        return total

    def _block_shapes(self, skey: tuple[int, int | None, int | None]) -> tuple[tuple[tuple[int, int], ...], _Parts]:
        """Give a block's effective linear shapes (out, in) after width pruning, and its attention parts."""
        sig, keep_heads, keep_mlp = skey
        b = self._block_info[sig]
        p = self.profile
        head_frac = 1.0 if keep_heads is None else keep_heads / b.num_heads
        mlp_frac = 1.0 if keep_mlp is None else keep_mlp / b.mlp_dim
        shapes = []
        for site in b.linears:
            out_f, in_f = site.out_features, site.in_features
            if site.role in _SHRINK_OUT:
                out_f = max(1, round(out_f * head_frac))
            elif site.role in _SHRINK_IN:
                in_f = max(1, round(in_f * head_frac))
            elif site.role in _MLP_OUT:
                out_f = max(1, round(out_f * mlp_frac))
            elif site.role in _MLP_IN:
                in_f = max(1, round(in_f * mlp_frac))
            shapes.append((out_f, in_f))
        # attention over the KV cache; whole KV groups go with their heads
        heads = b.num_heads * head_frac
        kv_heads = b.num_kv_heads * head_frac
        kv_b = p.kv_cache_bits / 8
        bs, ctx, n = self.batch, self.context_tokens, self.prompt_tokens
        peak = p.fp16_tflops * 1e12 * p.compute_efficiency
        bw = p.peak_bw_GBps * 1e9 * p.bw_efficiency
        over_ms = p.kernels_per_block * p.per_kernel_overhead_us * 1e-3
        pre_flops = 4.0 * n * n * heads * b.head_dim * bs * (0.5 if self._causal else 1.0)
        pre_bytes = 2.0 * n * kv_heads * b.head_dim * kv_b * bs
        pre_ms = max(pre_flops / peak, pre_bytes / bw) * 1e3
        if self._causal:
            kv_bytes = 2.0 * ctx * kv_heads * b.head_dim * kv_b * bs
            dec_ms = max(4.0 * ctx * heads * b.head_dim * bs / peak, kv_bytes / bw) * 1e3
        else:
            kv_bytes = dec_ms = 0.0
        block = (tuple(shapes), (dec_ms, over_ms, pre_ms, over_ms, 0.0, kv_bytes))
        self._shape_cache[skey] = block
        return block

    def _linear(self, shape: tuple[int, int], choice: LayerChoice) -> _Parts:
        """Give the parts of one linear (cached); low-rank becomes r x in followed by out x r."""
        by_shape = self._linear_cache.setdefault(choice, {})
        hit = by_shape.get(shape)
        if hit is not None:
            return hit
        if len(self._linear_cache) > _CACHE_LIMIT:
            self._linear_cache.clear()
            by_shape = self._linear_cache[choice] = {}
        out_f, in_f = shape
        rank = choice.rank_for(out_f, in_f)
        if rank is None:
            parts = self._matmul(out_f, in_f, choice)
        else:
            parts = _add(self._matmul(rank, in_f, choice), self._matmul(out_f, rank, choice))
        by_shape[shape] = parts
        return parts

    def _matmul(self, out_f: int, in_f: int, choice: LayerChoice) -> _Parts:
        """Give one weight matmul's roofline time (decode and prefill) and its stored bytes."""
        p, k = self.profile, self.profile.kernels
        params = out_f * in_f
        bits = k.stored_bits(choice.bits)
        value_bytes = params * bits / 8
        meta_bytes = 0.0
        if bits < 16:
            groups = 1 if choice.group_size is None else math.ceil(in_f / choice.group_size)
            meta_bits = p.scale_bits + (0 if choice.symmetric else p.zero_bits)
            meta_bytes = out_f * groups * meta_bits / 8
        speedup = 1.0
        if choice.sparsity_pattern == "2:4" and k.sparse_2_4:
            value_bytes = value_bytes * 0.5 + params * 0.5 * 2 / 8  # kept half + 2-bit index each
            speedup = k.sparse_2_4_speedup
        elif choice.sparsity > 0 and choice.sparsity_pattern == "unstructured" and k.unstructured_sparse_storage:
            # kept values + 1-bit bitmap; an exporter keeps the dense layout when that is smaller
            value_bytes = min(value_bytes, value_bytes * (1.0 - choice.sparsity) + params / 8)
        weight_bytes = value_bytes + meta_bytes
        if bits <= 8 and k.int8_compute and p.int8_tops is not None:
            peak, act_bytes = p.int8_tops * 1e12, 1
        else:
            peak, act_bytes = p.fp16_tflops * 1e12, 2
        peak *= p.compute_efficiency * speedup
        # the format's efficiency applies to streaming its weights (dequantisation); activations use the default
        weight_bw = p.peak_bw_GBps * 1e9 * p.bw_efficiency_for("fp16" if bits == 16 else f"int{bits}")
        act_bw = p.peak_bw_GBps * 1e9 * p.bw_efficiency
        aligned = out_f % p.alignment == 0 and in_f % p.alignment == 0
        slow = 1.0 if aligned else 1.0 / p.misaligned_penalty
        over_ms = p.kernels_per_linear * p.per_kernel_overhead_us * 1e-3

        def busy_ms(tokens: int) -> float:
            flops = 2.0 * tokens * params
            memory_s = weight_bytes / weight_bw + tokens * (in_f + out_f) * act_bytes / act_bw
            return max(flops / peak, memory_s) * slow * 1e3

        m = self.batch
        return (busy_ms(m), over_ms, busy_ms(m * self.prompt_tokens), over_ms, weight_bytes)
