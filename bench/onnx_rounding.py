"""What onnxruntime's int8 activation rounding costs on the default model, per export format.

    flock /tmp/autocompress-cpu.lock python bench/onnx_rounding.py

onnxruntime CPU's fast quantized kernels round activations to int8 at run time: ``MatMulNBits`` at
accuracy level 4 per block of the weight's K blocks, dynamic int8 (``MatMulInteger``) per tensor.
Our PyTorch model rounds only the weights (and, for W8A8, activations per token) — what the search
evaluates for profiles with ``exact`` numerics; for ``onnxruntime-cpu`` (the calibrated ``local``
profile) it emulates the runtime's rounding (``compress/numerics.py``). For uniform plans on
SmolLM2-135M (RTN, so no calibration Hessians are needed), each exported the way ``autocompress
export`` does — and 8-bit per-row weights also in 128-blocks, the alternative to the 32-blocks we
store them in — this prints:

- KL runtime: the deployed file's next-token distributions vs our PyTorch model's, on held-out text
  (``export.verify.runtime_rounding``); KL plan: our model vs the base model on the same positions;
- KL emulated: the deployed file vs our model with onnxruntime's rounding emulated (0 = exact
  emulation), and both against the base model (what a study with ``onnxruntime-cpu`` numerics ranks by);
- the stored-weights check (MatMulNBits in fp32 vs our model, relative L2 error of the logits);
- decode (1 token) and 64-token prefill latency, onnxruntime CPU, 1 thread, best median of 2 rounds;
- the file size.

Writes bench/results/onnx_rounding.json.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from autocompress.compress.numerics import emulated
from autocompress.export import onnx as onnx_export
from autocompress.export.verify import check_onnx, measure_latency, runtime_rounding
from autocompress.plan import LayerChoice, ModelRef, Plan
from autocompress.workbench import Workbench

RESULTS = Path(__file__).parent / "results" / "onnx_rounding.json"
ARMS = (  # name, plan choice for every linear, 8-bit per-row block size
    ("fp16 (fp32 ONNX)", LayerChoice(), None),
    ("w8 per row, 32-blocks (ours)", LayerChoice(bits=8), 32),
    ("w8 per row, 128-blocks", LayerChoice(bits=8), 128),
    ("w8a8 (dynamic int8)", LayerChoice(bits=8, act_bits=8), None),
    ("w4 g128", LayerChoice(bits=4, group_size=128), None),
)


def main() -> None:
    wb = Workbench.open()
    a = wb.lm.anatomy
    rows = []
    default_block = onnx_export.ROW_BLOCK[8]
    with tempfile.TemporaryDirectory(prefix="onnx-rounding-") as tmp:
        for name, choice, row_block in ARMS:
            plan = Plan(model=ModelRef.of(a), default=choice)
            model = wb.apply(plan)
            onnx_export.ROW_BLOCK[8] = row_block or default_block
            try:
                exp = onnx_export.export_onnx(model, a, plan, Path(tmp) / "m.onnx", quantize=not choice.is_identity)
            finally:
                onnx_export.ROW_BLOCK[8] = default_block
            check = check_onnx(exp.path, model, a, exp.formats)
            kl = runtime_rounding(exp.path, model, wb.lm.model, wb.data.proxy, a)
            with emulated(model, a, plan, "onnxruntime-cpu"):
                emu = runtime_rounding(exp.path, model, wb.lm.model, wb.data.proxy, a)
            lat = measure_latency(exp.path, threads=1, rounds=2)
            rows.append(
                {
                    "arm": name,
                    "formats": sorted(set(exp.formats.values())),
                    "kl_runtime": kl["kl_runtime"],
                    "kl_plan": kl["kl_plan"],
                    "kl_emulated": emu["kl_runtime"],
                    "kl_deployed_vs_base": kl["kl_deployed"],
                    "kl_emulated_vs_base": emu["kl_plan"],
                    "top1_runtime": kl["top1_agreement"],
                    "stored_weights_error": check["stored_weights_error"],
                    "deployed_error_random_ids": check["relative_l2_error"],
                    "decode_ms": lat["decode_ms"],
                    "prefill_ms": lat["prefill_ms"],
                    "size_mb": exp.size_mb,
                }
            )
            print(f"  {name}: KL runtime {kl['kl_runtime']:.3g}, plan {kl['kl_plan']:.3g}", flush=True)
    head = (
        "| arm | KL runtime | KL plan | runtime / plan | KL emulated | deployed vs base | emulated vs base "
        "| stored weights err | decode ms | prefill 64 ms | MB |"
    )
    print("\n" + head + "\n" + "|---" * 11 + "|")
    for r in rows:
        ratio = r["kl_runtime"] / r["kl_plan"] if r["kl_plan"] > 0 else float("nan")
        stored = "–" if r["stored_weights_error"] is None else f"{r['stored_weights_error']:.1g}"
        print(
            f"| {r['arm']} | {r['kl_runtime']:.2g} | {r['kl_plan']:.2g} | {ratio:.2f} | {r['kl_emulated']:.1g} | "
            f"{r['kl_deployed_vs_base']:.2g} | {r['kl_emulated_vs_base']:.2g} | {stored} | "
            f"{r['decode_ms']:.3g} | {r['prefill_ms']:.3g} | {r['size_mb']:.0f} |"
        )
    RESULTS.write_text(json.dumps({"model": a.name, "text": kl["text"], "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
