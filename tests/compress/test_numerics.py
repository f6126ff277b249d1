"""Runtime numerics emulation: our model with onnxruntime's activation rounding = the exported file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from autocompress.compress import apply_plan_to
from autocompress.compress.numerics import emulated, llamacpp_logprobs, round_per_block
from autocompress.export.onnx import export_onnx
from autocompress.hardware.measure import ort_session
from autocompress.model import load_model
from autocompress.plan import BlockChoice, LayerChoice
from autocompress.runtime import llamacpp
from tests.conftest import plan_for


@pytest.fixture(scope="module")
def llama():
    return load_model("tiny-llama")


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _mixed(a):
    b1 = [s.name for s in a.blocks[1].linears]
    layers = {
        b1[0]: LayerChoice(bits=8, act_bits=8),  # W8A8: dynamic int8 per tensor
        b1[1]: LayerChoice(bits=4, group_size=32, symmetric=False, act_bits=8),  # per token, then per block
        b1[2]: LayerChoice(bits=8),  # 8-bit rows in 32-blocks
        b1[-1]: LayerChoice(bits=3, group_size=16, rank_ratio=0.5),  # low-rank: both factors
    }
    return plan_for(a, layers=layers, drop_blocks=(0,), blocks={2: BlockChoice(keep_heads=2)})


MIXED_XFAIL = pytest.mark.xfail(
    reason="fails the same way on the commit before the format registry (85fc686) on this machine with "
    "onnxruntime 1.32.0: rel. logit error 6.7e-4 for the mixed W8A8 / low-rank plan; not investigated yet",
    strict=False,
)


@pytest.mark.parametrize("which", ["int4", "int8", pytest.param("mixed", marks=MIXED_XFAIL)])
def test_emulation_reproduces_the_deployed_onnx_file(llama, tmp_path, which) -> None:
    a = llama.anatomy
    plan = {
        "int4": plan_for(a, default=LayerChoice(bits=4, group_size=32)),
        "int8": plan_for(a, default=LayerChoice(bits=8)),
        "mixed": _mixed(a),
    }[which]
    model = apply_plan_to(llama.model, a, plan)
    path = export_onnx(model, a, plan, tmp_path / "m.onnx").path
    ids = torch.randint(3, 250, (2, 16), generator=torch.Generator().manual_seed(0))
    (deployed,) = ort_session(path).run(None, {"input_ids": ids.numpy(), "attention_mask": np.ones((2, 16), np.int64)})

    def logits() -> np.ndarray:
        with torch.no_grad():
            return model(input_ids=ids, use_cache=False, logits_to_keep=1).logits.numpy()

    plain = logits()
    with emulated(model, a, plan, "onnxruntime-cpu"):
        emu = logits()
    assert _rel(emu, deployed) < 1e-5 < _rel(plain, deployed)  # the rounding is real, and emulated exactly
    np.testing.assert_array_equal(logits(), plain)  # the emulation's hooks are gone again


def test_exact_numerics_change_nothing_and_unknown_ones_are_refused(llama) -> None:
    a = llama.anatomy
    plan = plan_for(a, default=LayerChoice(bits=4, group_size=32))
    model = apply_plan_to(llama.model, a, plan)
    with emulated(model, a, plan, "exact") as m:
        assert all(not mod._forward_pre_hooks for mod in m.modules())
    with pytest.raises(ValueError, match="numerics must be one of"), emulated(model, a, plan, "fp8-gpu"):
        pass


def test_round_per_block_bounds_the_error_by_half_a_step() -> None:
    x = torch.randn(3, 100) * torch.linspace(0.1, 50, 100)
    y = round_per_block(x, 32)
    assert y.shape == x.shape
    for blk in range(4):  # 100 = 3 full blocks of 32 + a padded one
        sl = slice(32 * blk, min(100, 32 * blk + 32))
        step = x[:, sl].abs().amax(-1, keepdim=True) / 127
        assert ((y[:, sl] - x[:, sl]).abs() <= step / 2 + 1e-6).all()


def test_search_evaluates_with_the_profiles_numerics(tmp_path, capsys) -> None:
    import json

    import yaml

    from autocompress.hardware import profiles_dir
    from tests.test_cli import TINY, run

    d = yaml.safe_load((profiles_dir() / "x86-avx2-laptop.yaml").read_text())
    kls = {}
    for numerics in ("exact", "onnxruntime-cpu"):
        path = tmp_path / f"{numerics}.yaml"
        path.write_text(yaml.safe_dump({**d, "id": f"cpu-{numerics}", "aliases": [], "numerics": numerics}))
        argv = ["search", "--out", str(tmp_path / "s"), "--study", numerics, "--trials", "4", "--hw", str(path)]
        code, out, err = run([*argv, "--space", "quant-only", *TINY], capsys)
        assert code == 0, err
        assert ("activation rounding emulated" in err + out) == (numerics != "exact")
        pareto = json.loads((tmp_path / "s" / numerics / "pareto.json").read_text())
        kls[numerics] = {n: c["metrics"]["kl"] for n, c in pareto["baselines"].items()}
        trial = str(pareto["baselines"]["Q8_0"]["trial"])
        argv = ["export", "--study", numerics, "--studies", str(tmp_path / "s"), "--trial", trial]
        code, out, err = run([*argv, "--out", str(tmp_path / f"x-{numerics}")], capsys)
        assert code == 0, err
        rec = json.loads((tmp_path / f"x-{numerics}" / f"trial-{trial}" / "export.json").read_text())
        assert rec["onnx"]["runtime_rounding"].get("emulated_in_study", False) == (numerics != "exact")
    assert kls["exact"].keys() == kls["onnxruntime-cpu"].keys()
    for name, kl in kls["exact"].items():  # same plans evaluated as deployed (not read from the other's cache)
        assert (kls["onnxruntime-cpu"][name] == kl) == (name == "uncompressed"), name


# --- llama.cpp's CPU numerics -----------------------------------------------------------------
# Independent references, written from llama.cpp's C code (vendored 0c1e57098bba, ggml/src/ggml-cpu)
# element by element in numpy float32, then dequantized as ggml's dequantize_row_* does.


def _q8_0_reference(x: np.ndarray) -> np.ndarray:
    """quantize_row_q8_0, x86 AVX path (arch/x86/quants.c): maxScalar = max |x| of 32; d = maxScalar /
    127.f stored as fp16; id = 127.f / maxScalar (0 when maxScalar is 0); codes _mm256_round_ps(x * id,
    _MM_ROUND_NEAREST) (ties to even); dequantized as code * fp16_to_fp32(d)."""
    f32 = np.float32
    out = np.empty(x.shape, dtype=f32)
    for row in range(x.shape[0]):
        for b in range(x.shape[1] // 32):
            v = x[row, 32 * b : 32 * b + 32].astype(f32)
            max_scalar = f32(np.max(np.abs(v)))
            d = f32(np.float16(f32(max_scalar / f32(127.0))))
            inv = f32(f32(127.0) / max_scalar) if max_scalar != 0 else f32(0.0)
            for j in range(32):
                code = np.rint(f32(v[j] * inv))
                out[row, 32 * b + j] = f32(code) * d
    return out


def _nearest_int(fval: np.float32) -> int:
    """ggml-quants.c nearest_int: add 12582912.f (1.5 * 2^23) and read the low mantissa bits."""
    val = np.array([np.float32(fval) + np.float32(12582912.0)], dtype=np.float32)
    i = int(val.view(np.int32)[0])
    return (i & 0x007FFFFF) - 0x00400000


def _q8_k_reference(x: np.ndarray) -> np.ndarray:
    """quantize_row_q8_K_ref (ggml-quants.c): per 256, max = the element of largest |x| (the first one on a
    tie), iscale = -127.f / max, codes MIN(127, nearest_int(iscale * x)), d = 1 / iscale (fp32); all-zero
    blocks stay zero; dequantized as d * code."""
    f32 = np.float32
    out = np.zeros(x.shape, dtype=f32)
    for row in range(x.shape[0]):
        for b in range(x.shape[1] // 256):
            v = x[row, 256 * b : 256 * b + 256].astype(f32)
            amax, vmax = f32(0.0), f32(0.0)
            for j in range(256):
                if abs(v[j]) > amax:
                    amax, vmax = f32(abs(v[j])), v[j]
            if amax == 0:
                continue
            iscale = f32(f32(-127.0) / vmax)
            d = f32(f32(1.0) / iscale)
            for j in range(256):
                out[row, 256 * b + j] = d * f32(min(127, _nearest_int(f32(iscale * v[j]))))
    return out


def _special_rows() -> torch.Tensor:
    """Rows of 512 with ties (x * 127 / max exactly half an integer), a zero block and negative extremes."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 512, generator=g) * torch.logspace(-3, 2, 512)[torch.randperm(512, generator=g)]
    x[0, :32] = torch.arange(32) - 15.5  # max 15.5: 2.5-step multiples land on .5 after scaling by 127/15.5 ...
    x[1, :256] = torch.tensor([127.0, 2.5, -2.5, 3.5, 0.5, -0.5, 1.5, 126.5] * 32)  # ... here exactly: scale 1
    x[2, :256] = 0.0  # a zero block (both block sizes)
    x[3, 256:] = -x[3, 256:].abs()  # the extreme is negative (q8_K flips the codes' sign)
    return x


