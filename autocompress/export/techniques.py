"""What each compression technique becomes in the HF export and in the ONNX export.

The same table is written into every ``export.json`` (only the techniques the plan uses) and
printed in the README, so a user can see exactly what a runtime will load.
"""

from __future__ import annotations

from autocompress.plan import Plan

# families whose code derives the head size from hidden ÷ heads, so no config field can say a
# smaller head count; every other family reads num_attention_heads / num_key_value_heads / head_dim
HEAD_SIZE_FROM_HIDDEN = ("gpt2", "bert")

TECHNIQUES: dict[str, dict[str, str]] = {
    "quantization (weights)": {
        "hf": "dequantized: fp32 weights that lie exactly on the plan's integer grid (HF has no "
        "format for per-layer mixed bits/groups); plain transformers loads them",
        "onnx": "16 bit: fp32 MatMul; 5-8 bit: MatMulNBits 8-bit, 2-4 bit: MatMulNBits 4-bit, each with the "
        "plan's exact codes, group size (power of two >= 16) and symmetry; W8A8: dynamic int8 (MatMulInteger, "
        "per output channel)",
    },
    "activation quantization (a8)": {
        "hf": "not stored (a runtime setting); load_compressed re-adds the per-token int8 rounding hook",
        "onnx": "the plan's per-token rounding is in the graph (fp32 ops); then W8A8 layers' dynamic int8 "
        "rounds activations per tensor and MatMulNBits (accuracy level 4) rounds every quantized layer's "
        "activations per weight block, a8 or not (emulated in the search for --hw local)",
    },
    "unstructured / 2:4 sparsity": {
        "hf": "zeros in dense weights (exactly the pruned entries)",
        "onnx": "dense (onnxruntime CPU has no sparse kernel): same outputs, no speed-up",
    },
    "low-rank (rank_ratio)": {
        "hf": "two linears <layer>.0 (in->r) and <layer>.1 (r->out): needs autocompress.export.load_compressed",
        "onnx": "two MatMuls, each quantized as the plan says",
    },
    "dropped blocks": {
        "hf": "blocks removed and renumbered; config num_hidden_layers (and layer_types) reduced",
        "onnx": "fewer blocks in the graph",
    },
    "MLP width (same in every kept block)": {
        "hf": "smaller matrices; config intermediate_size (GPT-2: n_inner) set to the kept width",
        "onnx": "smaller MatMuls",
    },
    "MLP width (differs between blocks)": {
        "hf": "smaller matrices per block; no config can say this: needs autocompress.export.load_compressed",
        "onnx": "smaller MatMuls",
    },
    "attention heads (same in every kept block, Llama family)": {
        "hf": "smaller q/k/v/o; config num_attention_heads, num_key_value_heads and head_dim set",
        "onnx": "smaller MatMuls and fewer heads",
    },
    "attention heads (differs between blocks, or GPT-2 / BERT)": {
        "hf": "smaller q/k/v/o per block (GPT-2/BERT derive head size from the hidden size, so no config "
        "can say this): needs autocompress.export.load_compressed",
        "onnx": "smaller MatMuls and fewer heads",
    },
}


def _widths(plan: Plan, attr: str) -> set[int | None]:
    kept = [i for i in range(plan.model.num_blocks) if i not in plan.drop_blocks]
    return {getattr(plan.block_choice(i), attr) for i in kept}


def techniques_used(plan: Plan) -> list[str]:
    """Give the keys of ``TECHNIQUES`` that ``plan`` uses."""
    choices = [plan.default, *plan.layers.values()]
    used = []
    if any(c.bits < 16 for c in choices):
        used.append("quantization (weights)")
    if any(c.act_bits < 16 for c in choices):
        used.append("activation quantization (a8)")
    if any(c.sparsity > 0 for c in choices):
        used.append("unstructured / 2:4 sparsity")
    if any(c.rank_ratio is not None for c in choices):
        used.append("low-rank (rank_ratio)")
    if plan.drop_blocks:
        used.append("dropped blocks")
    mlp = _widths(plan, "keep_mlp_channels")
    if mlp != {None}:
        used.append("MLP width (same in every kept block)" if len(mlp) == 1 else "MLP width (differs between blocks)")
    heads = _widths(plan, "keep_heads")
    if heads != {None}:
        uniform = len(heads) == 1 and plan.model.architecture not in HEAD_SIZE_FROM_HIDDEN
        used.append(
            "attention heads (same in every kept block, Llama family)"
            if uniform
            else "attention heads (differs between blocks, or GPT-2 / BERT)"
        )
    return used


def techniques_markdown() -> str:
    """Give the table as markdown (for the README and each export's README)."""
    lines = ["| technique | HF export (safetensors + config) | ONNX export |", "|---|---|---|"]
    lines += [f"| {k} | {v['hf']} | {v['onnx']} |" for k, v in TECHNIQUES.items()]
    return "\n".join(lines)
