"""Measure this machine with micro-benchmarks in onnxruntime CPU, the runtime our ONNX export deploys to.

``calibrate_local()`` times, on a fixed thread count (and torch for reference):

1. **bandwidth per weight format** — GEMV (M = 1) through chains of linears of model-like shapes,
   weights cold (the cache is flushed between runs), for fp32 ``MatMul``, 8-bit and 4-bit
   ``MatMulNBits`` (weight-only, quantized by our ONNX export) and dynamic int8 (``MatMulInteger``, W8A8);
2. **compute rate per format** — chains of a small and a large shape at M = 16..128 tokens;
3. **per-linear overhead per format** — the intercept of the cold GEMV fit (a cold linear pays a
   prefetch/first-touch ramp); chains of tiny warm linears are kept as a reference;
4. **per-kernel overhead and the block's fusion check** — the KV-cache decoder (as ``autocompress
   export`` writes it) of a random Llama of the bundled model's widths with 1 and 8 blocks, 4-bit
   linears, one decode step at 64 tokens of context and the prefill of 64 tokens, cold, the lowest
   of the rounds: onnxruntime's optimised graph gives the kernels per block (after fusion), the
   1-vs-8-block slope less the block's linears (as the 4-bit GEMV fit prices them) the fixed cost
   per block, the intercept the per-token cost; the prefill's slope against the cost model's price
   of it the block's prefill work per prompt token (``prefill_block_cost``).

and hands the timings to ``hardware.calibrate.fit_local``, which fits the profile's fields.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from autocompress import formats
from autocompress.compress.apply import apply_plan_to
from autocompress.export.onnx import export_onnx, quantize_groups
from autocompress.hardware.calibrate import FORMATS, Sample, fit_local
from autocompress.hardware.machine import Flusher, read_bandwidth_GBps
from autocompress.hardware.measure import decode_feed, ort_session, prefill_feed, timed
from autocompress.plan import LayerChoice, ModelRef, Plan

# what our ONNX export writes (export/onnx.py): fp32 MatMul, weight-only 8-bit MatMulNBits (per row,
# symmetric, in ROW_BLOCK[8]-blocks), 4-bit MatMulNBits g128, and W8A8 as dynamic int8 (MatMulInteger)
_EXPORT_FMT = {"fp32": "fp32", "int8": "int8-row-sym", "int4": "int4-g128-asym", "w8a8": "int8-dynamic"}
# the registry formats the exported layouts are (their bytes price the samples); W8A8's dynamic int8 is
# onnxruntime's own (MatMulInteger), not a storage format a plan names
_REGISTRY_FMT = {"fp32": "F32", "int8": "int8-g32-sym", "int4": "int4-g128-asym"}
# (K, N, linears in the chain): model-like widths (SmolLM2-135M ... TinyLlama-1.1B); chains
# alternate K->N and N->K so every weight is distinct and the whole chain misses the cache
# (small q/k/v/o-sized matrices too: below ~1-2 MB a GEMV does not reach streaming bandwidth, which the
# fitted per-linear overhead then carries)
GEMV_SHAPES = ((576, 192, 24), (576, 576, 16), (576, 1536, 6), (576, 1536, 18), (1024, 2816, 8), (1536, 4096, 6))
GEMM_SHAPES = ((576, 576, 8), (1024, 2816, 4))
GEMM_TOKENS = (16, 64, 128)
TINY_CHAINS = (4, 32)  # 64 x 64 linears: fixed costs only


def chain_model(k: int, n: int, layers: int, seed: int = 0, batched: bool = False) -> Any:
    """Give an fp32 ONNX model X[M, k] -> chain of ``layers`` MatMuls alternating k->n and n->k
    (``batched``: X[B, M, k], the 3-D activations a decoder's linears see)."""
    rng = np.random.default_rng(seed)
    lead = ["b", "m"] if batched else ["m"]
    nodes, inits = [], []
    prev, width = "x", k
    for i in range(layers):
        out_w = n if width == k else k
        w = (rng.standard_normal((width, out_w)) / np.sqrt(width)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"], name=f"/chain/l{i}/MatMul"))
        prev, width = f"h{i}", out_w
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [*lead, k])],
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [*lead, width])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _elementwise_chain(ops: int, width: int = 64) -> Any:
    one = numpy_helper.from_array(np.ones((width,), np.float32), "one")
    nodes = [
        helper.make_node("Add" if i % 2 == 0 else "Mul", [f"h{i - 1}" if i else "x", "one"], [f"h{i}"])
        for i in range(ops)
    ]
    graph = helper.make_graph(
        nodes,
        "ew",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", width])],
        [helper.make_tensor_value_info(f"h{ops - 1}", TensorProto.FLOAT, ["m", width])],
        [one],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _quantized(proto: Any, fmt: str, tmp: Path) -> Any:
    if fmt == "fp32":
        return proto
    nodes = [n.name for n in proto.graph.node if n.op_type == "MatMul"]
    return quantize_groups(proto, {_EXPORT_FMT[fmt]: nodes}, tmp)


def _stored_bytes(fmt: str, k: int, n: int, layers: int) -> float:
    """Give the bytes the micro-benchmark's chain stores in ``fmt``: ``layers`` linears, out x in
    alternating n x k and k x n (``chain_model``), each priced by the format registry."""
    shapes = [(n, k) if i % 2 == 0 else (k, n) for i in range(layers)]
    if fmt == "w8a8":  # int8 codes, an fp32 scale and an int8 zero point per output channel
        return float(sum(out * (inp + 5) for out, inp in shapes))
    return float(sum(formats.get(_REGISTRY_FMT[fmt]).bytes(shape) for shape in shapes))


def time_cold(run: Callable[[], object], flush: Flusher, repeats: int) -> float:
    run()
    times = []
    for _ in range(repeats):
        flush()
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


# the block the fixed costs are measured on: SmolLM2-135M's widths (the bundled model), a 256-token
# vocabulary (the head is negligible), random weights
BLOCK_SHAPE = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3}
BLOCK_CONTEXT = 64  # tokens in the KV cache of the timed decode step
BLOCK_VOCAB = 256
# the block's linears in 4-bit: what is left of the block once they are taken out is the least
# sensitive to their fitted rate (fp32 linears are 4x the bytes, and their error lands on the rest)
BLOCK_FORMAT = "int4"
# blocks of the two decoders timed: the per-block cost is their difference over 7 blocks (a 4-block
# decoder's 3 left it at the mercy of one noisy cold timing: 0.35 and 0.22 ms per block in two runs)
BLOCK_COUNTS = (1, 8)


