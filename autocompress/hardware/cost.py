"""The analytic cost model: per-layer roofline for decode and prefill, memory and energy of a plan.

Every matmul costs ``max(flops / (peak * eta_c), bytes / (bw * eta_bw)) + its fixed overhead``
(research/hardware.md §2.5), with the compute path and efficiencies of the format the runtime
really stores: its exact bytes (codes, scales, mins) from the format registry, the profile's
efficiencies for that format (``Q4_K``), else for its class (``int4``); a format the runtime has
no kernel for (a plan retargeted from another runtime) is priced as the smallest of the runtime's
own formats that holds at least as many bits, dense if none does; sparse storage only where the profile has the kernels. The token
embedding and output head are priced in the plan's formats for them. Low-rank is two matmuls, each paying its own overhead; width pruning gives smaller
matmuls (misaligned widths pay the alignment penalty); dropped blocks cost nothing. Only the plan
and the anatomy are read, never weights. Costs are cached per (effective shape, LayerChoice) and
per (block shape, block choice), so pricing a plan is a few hundred dict lookups.

Next to each time the model reports its **roofline floor**: the same bytes and flops at the
datasheet peaks (no efficiency factors, no overheads), so a report can say how close a plan is to
the physical limit.

Energy per decoded token (or per encoder forward) is ``active_W * busy + idle_W * overhead`` (busy
= roofline time; during launch/host overhead the device sits near idle; on edge devices platform
power x time dominates, hardware.md §3.2), or, where the profile has the bottom-up split,
``idle_W * t + pJ/byte * bytes + pJ/flop * flops``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from autocompress import formats
from autocompress.errors import PlanError
from autocompress.hardware.profile import HardwareProfile, efficiency_keys
from autocompress.model.anatomy import BlockInfo, ModelAnatomy
from autocompress.plan import LayerChoice, Plan

MB = 1e6
_CACHE_LIMIT = 100_000  # distinct LayerChoices kept before the linear cache is reset
_DENSE = LayerChoice()
_ACT_BYTES = 4  # activations/workspace are sized in fp32 (the widest any shipped runtime uses)

# (decode busy ms, decode overhead ms, prefill busy ms, prefill overhead ms, weight bytes, kv bytes,
#  decode floor ms, prefill floor ms, decode flops, prefill flops)
_Parts = tuple[float, ...]
_ZERO: _Parts = (0.0,) * 10


@dataclass(frozen=True)
class Cost:
    """Predicted cost of one plan on one profile (decode is per token, batch as configured).

    For encoders there is no decode: ``latency_ms`` and ``decode_ms_per_token`` are one forward
    over ``prompt_tokens``.
    """

    latency_ms: float  # decode latency per token at context_tokens; one forward for encoders
    prefill_ms: float  # forward over prompt_tokens (time to first token, without sampling)
    memory_mb: float  # weights + KV cache + activations/workspace + runtime overhead
    weights_mb: float  # stored format incl. scales/zeros/sparsity metadata, embeddings once
    kv_cache_mb: float
    energy_mj: float  # per decoded token (per forward for encoders)
    fits_memory: bool
    decode_ms_per_token: float = 0.0  # = latency_ms, in the user's words
    tokens_per_s: float = 0.0  # decode tokens per second (batch x 1000 / latency_ms)
    energy_mj_per_token: float = 0.0  # = energy_mj
    activation_mb: float = 0.0  # activations + workspace at batch x prompt_tokens
    decode_floor_ms: float = 0.0  # roofline floor: datasheet peaks, no efficiencies, no overheads
    prefill_floor_ms: float = 0.0

    def to_dict(self) -> dict[str, float | bool]:
        return asdict(self)


def _add(a: _Parts, b: _Parts) -> _Parts:
    return tuple(x + y for x, y in zip(a, b, strict=True))


def _pad(parts: tuple[float, ...]) -> _Parts:
    return parts + (0.0,) * (10 - len(parts))


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
        self._by_id: dict[int, tuple[LayerChoice, dict[tuple[int, int], _Parts]]] = {}
        self._embedding_cache: dict[tuple[LayerChoice, ...], _Parts] = {}
        self._stand_ins: dict[tuple[str, tuple[int, int]], formats.Format | None] = {}
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
        widest = max([anatomy.hidden_size, *(b.mlp_dim for b in anatomy.blocks)])
        logits = batch * anatomy.vocab_size if self._causal else 0  # last position only
        self._activation_mb = (
            (batch * prompt_tokens * (4 * anatomy.hidden_size + 2 * widest) + logits) * _ACT_BYTES / MB
        )

    # ---- public ----------------------------------------------------------------------
    def predict(self, plan: Plan) -> Cost:
        """Give the predicted cost of ``plan`` (validate the plan against the anatomy once, beforehand)."""
        if plan.model.hash != self.anatomy.model_hash:
            raise PlanError(f"plan is for model {plan.model.name!r}, the cost model prices {self.anatomy.name!r}")
        layers, default, blocks, drops = plan.layers, plan.default, plan.blocks, plan.drop_blocks
        uniform, shapes_cache, linear_cache, by_id = (
            self._uniform_cache,
            self._shape_cache,
            self._linear_cache,
            self._by_id,
        )
        rows: list[_Parts] = [self._fixed, self._embedding_parts(plan)]
        append = rows.append
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
                append(parts)
                continue
            shapes, attn = shapes_cache.get(skey) or self._block_shapes(skey)
            append(attn)
            for name, shape in zip(names, shapes, strict=True):
                choice = layers.get(name, default)
                # keyed by identity (the entry pins the object, so an id is never reused while cached):
                # a space gives one LayerChoice object to all linears of a group, and hashing a frozen
                # dataclass on every lookup would dominate the price of a plan
                hit = by_id.get(id(choice))
                if hit is None or hit[0] is not choice:
                    if len(by_id) > _CACHE_LIMIT:
                        by_id.clear()
                    hit = by_id[id(choice)] = (choice, linear_cache.setdefault(choice, {}))
                parts = hit[1].get(shape)
                append(parts if parts is not None else self._linear(shape, choice))
        dec_busy, dec_over, pre_busy, pre_over, wbytes, kvbytes, dec_floor, pre_floor, dec_flops, pre_flops = map(
            sum, zip(*rows, strict=True)
        )
        p = self.profile
        memory_mb = (wbytes + kvbytes) / MB + self._activation_mb + p.runtime_overhead_MB
        prefill_ms = pre_busy + pre_over
        if self._causal:
            latency_ms, busy, over, flops, floor = dec_busy + dec_over, dec_busy, dec_over, dec_flops, dec_floor
        else:
            latency_ms, busy, over, flops, floor = prefill_ms, pre_busy, pre_over, pre_flops, pre_floor
        if p.energy_pJ_per_byte is not None and p.energy_pJ_per_flop is not None:
            energy = (
                p.idle_W * latency_ms
                + ((wbytes + kvbytes) * p.energy_pJ_per_byte + flops * p.energy_pJ_per_flop) * 1e-9
            )
        else:
            energy = p.active_W * busy + p.idle_W * over
        return Cost(
            latency_ms=latency_ms,
            prefill_ms=prefill_ms,
            memory_mb=memory_mb,
            weights_mb=wbytes / MB,
            kv_cache_mb=kvbytes / MB,
            energy_mj=energy,
            fits_memory=memory_mb <= p.usable_memory_GB * 1e3,
            decode_ms_per_token=latency_ms,
            tokens_per_s=self.batch * 1e3 / latency_ms,
            energy_mj_per_token=energy,
            activation_mb=self._activation_mb,
            decode_floor_ms=floor,
            prefill_floor_ms=pre_floor,
        )

    # ---- pieces ----------------------------------------------------------------------
    def _fixed_parts(self) -> _Parts:
        """Give what every plan pays: norms and other small tensors, per-token overhead (and, for an
        anatomy that does not list its embedding tables, the dense embeddings and lm_head)."""
        a, p = self.anatomy, self.profile
        tok_ms = p.per_token_overhead_ms
        tables = sum(e.params for e in a.embeddings)
        parts: _Parts = _pad((0.0, tok_ms, 0.0, tok_ms, (a.other_params - tables) * p.dense_bits / 8))
        if self._causal and not a.embeddings:
            parts = _add(parts, self._head(a.vocab_size, a.hidden_size, _DENSE))
        return parts

    def _head(self, vocab: int, hidden: int, choice: LayerChoice) -> _Parts:
        """Give the output head's parts: a vocab x hidden matmul every decode token; prefill needs only
        the last position's logits."""
        d = self._matmul(vocab, hidden, choice)
        return (d[0], d[1], d[0], d[1], d[4], 0.0, d[6], d[6], d[8], d[8])

    def _embedding_parts(self, plan: Plan) -> _Parts:
        """Give the token embedding's and output head's parts in the plan's formats: the embedding is
        stored (a lookup reads one row per token: no time), the head (the tied table, or its own) is
        stored and multiplied every decode token."""
        a = self.anatomy
        choices = tuple(plan.embedding_choice(e.name) for e in a.embeddings)
        hit = self._embedding_cache.get(choices)
        if hit is not None:
            return hit
        total = _ZERO
        for e, choice in zip(a.embeddings, choices, strict=True):
            if self._causal and (e.role == "head" or e.tied):
                total = _add(total, self._head(e.rows, e.cols, choice))
            else:
                stored = self._matmul(e.rows, e.cols, choice)[4]
                total = _add(total, _pad((0.0, 0.0, 0.0, 0.0, stored)))
        if len(self._embedding_cache) > _CACHE_LIMIT:
            self._embedding_cache.clear()
        self._embedding_cache[choices] = total
        return total

    def _block_parts(self, skey: tuple[int, int | None, int | None], choice: LayerChoice) -> _Parts:
        """Give a whole block's parts when every linear in it has the same choice."""
        shapes, total = self._shape_cache.get(skey) or self._block_shapes(skey)
        for shape in shapes:
            total = _add(total, self._linear(shape, choice))
        return total

    def _block_shapes(self, skey: tuple[int, int | None, int | None]) -> tuple[tuple[tuple[int, int], ...], _Parts]:
        """Give a block's effective linear shapes (out, in) after width pruning, and its attention parts."""
        sig, keep_heads, keep_mlp = skey
        b = self._block_info[sig]
        p = self.profile
        head_frac, mlp_frac = b.fractions(keep_heads, keep_mlp)
        shapes = [site.shape_after(head_frac, mlp_frac) for site in b.linears]
        # attention over the KV cache; whole KV groups go with their heads
        heads = b.num_heads * head_frac
        kv_heads = b.num_kv_heads * head_frac
        kv_b = p.kv_cache_bits / 8
        bs, ctx, n = self.batch, self.context_tokens, self.prompt_tokens
        peak_raw = p.fp16_tflops * 1e12
        bw_raw = p.peak_bw_GBps * 1e9
        peak, bw = peak_raw * p.compute_efficiency, bw_raw * p.bw_efficiency
        over_ms = p.kernels_per_block * p.per_kernel_overhead_us * 1e-3
        pre_flops = 4.0 * n * n * heads * b.head_dim * bs * (0.5 if self._causal else 1.0)
        pre_bytes = 2.0 * n * kv_heads * b.head_dim * kv_b * bs
        pre_ms = max(pre_flops / peak, pre_bytes / bw) * 1e3
        pre_floor = max(pre_flops / peak_raw, pre_bytes / bw_raw) * 1e3
        if self._causal:
            kv_bytes = 2.0 * ctx * kv_heads * b.head_dim * kv_b * bs
            dec_flops = 4.0 * ctx * heads * b.head_dim * bs
            dec_ms = max(dec_flops / peak, kv_bytes / bw) * 1e3
            dec_floor = max(dec_flops / peak_raw, kv_bytes / bw_raw) * 1e3
        else:
            kv_bytes = dec_ms = dec_floor = dec_flops = 0.0
        pre_over_ms = over_ms + n * bs * p.prefill_block_us_per_token * 1e-3
        parts = (dec_ms, over_ms, pre_ms, pre_over_ms, 0.0, kv_bytes, dec_floor, pre_floor, dec_flops, pre_flops)
        block = (tuple(shapes), parts)
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
            self._by_id.clear()
            by_shape = self._linear_cache[choice] = {}
        out_f, in_f = shape
        rank = choice.rank_for(out_f, in_f)
        if rank is None:
            parts = self._matmul(out_f, in_f, choice)
        else:
            rank = min(rank, out_f, in_f)
            if rank * (out_f + in_f) > out_f * in_f:
                r_star = out_f * in_f / (out_f + in_f)
                raise PlanError(
                    f"rank {rank} for a {out_f}x{in_f} linear is above the break-even rank {r_star:.1f}: "
                    "the two factors would store more than the dense layer (lower rank_ratio or leave it dense)"
                )
            parts = _add(self._matmul(rank, in_f, choice), self._matmul(out_f, rank, choice))
        by_shape[shape] = parts
        return parts

    def _stand_in(self, fmt: formats.Format, shape: tuple[int, int]) -> formats.Format | None:
        """Give the format a runtime that lacks ``fmt`` would store this tensor in: the smallest of its
        own formats holding at least as many bits per weight (deploying it means re-quantizing; a
        study searched for this runtime never needs it), or None (dense) when it has none."""
        key = (fmt.name, shape)
        if key not in self._stand_ins:
            need = fmt.bytes(shape)
            own = [formats.get(n) for n in self.profile.format_names]
            fits = [f for f in own if not f.is_float and f.check(shape) is None and f.bytes(shape) >= need]
            self._stand_ins[key] = min(fits, key=lambda f: f.bytes(shape), default=None)
        return self._stand_ins[key]

    def _matmul(self, out_f: int, in_f: int, choice: LayerChoice) -> _Parts:
        """Give one weight matmul's roofline time and floor (decode and prefill) and its stored bytes."""
        p, k = self.profile, self.profile.kernels
        params = out_f * in_f
        fmt = choice.fmt
        if fmt is not None and not fmt.is_float and not p.runs(fmt.name):
            fmt = self._stand_in(fmt, (out_f, in_f))
        if fmt is None:
            keys = efficiency_keys(None, p.dense_bits)
            value_bytes, bits = params * p.dense_bits / 8, 16
        else:  # the bytes the runtime stores: codes, scales, mins, as the format registry counts them
            keys = efficiency_keys(fmt)
            value_bytes, bits = float(fmt.bytes((out_f, in_f))), fmt.bits
        if choice.bits == 8 and choice.act_bits == 8 and "w8a8" in p.compute_efficiency_by_format:
            keys = ("w8a8", *keys)  # a runtime with its own int8 x int8 GEMM for W8A8 (measured by calibration)
        speedup = 1.0
        if choice.sparsity_pattern == "2:4" and k.sparse_2_4:
            value_bytes = value_bytes * 0.5 + params * 0.5 * 2 / 8  # kept half + 2-bit index each
            speedup = k.sparse_2_4_speedup
        elif choice.sparsity > 0 and choice.sparsity_pattern == "unstructured" and k.unstructured_sparse_storage:
            # kept values + 1-bit bitmap; an exporter keeps the dense layout when that is smaller
            value_bytes = min(value_bytes, value_bytes * (1.0 - choice.sparsity) + params / 8)
        weight_bytes = value_bytes
        if bits <= 8 and k.int8_compute and p.int8_tops is not None:
            peak_raw, act_bytes = p.int8_tops * 1e12 * speedup, 1
        else:
            peak_raw, act_bytes = p.fp16_tflops * 1e12 * speedup, p.dense_bits // 8
        peak = peak_raw * p.compute_efficiency_for(*keys)
        # the format's efficiency applies to streaming its weights (dequantisation); activations use the default
        bw_raw = p.peak_bw_GBps * 1e9
        weight_bw = bw_raw * p.bw_efficiency_for(*keys)
        act_bw = bw_raw * p.bw_efficiency
        aligned = out_f % p.alignment == 0 and in_f % p.alignment == 0
        slow = 1.0 if aligned else 1.0 / p.misaligned_penalty
        over_ms = p.linear_overhead_us_for(*keys) * 1e-3

        def busy_ms(tokens: int) -> float:
            flops = 2.0 * tokens * params
            memory_s = weight_bytes / weight_bw + tokens * (in_f + out_f) * act_bytes / act_bw
            return max(flops / peak, memory_s) * slow * 1e3

        def floor_ms(tokens: int) -> float:
            return (
                max(2.0 * tokens * params / peak_raw, (weight_bytes + tokens * (in_f + out_f) * act_bytes) / bw_raw)
                * 1e3
            )

        m, n = self.batch, self.batch * self.prompt_tokens
        return (
            busy_ms(m),
            over_ms,
            busy_ms(n),
            over_ms,
            weight_bytes,
            0.0,
            floor_ms(m),
            floor_ms(n),
            2.0 * m * params,
            2.0 * n * params,
        )


def predict(plan: Plan, anatomy: ModelAnatomy, profile: HardwareProfile, **scenario: int) -> Cost:
    """Give the cost of one plan (``scenario``: prompt_tokens, context_tokens, batch); for many plans
    build one ``CostModel`` and reuse it, it caches per layer."""
    return CostModel(profile, anatomy, **scenario).predict(plan)