def test_llamacpp_rounding_functions_follow_the_c_code() -> None:
    from autocompress.compress.numerics import round_q8_0, round_q8_k

    x = _special_rows()
    np.testing.assert_array_equal(round_q8_0(x).numpy(), _q8_0_reference(x.numpy()))
    np.testing.assert_array_equal(round_q8_k(x).numpy(), _q8_k_reference(x.numpy()))
    for rounded in (round_q8_0(x), round_q8_k(x)):  # ties to even (C roundf: 3, -3 for ±2.5)
        assert rounded[1, 1:4].tolist() == [2.0, -2.0, 4.0]


def _kquant_llama():
    """A tiny Llama whose MLP is 256 wide, so ffn_down can take a K-quant (rows of 256)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from autocompress.model.inspect import anatomy_of

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=259,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg).eval()
    return model, anatomy_of(model, name="tiny-llama-256", model_hash="0" * 64)


def test_llamacpp_emulation_rounds_each_matmul_input_as_its_weight_type_asks(tmp_path) -> None:
    """Every linear's (and the tied head's) input, as the emulated model receives it, equals the C code's
    rounding of what it would receive unrounded: Q8_0 for Q4_0 / Q5_0 / Q8_0 / IQ4_NL, the same values for
    Q4_1 (Q8_1), Q8_K for Q4_K / Q6_K, bf16 for the dense (BF16-stored) linears and head."""
    model, a = _kquant_llama()
    by_role = {"q": "Q8_0", "k": "Q4_0", "v": "IQ4_NL", "o": "Q5_0", "gate": "Q4_1", "up": None, "down": "Q4_K"}
    layers = {s.name: LayerChoice(format=by_role[s.role]) for s in a.linears if by_role[s.role]}
    layers["model.layers.1.mlp.down_proj"] = LayerChoice(format="Q6_K")
    plan = plan_for(a, layers=layers)
    model = apply_plan_to(model, a, plan)
    raw, seen = {}, {}

    def capture(store, name):
        def hook(_m, inputs):
            store[name] = inputs[0].detach().clone()

        return hook

    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    handles = [m.register_forward_pre_hook(capture(raw, n)) for n, m in linears.items()]  # before the emulation's
    ids = torch.randint(3, 250, (2, 24), generator=torch.Generator().manual_seed(0))
    with emulated(model, a, plan, "llama.cpp-cpu"), torch.no_grad():
        handles += [m.register_forward_pre_hook(capture(seen, n)) for n, m in linears.items()]  # after it
        model(input_ids=ids)
    for h in handles:
        h.remove()
    want = {"Q8_0": _q8_0_reference, "Q8_K": _q8_k_reference}
    kinds = {"Q8_0": "Q8_0", "Q4_0": "Q8_0", "IQ4_NL": "Q8_0", "Q5_0": "Q8_0", "Q4_1": "Q8_0", "Q4_K": "Q8_K"}
    kinds["Q6_K"] = "Q8_K"
    checked = set()
    for name in linears:
        x = raw[name].reshape(-1, raw[name].shape[-1])
        got = seen[name].reshape(x.shape)
        fmt = plan.choice_for(name).format  # the tied head: the dense embedding table
        # dense tensors are stored as BF16 (the base's dtype), and their input converted to bf16
        expected = x.to(torch.bfloat16).float().numpy() if fmt is None else want[kinds[fmt]](x.numpy())
        np.testing.assert_array_equal(got.numpy(), expected, err_msg=name)
        assert not torch.equal(got, x), name  # the rounding did something
        checked.add(fmt)
    assert checked == {None, "Q8_0", "Q4_0", "IQ4_NL", "Q5_0", "Q4_1", "Q4_K", "Q6_K"}


@pytest.mark.skipif(llamacpp.find() is None, reason=f"llama.cpp's tools are not built here ({llamacpp.SETUP_HINT})")
def test_emulation_brings_our_logprobs_closer_to_llamacpps_on_a_gguf_export(tmp_path) -> None:
    """llama.cpp's log-probabilities of every token at every scored position (its own output file) on a
    GGUF export of a tiny model, beside ours on the same tokens: the llama.cpp-cpu emulation cuts the
    mean difference well below the unemulated one. The tiny model's weights are made bf16-exact first,
    so the file's BF16 tensors (embedding / head) hold exactly our weights and only arithmetic differs."""
    from autocompress.calib import held_out_text
    from autocompress.evaluate.metrics import model_logits
    from autocompress.export.gguf import export_gguf
    from autocompress.plan import ModelRef, Plan
    from autocompress.workbench import Workbench
    from tests.conftest import TINY_DATA

    wb = Workbench.open("tiny-llama", TINY_DATA)
    with torch.no_grad():
        for p in wb.lm.model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    # the edited weights keep tiny-llama's hash; this workbench's variant cache is its own, so no
    # variant of the unedited model comes back here (and none of ours reaches another test)
    a = wb.lm.anatomy
    by_role = {"q": "Q4_0", "k": "Q8_0", "v": "Q8_0", "o": "IQ4_NL", "gate": "Q5_0", "up": "Q4_0", "down": "Q8_0"}
    layers = {s.name: LayerChoice(format=by_role[s.role]) for s in a.linears}
    plan = Plan(model=ModelRef.of(a), layers=layers, provenance=wb.provenance())
    path = tmp_path / "m.gguf"
    export_gguf(wb, plan, path)
    text_file = tmp_path / "text.txt"
    text_file.write_text(held_out_text(TINY_DATA)[:6000])
    ctx = 64
    tokens, theirs = llamacpp_logprobs(path, text_file, ctx=ctx, chunks=8)
    model = wb.apply(plan)

    def diff() -> float:
        with torch.no_grad():
            logits = model_logits(model, torch.from_numpy(tokens.copy()))[:, ctx // 2 : ctx - 1]
        return float(np.abs(torch.log_softmax(logits.double(), -1).numpy() - theirs).mean())

    plain = diff()
    with emulated(model, a, plan, "llama.cpp-cpu"):
        emu = diff()
    assert emu < 0.8 * plain, (emu, plain)