def _block_model(blocks: int) -> tuple[Any, Any]:
    """Give (model, anatomy): a random Llama of ``BLOCK_SHAPE`` with ``blocks`` blocks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from autocompress.model import state_dict_hash
    from autocompress.model.inspect import anatomy_of

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=BLOCK_VOCAB, num_hidden_layers=blocks, head_dim=64, tie_word_embeddings=True, **BLOCK_SHAPE
    )
    model = LlamaForCausalLM(cfg).eval()
    return model, anatomy_of(model, name=f"block-check-{blocks}", model_hash=state_dict_hash(model))


def _block_costs(
    threads: int, tmp: Path, flush: Flusher, repeats: int, rounds: int, log: Callable[[str], None]
) -> dict[str, Any]:
    """Give the fixed costs of a block as deployed: the KV-cache decoder (what ``autocompress export``
    writes) of a model-width Llama with ``BLOCK_COUNTS`` blocks, linears in ``BLOCK_FORMAT``, one
    decode step at ``BLOCK_CONTEXT`` tokens and the prefill of that many tokens, timed cold, the
    lowest over ``rounds`` interleaved rounds; ONNX node counts before / after ORT fusion; the
    block's linears (their count, format and bytes, which ``fit_local`` takes out of the per-block
    time with that format's GEMV fit)."""
    out: dict[str, Any] = {
        "blocks": list(BLOCK_COUNTS),
        "timings_ms": {},
        "prefill_timings_ms": {},
        "graph": f"KV-cache decoder, context {BLOCK_CONTEXT} (decode) / prefill of {BLOCK_CONTEXT} tokens, cold",
    }
    runs = []
    anatomy = None
    for keep in BLOCK_COUNTS:
        model, anatomy = _block_model(keep)
        plan = Plan(model=ModelRef.of(anatomy), default=LayerChoice(format=_REGISTRY_FMT[BLOCK_FORMAT]))
        model = apply_plan_to(model, anatomy, plan)
        exp = export_onnx(model, anatomy, plan, tmp / f"block{keep}.onnx", kv_cache=True)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.optimized_model_filepath = str(tmp / f"block{keep}.opt.onnx")
        opts.log_severity_level = 3
        opts.intra_op_num_threads = threads
        ort.InferenceSession(str(exp.path), opts, providers=["CPUExecutionProvider"])
        raw_ops = [n.op_type for n in onnx.load(str(exp.path)).graph.node if n.op_type != "Constant"]
        opt_ops = [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node]
        sess = ort_session(exp.path, threads)
        step, prompt = decode_feed(sess, BLOCK_CONTEXT), prefill_feed(sess, BLOCK_CONTEXT)
        runs.append((keep, "timings_ms", lambda s=sess, f=step: s.run(None, f)))
        runs.append((keep, "prefill_timings_ms", lambda s=sess, f=prompt: s.run(None, f)))
        out[f"ops_raw_{keep}"] = len(raw_ops)
        out[f"ops_fused_{keep}"] = len(opt_ops)
        out[f"op_types_fused_{keep}"] = sorted(set(opt_ops))
    for _ in range(rounds):  # a burst of load hits one round, not one of the decoders
        for keep, key, run in runs:
            ms = time_cold(run, flush, repeats)
            out[key][keep] = min(out[key].get(keep, ms), ms)
    lo, hi = BLOCK_COUNTS
    per_block = (out["timings_ms"][hi] - out["timings_ms"][lo]) / (hi - lo)
    kernels_fused = (out[f"ops_fused_{hi}"] - out[f"ops_fused_{lo}"]) / (hi - lo)
    kernels_raw = (out[f"ops_raw_{hi}"] - out[f"ops_raw_{lo}"]) / (hi - lo)
    linears = anatomy.blocks[0].linears
    out.update(
        per_block_ms=per_block,
        kernels_per_block_fused=kernels_fused,
        kernels_per_block_unfused=kernels_raw,
        linears_per_block=len(linears),
        linear_format=BLOCK_FORMAT,
        linear_bytes_per_block=float(
            sum(formats.get(_REGISTRY_FMT[BLOCK_FORMAT]).bytes((s.out_features, s.in_features)) for s in linears)
        ),
        intercept_ms=out["timings_ms"][lo] - lo * per_block,
    )
    log(
        f"fusion check: a decoder block is {kernels_raw:.0f} ONNX ops, {kernels_fused:.0f} kernels after ORT fusion; "
        f"{per_block * 1e3:.0f} µs per block, cold (its linears included)"
    )
    return out


def calibrate_local(
    threads: int = 1, repeats: int = 9, rounds: int = 3, log: Callable[[str], None] | None = None
) -> tuple[dict, dict]:
    """Run the micro-benchmarks and fit them (``hardware.calibrate.fit_local``); give (profile dict, raw measurements dict)."""
    say = log or (lambda _m: None)
    t0 = time.perf_counter()
    flush = Flusher()
    with tempfile.TemporaryDirectory(prefix="autocompress-calib-") as tmpdir:
        tmp = Path(tmpdir)
        say("memory bandwidth: streaming read")
        read_bw = read_bandwidth_GBps(flush)
        say(f"  {read_bw:.1f} GB/s; GEMV and GEMM sweeps per format ({', '.join(FORMATS)})")
        # every session first, then interleaved rounds keeping each benchmark's lowest median:
        # on a shared machine a burst of load then hits one round, not one benchmark
        benches: list[tuple[Sample, Callable[[], object], bool]] = []
        for fmt in FORMATS:
            for k, n, layers in (*GEMV_SHAPES, *GEMM_SHAPES, *((64, 64, t) for t in TINY_CHAINS)):
                sess = ort_session(_quantized(chain_model(k, n, layers), fmt, tmp).SerializeToString(), threads)
                tiny = k == 64
                sizes = (1,) + (GEMM_TOKENS if (k, n, layers) in GEMM_SHAPES else ())
                for m in sizes:
                    x = np.ones((m, k), np.float32)
                    sample = Sample(fmt, m, layers, _stored_bytes(fmt, k, n, layers), 2.0 * m * k * n * layers, 1e9)
                    benches.append((sample, lambda s=sess, x=x: s.run(None, {"x": x}), tiny))
        best = [1e9] * len(benches)
        for r in range(rounds):
            for i, (_, run, tiny) in enumerate(benches):
                if tiny:  # fixed costs only: warm, many short repeats
                    ms = statistics.median(timed(run, warmup=20, repeats=200, min_time_s=0.2))
                else:
                    ms = time_cold(run, flush, repeats)
                best[i] = min(best[i], ms)
            say(f"  round {r + 1}/{rounds}: {len(benches)} timings")
        samples = [Sample(**{**b[0].__dict__, "median_ms": ms}) for b, ms in zip(benches, best, strict=True)]
        say("per-kernel overhead: chains of elementwise ops")
        ew = {}
        for ops in (8, 64):
            sess = ort_session(_elementwise_chain(ops).SerializeToString(), threads)
            x = np.ones((1, 64), np.float32)
            ew[ops] = statistics.median(
                timed(lambda s=sess, x=x: s.run(None, {"x": x}), warmup=20, repeats=200, min_time_s=0.3)
            )
        say(
            f"fusion check and fixed costs: the KV-cache decoder of a {BLOCK_SHAPE['hidden_size']}-wide Llama, {BLOCK_COUNTS[0]} and {BLOCK_COUNTS[1]} blocks"
        )
        block = _block_costs(threads, tmp, flush, repeats, rounds, say)
        say("torch reference (fp32 GEMV/GEMM)")
        torch_ref = _torch_reference(threads, flush, repeats)
    profile, raw = fit_local(
        samples,
        read_bw_GBps=read_bw,
        elementwise_chain_ms=ew,
        block=block,
        torch_ref=torch_ref,
        threads=threads,
        seconds=time.perf_counter() - t0,
        tool=f"onnxruntime {ort.__version__}; torch {torch.__version__}",
        runtime_version=ort.__version__,
    )
    profile["prefill_block_us_per_token"] = prefill_block_cost(profile, block)
    say(f"prefill: {profile['prefill_block_us_per_token']:.2f} µs per block and prompt token beyond its matmuls")
    return profile, raw


def block_anatomy(blocks: int) -> Any:
    """Give the anatomy of ``_block_model(blocks)`` as pure data (no weights built), for pricing it."""
    from autocompress.hardware.anchors import llama_like_anatomy

    s = BLOCK_SHAPE
    return llama_like_anatomy(
        f"block-check-{blocks}",
        blocks,
        s["hidden_size"],
        s["num_attention_heads"],
        s["num_key_value_heads"],
        s["intermediate_size"],
        BLOCK_VOCAB,
        tied=True,
    )


def prefill_block_cost(profile: dict[str, Any], block: dict[str, Any]) -> float:
    """Give a block's prefill cost per prompt token that the fitted profile leaves out (µs): the
    block check's prefill per block (the larger decoder less the smaller, over their difference in
    blocks) against the cost model's price of the same two decoders with that cost at zero. The cost
    model prices the matmuls (the GEMM fits) and the kernel launches; what is left scales with the
    tokens (norms, RoPE, softmax, the cache writes)."""
    from autocompress.hardware.cost import CostModel
    from autocompress.hardware.profile import HardwareProfile

    prof = HardwareProfile.model_validate({**profile, "prefill_block_us_per_token": 0.0})
    pred = {}
    for keep in BLOCK_COUNTS:
        anatomy = block_anatomy(keep)
        plan = Plan(model=ModelRef.of(anatomy), default=LayerChoice(format=_REGISTRY_FMT[BLOCK_FORMAT]))
        cm = CostModel(prof, anatomy, prompt_tokens=BLOCK_CONTEXT, context_tokens=BLOCK_CONTEXT)
        pred[keep] = cm.predict(plan).prefill_ms
    meas = block["prefill_timings_ms"]
    lo, hi = BLOCK_COUNTS
    per_block_ms = ((meas[hi] - meas[lo]) - (pred[hi] - pred[lo])) / (hi - lo)
    return round(max(0.0, per_block_ms * 1e3 / BLOCK_CONTEXT), 4)


def _torch_reference(threads: int, flush: Flusher, repeats: int) -> dict[str, float]:
    """Give torch fp32 GEMV bandwidth and GEMM rate (reference only: the profile is for onnxruntime)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        k, n, layers = max(GEMV_SHAPES, key=lambda kn: kn[0] * kn[1] * kn[2])
        ws = [torch.randn(n, k) if i % 2 == 0 else torch.randn(k, n) for i in range(layers)]

        def chain(x: torch.Tensor) -> torch.Tensor:
            for w in ws:
                x = torch.nn.functional.linear(x, w)
            return x

        with torch.inference_mode():
            gemv = time_cold(lambda: chain(torch.ones(1, k)), flush, repeats)
            gemm = time_cold(lambda: chain(torch.ones(128, k)), flush, repeats)
    finally:
        torch.set_num_threads(before)
    return {
        "gemv_ms": gemv,
        "gemv_GBps": layers * k * n * 4 / gemv / 1e6,
        "gemm_ms": gemm,
        "gemm_GFLOPs": 2 * 128 * layers * k * n / gemm / 1e6,
    }
