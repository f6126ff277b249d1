"""Measured vs predicted: check each ONNX export against PyTorch and time it on this machine.

Every exported point gets (1) an output check: the ONNX model and our PyTorch model on the same
fixed inputs, relative L2 error of the logits, with the runtime's activation rounding switched off
(MatMulNBits in fp32) against ``EXACT`` — the stored weights are the plan's — and as deployed
(against ``TOLERANCE`` by format where the rounding cannot be switched off), plus top-1 agreement;
for a decoder with a KV cache also ``GREEDY_TOKENS`` greedy tokens generated token by token through
the cache, whose tokens must equal PyTorch's greedy choices and whose logits must match to the same
tolerance; the rounding's cost on held-out text in KL (``runtime_rounding``); (2) a latency
measurement with onnxruntime CPU on a fixed thread count (warm-up, median of repeats): for a KV-cache
decoder, one decode step with ``PROMPT`` tokens in the cache ("decode") and the ``PROMPT``-token
prefill from an empty cache (``hardware.measure.measure_decode``); for a graph without a cache, a
one-token forward and a ``PROMPT``-token forward; best median of ``ROUNDS`` rounds; (3) the prediction of the ``local``
(calibrated) profile for the same scenario, or of the generic x86 prior when this machine has no
calibrated profile (the record says which); (4) a flag when the point is
measured more than ``NOISE`` slower than the uncompressed model exported the same way (fp32 ONNX):
compressed but not faster.

``autocompress.export.study.verify_front`` does this for K front points at the end of a search
(``search --verify K``); this module knows records and checks, not studies.
"""

from __future__ import annotations

import statistics
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from autocompress.errors import ProfileError
from autocompress.export.techniques import TECHNIQUES, techniques_used
from autocompress.hardware import CostModel, load_profile
from autocompress.hardware.measure import empty_cache, has_cache, measure, measure_decode, ort_generate, ort_session
from autocompress.model.anatomy import ModelAnatomy
from autocompress.plan import ModelRef, Plan

if TYPE_CHECKING:
    from autocompress.export.study import StudyView
    from autocompress.search.result import Candidate

PROMPT = 64  # prefill tokens measured and predicted
CHECK_SHAPE = (2, 16)  # fixed inputs of the output check
GREEDY_TOKENS = 32  # tokens the check generates through a KV cache, compared with PyTorch's greedy choices
GREEDY_TIE = 1e-4  # a differing token counts as a tie when PyTorch's logits for both are this close
GENERIC_PROFILE = "x86-avx2-laptop"
# Relative L2 error of the logits allowed as deployed, by the coarsest format in a file checked as
# deployed (fp32, or W8A8 alone or mixed). fp32 is exact up to kernel order; MatMulNBits at accuracy
# level 4 ("int4", "int8") rounds each block of activations to int8 at run time and dynamic int8
# (W8A8) each activation tensor, which our PyTorch model (per-token rounding for W8A8) does not.
TOLERANCE = {"fp32": 1e-4, "int8": 0.05, "int4": 0.05, "int8-dynamic": 0.05}
EXACT = 1e-4  # stored weights with fp32 compute: equal to our model up to kernel summation order
NOISE = 0.05  # a point is flagged slower than uncompressed only when more than this fraction slower
ROUNDS = 2  # measurement rounds per file (best median kept: the machine is shared)


def _family(fmt: str) -> str:
    return fmt if fmt in ("fp32", "int8-dynamic") else fmt.split("-")[0]


def tolerance_for(formats: dict[str, str]) -> tuple[str, float]:
    """Give (format family, tolerance) of the coarsest format among ``formats``."""
    fams = {_family(f) for f in formats.values()} or {"fp32"}
    worst = max(fams, key=lambda f: TOLERANCE[f])
    return worst, TOLERANCE[worst]


def _torch_logits(model: torch.nn.Module, ids: np.ndarray, causal: bool) -> np.ndarray:
    t_ids = torch.from_numpy(ids)
    with torch.no_grad():
        if causal:
            out = model(input_ids=t_ids, attention_mask=torch.ones_like(t_ids), use_cache=False, logits_to_keep=1)
        else:
            out = model(input_ids=t_ids, attention_mask=torch.ones_like(t_ids))
    return out.logits.float().numpy()


def check_onnx(
    path: str | Path, model: torch.nn.Module, anatomy: ModelAnatomy, formats: dict[str, str], seed: int = 0
) -> dict[str, Any]:
    """Compare the ONNX file's logits with ``model``'s on fixed random token ids; give the check record.

    Files with MatMulNBits layers are run twice: as deployed (``relative_l2_error``: includes the
    runtime's int8 rounding of activations, which our model does not do) and with MatMulNBits
    computing in fp32 (``stored_weights_error``), which must match our model to ``EXACT``: that is
    the pass criterion, so an export bug fails it however small its effect on the logits. The
    runtime's rounding is judged on real text by ``runtime_rounding``. Other files (fp32, W8A8
    dynamic int8) pass when the deployed error is within the coarsest format's ``TOLERANCE``.

    A decoder with a KV cache also generates ``GREEDY_TOKENS`` tokens after the first row of ids,
    token by token through its cache (``greedy``): run the way the pass criterion is judged (fp32
    compute where it can be), its tokens must be PyTorch's greedy choices after the same prefix (a
    differing token passes only as a tie within ``GREEDY_TIE``) and the logits it chose them from
    must match PyTorch's to the same tolerance. Where only the deployed rounding can be run (W8A8
    files) the tokens are reported, and the logits alone judged.
    """
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, anatomy.vocab_size, size=CHECK_SHAPE, dtype=np.int64)
    ref = _torch_logits(model, ids, anatomy.task != "encoder")

    def run(source: str | Path | bytes) -> np.ndarray:
        return _ort_logits(ort_session(source, threads=1), ids)

    def rel_error(got: np.ndarray) -> float:
        return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-12))

    deployed = ort_session(path, threads=1)
    got = _ort_logits(deployed, ids)
    rel = rel_error(got)
    fp32_compute = _fp32_compute(path)
    if fp32_compute is not None:
        stored = rel_error(run(fp32_compute))
        fam, tol, compared, err = "MatMulNBits in fp32", EXACT, "stored weights (fp32 compute)", stored
    else:
        (fam, tol), compared, stored = tolerance_for(formats), "as deployed", None
        err = rel
    rec = {
        "inputs": f"{CHECK_SHAPE[0]}x{CHECK_SHAPE[1]} token ids, numpy seed {seed}",
        "relative_l2_error": rel,
        "max_abs_error": float(np.abs(got - ref).max()),
        "top1_agreement": float(np.mean(got.argmax(-1) == ref.argmax(-1))),
        "stored_weights_error": stored,
        "compared": compared,
        "tolerance": tol,
        "tolerance_format": fam,
        "passed": bool(err <= tol and got.shape == ref.shape),
    }
    if has_cache(deployed):
        judged = deployed if fp32_compute is None else ort_session(fp32_compute, threads=1)
        greedy = greedy_check(judged, model, ids[:1, :8], tol, exact_tokens=tol <= EXACT)
        greedy["deployed_tokens_equal"] = (
            greedy["tokens_equal"]
            if fp32_compute is None
            else greedy_check(deployed, model, ids[:1, :8], tol)["tokens_equal"]
        )
        rec["greedy"] = greedy
        rec["passed"] = rec["passed"] and greedy["passed"]
    return rec


def greedy_check(
    sess: Any, model: torch.nn.Module, prompt: np.ndarray, tol: float, *, exact_tokens: bool = True
) -> dict[str, Any]:
    """Generate ``GREEDY_TOKENS`` tokens with an ONNX KV-cache decoder and compare them with PyTorch
    (``passed``: logits within ``tol`` and, with ``exact_tokens``, every token PyTorch's choice or a tie).

    PyTorch scores the generated sequence in one forward without a cache: at each step its argmax is its
    greedy choice after the same prefix, and its logits are those the ONNX step chose from."""
    gen = ort_generate(sess, prompt, GREEDY_TOKENS)
    seq = np.concatenate([prompt, gen.tokens[:, :-1]], 1)
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(seq), use_cache=False).logits[:, prompt.shape[1] - 1 :].float().numpy()
    mine = ref.argmax(-1)
    differ = np.flatnonzero(mine[0] != gen.tokens[0])
    ties = [int(k) for k in differ if ref[0, k, mine[0, k]] - ref[0, k, gen.tokens[0, k]] <= GREEDY_TIE]
    err = float(np.linalg.norm(gen.logits - ref) / max(np.linalg.norm(ref), 1e-12))
    equal = int(differ[0]) if differ.size else GREEDY_TOKENS
    return {
        "prompt": f"first {prompt.shape[1]} ids of the check inputs",
        "tokens": GREEDY_TOKENS,
        "tokens_equal": equal,  # leading tokens equal to PyTorch's greedy choices
        "ties": ties,
        "logits_error": err,
        "passed": bool((len(ties) == differ.size or not exact_tokens) and err <= tol),
    }


def _ort_logits(sess: Any, ids: np.ndarray) -> np.ndarray:
    """Give the logits an ONNX session computes for ``ids`` (all-ones attention mask where it has one;
    a decoder with a KV cache starts from an empty cache)."""
    names = {i.name for i in sess.get_inputs()}
    batch, seq = ids.shape
    feed = {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "position_ids": np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq)).copy(),
    }
    feed = {k: v for k, v in feed.items() if k in names}
    if has_cache(sess):
        feed.update(empty_cache(sess, batch))
    return sess.run(None, feed)[0]


def _fp32_compute(path: str | Path) -> bytes | None:
    """Give the ONNX file with every MatMulNBits computing in fp32 (accuracy level 1), or None when
    it has none (or holds W8A8 int8 nodes, whose activation rounding cannot be switched off)."""
    import onnx

    proto = onnx.load(str(path))
    nbits = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    if not nbits or any(n.op_type in ("MatMulInteger", "DynamicQuantizeLinear") for n in proto.graph.node):
        return None
    if proto.ByteSize() >= 2**31:  # one protobuf holds at most 2 GB
        return None
    for node in nbits:
        kept = [a for a in node.attribute if a.name != "accuracy_level"]
        del node.attribute[:]
        node.attribute.extend([*kept, onnx.helper.make_attribute("accuracy_level", 1)])
    return proto.SerializeToString()


ROUNDING_WARNING = "onnxruntime's activation rounding costs more quality than the compression"
TEXT_LENGTHS = tuple(range(8, 65, 8))  # prefix lengths whose last-position logits are compared on real text


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """Mean KL(p || q) over positions, in nats."""
    lp, lq = torch.log_softmax(p_logits.double(), -1), torch.log_softmax(q_logits.double(), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def runtime_rounding(
    path: str | Path, model: torch.nn.Module, base: torch.nn.Module, tokens: torch.Tensor, anatomy: ModelAnatomy
) -> dict[str, Any]:
    """Measure, on held-out text, how far the deployed file's next-token distributions are from our
    model's (``kl_runtime``: the runtime's activation rounding), beside how far ours are from the base
    model's (``kl_plan``: what the search evaluated). ``runtime_dominates`` when the runtime adds more
    KL than the compression itself: the deployed point is worse than its study says."""
    if anatomy.task == "encoder" or getattr(tokens, "ndim", 0) != 2 or tokens.shape[1] < max(TEXT_LENGTHS):
        return {"skipped": "needs a causal LM and held-out sequences of >= 64 tokens"}
    ids = tokens[:2, : max(TEXT_LENGTHS)].to(torch.long)
    sess = ort_session(path, threads=1)
    deployed = torch.stack([torch.from_numpy(_ort_logits(sess, ids[:, :n].numpy())[:, -1]) for n in TEXT_LENGTHS], 1)
    at = [n - 1 for n in TEXT_LENGTHS]
    with torch.no_grad():
        ours = model(input_ids=ids, use_cache=False).logits[:, at].float()
        ref = base(input_ids=ids, use_cache=False).logits[:, at].float()
    kl_runtime, kl_plan = _kl(ours, deployed), _kl(ref, ours)
    return {
        "text": f"{ids.shape[0]} held-out sequences, next-token distributions after {len(at)} prefix lengths 8..64",
        "kl_runtime": kl_runtime,
        "kl_plan": kl_plan,
        "kl_deployed": _kl(ref, deployed),  # the deployed file's own KL from the base model
        "top1_agreement": float((ours.argmax(-1) == deployed.argmax(-1)).float().mean()),
        "runtime_dominates": bool(kl_runtime > max(kl_plan, 1e-6)),
    }


@dataclass
class Predictor:
    """The profile that predicts latency on this machine (``local`` if calibrated, else the x86 prior)."""

    profile: Any
    cost_model: CostModel
    note: str

    @classmethod
    def for_hw(cls, hw: str, anatomy: ModelAnatomy) -> Predictor:
        note = ""
        try:
            prof = load_profile(hw)
        except ProfileError:
            if hw not in ("local", "cpu"):
                raise
            prof = None
        if hw in ("local", "cpu") and (prof is None or not prof.calibrated):
            prof = load_profile(GENERIC_PROFILE)
            note = (
                f"no calibrated profile for this machine (hw_profiles/local.yaml): predicted with the generic "
                f"{GENERIC_PROFILE} prior; run `autocompress hw calibrate --out hw_profiles/local.yaml`"
            )
        return cls(prof, CostModel(prof, anatomy, prompt_tokens=PROMPT, context_tokens=PROMPT), note)

    @property
    def threads(self) -> int:
        cal = getattr(self.profile, "calibration", None)
        return int(getattr(cal, "threads", 1) or 1)

    def predict(self, plan: Plan) -> tuple[float, float]:
        c = self.cost_model.predict(plan)
        return c.latency_ms, c.prefill_ms

    def describe(self) -> str:
        return self.profile.id + (f" ({self.note})" if self.note else "")


def slower_than(measured_ms: float, baseline_ms: float) -> bool:
    """True when a point is measured slower than the uncompressed model by more than the noise margin."""
    return measured_ms > baseline_ms * (1 + NOISE)


def measure_latency(path: str | Path, threads: int, rounds: int = 1) -> dict[str, Any]:
    """Give the median decode and ``PROMPT``-token prefill latency (ms) of an ONNX file (best of ``rounds``).

    A decoder with a KV cache: ``decode_ms`` is one new token with ``PROMPT`` tokens in the cache,
    ``prefill_ms`` the ``PROMPT`` tokens from an empty cache (``kv_cache`` True). A graph without a
    cache: one forward over 1 and over ``PROMPT`` tokens (``kv_cache`` False)."""
    sess = ort_session(path, threads)
    kv = has_cache(sess)
    dec, pre = [], []
    for _ in range(rounds):
        if kv:
            m = measure_decode(sess, context=PROMPT, threads=threads, warmup=5, repeats=15, min_time_s=0.3)
            dec.append(m.decode.median_ms)
            pre.append(m.prefill.median_ms)
        else:
            dec.append(measure(sess, seq_len=1, threads=threads, warmup=5, repeats=15, min_time_s=0.3).median_ms)
            pre.append(measure(sess, seq_len=PROMPT, threads=threads, warmup=2, repeats=7).median_ms)
    return {"decode_ms": min(dec), "prefill_ms": min(pre), "threads": threads, "kv_cache": kv}


def scenario(kv_cache: bool) -> str:
    """Give the words for what ``measure_latency`` timed."""
    if kv_cache:
        return f"decode = one token with {PROMPT} tokens in the KV cache; prefill = {PROMPT} tokens; batch 1"
    return f"decode = one token without KV cache; prefill = {PROMPT} tokens; batch 1"


def baseline_record(wb: Any, anatomy: ModelAnatomy, pred: Predictor, folder: Path, threads: int) -> dict[str, Any]:
    """Export the uncompressed model (fp32 ONNX) into a temporary folder and measure it."""
    from autocompress.export.onnx import export_onnx

    base_plan = Plan(model=ModelRef.of(anatomy))
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".baseline.") as tmp:
        exp = export_onnx(
            wb.lm.model, anatomy, base_plan, Path(tmp) / "base.onnx", quantize=False, kv_cache=anatomy.task != "encoder"
        )
        m = measure_latency(exp.path, threads, rounds=ROUNDS)
        size = exp.size_mb
    p_dec, p_pre = pred.predict(base_plan)
    return {
        "what": "uncompressed model, fp32 ONNX",
        "onnx_size_mb": size,
        "measured_decode_ms": m["decode_ms"],
        "measured_prefill_ms": m["prefill_ms"],
        "predicted_decode_ms": p_dec,
        "predicted_prefill_ms": p_pre,
        "threads": threads,
        "profile": pred.describe(),
        "scenario": scenario(m["kv_cache"]),
    }


def reproduce_commands(view: StudyView, c: Candidate) -> list[str]:
    """Give the commands that re-create the study and then this point exactly."""
    s, run = view.settings, view.settings.get("run") or {}
    data = run.get("data") or {}
    cmd = ["autocompress search"]
    if run.get("model") not in (None, "default"):
        cmd.append(f"--model {run['model']}")
    cmd += [f"--hw {s.get('profile')}", f"--space {run.get('space', s.get('space', 'default'))}"]
    cmd += [f"--budget {k}={v:g}" for k, v in (s.get("budgets") or {}).items()]
    cmd += [f"--trials {run.get('trials', len(view.candidates))}", f"--seed {s.get('seed', 0)}"]
    cmd += [f"--sampler {run.get('sampler', 'nsga2')}", f"--study {view.name}", f"--out {view.dir.parent}"]
    if data.get("source"):
        cmd.append(f"--data {data['source']}")
    for key in ("calib_tokens", "proxy_tokens", "eval_tokens", "seq_len"):
        if key in data:
            cmd.append(f"--{key.replace('_', '-')} {data[key]}")
    plan_path = c.plan_path or view.dir / "plans" / f"{c.trial}.yaml"
    return [
        " ".join(cmd),
        f"autocompress apply {plan_path} --out compressed-{c.trial}",
        f"autocompress export --study {view.name} --out {view.dir.parent / view.name / 'exports'} "
        f"--trial {c.trial} --studies {view.dir.parent}",
    ]


def export_point(
    model: torch.nn.Module,
    wb: Any,
    view: StudyView,
    c: Candidate,
    folder: Path,
    pred: Predictor,
    *,
    onnx: bool = True,
    hf: bool = True,
    gguf: bool = False,
    threads: int = 1,
    base: dict[str, Any] | None = None,
    stored: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write one point's exports into ``folder``; give its ``export.json`` record. ``stored``: the
    quantized tensors ``model`` was built from (``wb.apply(plan, stored=...)``), which the GGUF file
    packs without applying the plan again."""
    from autocompress.export.hf import write_hf
    from autocompress.export.onnx import export_onnx

    plan = c.plan
    rec: dict[str, Any] = {
        "study": view.name,
        "trial": c.trial,
        "kind": c.kind,
        "plan_hash": plan.hash(),
        "description": c.description,
        "metrics": c.metrics,
        "predicted_on_study_profile": {"profile": view.profile, **c.cost},
        "techniques": {t: TECHNIQUES[t] for t in techniques_used(plan)},
        "reproduce": reproduce_commands(view, c),
    }
    if hf:
        rec["hf"] = write_hf(model, plan, folder, wb.lm.tokenizer)
    if gguf:
        hw = "local" if pred.note else pred.profile.id  # the user's --hw, not the uncalibrated prior
        rec["gguf"] = gguf_record(model, wb, plan, folder, stored, hw)
    if not onnx:
        return rec
    exp = export_onnx(
        model, view.anatomy, plan, folder / "model.onnx", stored=stored, kv_cache=view.anatomy.task != "encoder"
    )
    check = check_onnx(exp.path, model, view.anatomy, exp.formats)
    rounding = runtime_rounding(exp.path, model, wb.lm.model, wb.data.proxy, view.anatomy)
    if view.settings.get("numerics") == "onnxruntime-cpu" and "kl_runtime" in rounding:
        rounding["emulated_in_study"] = True  # the study's KL already includes this rounding
        rounding["runtime_dominates"] = False
    m = measure_latency(exp.path, threads, rounds=ROUNDS)
    p_dec, p_pre = pred.predict(plan)
    rec["onnx"] = {
        "file": "model.onnx",
        "size_mb": round(exp.size_mb, 2),
        "formats": dict(Counter(exp.formats.values())),
        "format_per_linear": exp.formats,
        "not_represented": list(exp.not_represented),
        "kv_cache": [{"kv_heads": h, "head_dim": d} for h, d in exp.cache],
        "check": check,
        "runtime_rounding": rounding,
    }
    lat = {
        "runtime": "onnxruntime CPU",
        "threads": threads,
        "measured_decode_ms": m["decode_ms"],
        "predicted_decode_ms": p_dec,
        "decode_predicted_over_measured": p_dec / m["decode_ms"],
        "measured_prefill_ms": m["prefill_ms"],
        "predicted_prefill_ms": p_pre,
        "prefill_predicted_over_measured": p_pre / m["prefill_ms"],
        "profile": pred.describe(),
        "scenario": scenario(m["kv_cache"]),
    }
    if base:
        lat["speedup_vs_uncompressed"] = base["measured_decode_ms"] / m["decode_ms"]
        lat["slower_than_uncompressed"] = slower_than(m["decode_ms"], base["measured_decode_ms"])
    rec["latency"] = lat
    return rec


GGUF_CHECK_CHARS = 60_000  # held-out characters llama-perplexity scores each GGUF on (16 chunks of 256 tokens)


def gguf_record(
    model: torch.nn.Module,
    wb: Any,
    plan: Any,
    folder: Path,
    stored: dict[str, Any] | None = None,
    hw: str = "local",
) -> dict[str, Any]:
    """Write ``folder/model.gguf`` (read back exactly, else an error), give llama.cpp's verdict on it
    and its speed here by llama-bench beside the prediction of a llama.cpp profile of this machine."""
    from autocompress.calib import held_out_text
    from autocompress.export.gguf import check_with_llamacpp, export_gguf

    applied = None if stored is None else (model, stored)
    rec = {"file": "model.gguf", **export_gguf(wb, plan, folder / "model.gguf", applied=applied)}
    text = held_out_text(wb.data_config)[:GGUF_CHECK_CHARS]
    rec["llamacpp"] = check_with_llamacpp(folder / "model.gguf", model, text)
    rec["latency"] = gguf_latency(folder / "model.gguf", plan, wb.lm.anatomy, hw)
    return rec


LLAMACPP_PROFILE = "local-llamacpp"  # written by `autocompress hw calibrate --runtime llama.cpp`
GGUF_REPEATS = 3


def llamacpp_predictor(hw: str) -> tuple[Any | None, str]:
    """Give the llama.cpp profile that predicts GGUF speed on this machine (``hw`` when it is a llama.cpp
    profile, else the calibrated ``local-llamacpp``), or None and why there is none."""
    for name in (hw, LLAMACPP_PROFILE) if hw not in ("local", "cpu") else (LLAMACPP_PROFILE,):
        try:
            prof = load_profile(name)
        except ProfileError:
            continue
        if prof.runtime == "llama.cpp":
            return prof, ""
    return None, (
        "no llama.cpp profile of this machine: run `autocompress hw calibrate --runtime llama.cpp "
        f"--out hw_profiles/{LLAMACPP_PROFILE}.yaml` for predictions beside the measurement"
    )


def gguf_latency(path: Path, plan: Plan, anatomy: ModelAnatomy, hw: str = "local") -> dict[str, Any]:
    """Give a GGUF file's decode and prefill time by llama-bench (medians, fixed threads) and, where a
    llama.cpp profile of this machine exists, its prediction for the same scenario."""
    from autocompress.runtime.llama_bench import GEN_TOKENS, PROMPT_TOKENS, measure_gguf

    prof, note = llamacpp_predictor(hw)
    cal = getattr(prof, "calibration", None)
    threads = int(getattr(cal, "threads", 0) or 2)
    m = measure_gguf(path, threads=threads, repeats=GGUF_REPEATS)
    rec: dict[str, Any] = {
        "runtime": "llama.cpp (llama-bench)",
        "threads": threads,
        "scenario": f"decode = {GEN_TOKENS} tokens from an empty context; prefill = {PROMPT_TOKENS} tokens; batch 1",
        "measured_decode_ms": m["decode_ms"],
        "measured_prefill_ms": m["prefill_ms"],
    }
    if prof is None:
        rec["note"] = note
        return rec
    c = CostModel(prof, anatomy, prompt_tokens=PROMPT_TOKENS, context_tokens=max(1, GEN_TOKENS // 2)).predict(plan)
    rec.update(
        profile=prof.id,
        predicted_decode_ms=c.latency_ms,
        predicted_prefill_ms=c.prefill_ms,
        decode_predicted_over_measured=c.latency_ms / m["decode_ms"],
        prefill_predicted_over_measured=c.prefill_ms / m["prefill_ms"],
    )
    return rec


def latency_row(rec: dict[str, Any]) -> list[str]:
    """Give one row of the measured-vs-predicted table (``TABLE_HEADERS``) for an export record."""
    lat, chk = rec.get("latency") or {}, (rec.get("onnx") or {}).get("check") or {}
    hf = rec.get("hf") or {}

    def f(key: str, d: dict = lat, fmt: str = "{:.3g}") -> str:
        return fmt.format(d[key]) if key in d else "–"

    flag = " ⚠ slower than uncompressed" if lat.get("slower_than_uncompressed") else ""
    return [
        str(rec["trial"]),
        rec["description"] or "uncompressed",
        f("measured_decode_ms"),
        f("predicted_decode_ms"),
        f("decode_predicted_over_measured", fmt="{:.2f}"),
        f("speedup_vs_uncompressed", fmt="{:.2f}x") + flag,
        f("measured_prefill_ms"),
        f("predicted_prefill_ms"),
        _check_cell(chk) if chk else "–",
        _rounding_cell((rec.get("onnx") or {}).get("runtime_rounding") or {}),
        ("yes" if hf.get("loadable_with_plain_transformers") else "load_compressed") if hf else "–",
    ]


def _onnx_io(o: dict[str, Any]) -> str:
    """Give the sentence naming ``model.onnx``'s inputs and outputs."""
    if not o.get("kv_cache"):
        return "inputs `input_ids`, `attention_mask`; output: last-position logits (no KV cache)."
    n = len(o["kv_cache"])
    g = (o.get("check") or {}).get("greedy") or {}
    checked = f" {g['tokens_equal']}/{g['tokens']} greedy tokens equal to PyTorch's." if g else ""
    return (
        "a decoder with a KV cache: inputs `input_ids`, `attention_mask` (past + new tokens), `position_ids`, "
        f"`past_key_values.{{0..{n - 1}}}.key/value` [batch, kv_heads, past, head_dim] (empty on the first call); "
        f"outputs last-position `logits` and `present.{{0..{n - 1}}}.key/value`.{checked}"
    )


def _rounding_cell(r: dict[str, Any]) -> str:
    if "kl_runtime" not in r:
        return "–"
    note = " (in the study's KL)" if r.get("emulated_in_study") else " ⚠" if r["runtime_dominates"] else ""
    return f"{r['kl_runtime']:.2g} / {r['kl_plan']:.2g}{note}"


def _check_cell(chk: dict[str, Any]) -> str:
    stored = chk.get("stored_weights_error")
    err = chk["relative_l2_error"] if stored is None else stored
    text = f"{'pass' if chk['passed'] else 'FAIL'} ({err:.2g} ≤ {chk['tolerance']:g}"
    if stored is not None:
        text += f"; as deployed {chk['relative_l2_error']:.2g}"
    if chk.get("greedy"):
        text += f"; greedy {chk['greedy']['tokens_equal']}/{chk['greedy']['tokens']}"
    return text + ")"


TABLE_HEADERS = [
    "trial",
    "plan",
    "decode ms (measured)",
    "decode ms (predicted)",
    "pred/meas",
    "speed-up",
    f"prefill {PROMPT} ms (measured)",
    f"prefill {PROMPT} ms (predicted)",
    "ONNX check (rel. L2 ≤ tol)",
    "KL runtime / plan",
    "plain transformers",
]


def latency_table(records: list[dict[str, Any]]) -> str:
    """Give the measured-vs-predicted markdown table of export records."""
    lines = ["| " + " | ".join(TABLE_HEADERS) + " |", "|" + "---|" * len(TABLE_HEADERS)]
    lines += ["| " + " | ".join(latency_row(r)) + " |" for r in records]
    return "\n".join(lines)


def index_markdown(index: dict[str, Any]) -> str:
    base = index.get("baseline")
    recs = index["exports"]
    lines = [f"# Exports of study `{index['study']}`", ""]
    if base:
        lines += [
            f"Measured on this machine with onnxruntime CPU, {base['threads']} thread(s); predicted by "
            f"{index['profile_for_prediction']}." + (f" Scenario: {base['scenario']}." if base.get("scenario") else ""),
            "",
            f"Uncompressed (fp32 ONNX): decode {base['measured_decode_ms']:.3g} ms measured vs "
            f"{base['predicted_decode_ms']:.3g} ms predicted; prefill {PROMPT}: {base['measured_prefill_ms']:.3g} ms "
            f"vs {base['predicted_prefill_ms']:.3g} ms.",
            "",
        ]
        ratios = [r["latency"]["decode_predicted_over_measured"] for r in recs if "latency" in r]
        if ratios:
            lines += [f"Median predicted/measured decode ratio: {statistics.median(ratios):.2f}.", ""]
        slow = [str(r["trial"]) for r in recs if (r.get("latency") or {}).get("slower_than_uncompressed")]
        if slow:
            lines += [f"**Measured slower than the uncompressed model: trial(s) {', '.join(slow)}.**", ""]
    worse = [
        str(r["trial"]) for r in recs if ((r.get("onnx") or {}).get("runtime_rounding") or {}).get("runtime_dominates")
    ]
    lines += [
        "ONNX check: relative L2 error of the logits against our PyTorch model on fixed random ids, with "
        f"MatMulNBits computing in fp32 (the stored weights must match to {EXACT:g}; fp32 and W8A8 files are "
        "compared as deployed, by format), then as deployed. KL runtime / plan: on "
        "held-out text, the deployed file vs our model (onnxruntime's int8 activation rounding) beside our "
        "model vs the base model (the compression the study evaluated); ⚠ = the runtime adds more.",
        "",
    ]
    if worse:
        lines += [
            f"**The runtime's activation rounding costs more than the compression in trial(s) {', '.join(worse)}: "
            "their deployed quality is worse than the study measured.**",
            "",
        ]
    ggufs = [r for r in recs if r.get("gguf")]
    gbase = index.get("gguf_baseline")
    if gbase:
        lines += [
            f"Uncompressed GGUF: decode {gbase['measured_decode_ms']:.3g} ms/token by llama-bench"
            + (f" ({gbase['predicted_decode_ms']:.3g} predicted)" if "predicted_decode_ms" in gbase else "")
            + ".",
            "",
        ]
        slow = [str(r["trial"]) for r in ggufs if r["gguf"]["latency"].get("slower_than_uncompressed")]
        if slow:
            lines += [f"**Measured slower than the uncompressed model: trial(s) {', '.join(slow)}.**", ""]
    if ggufs:
        lines += [gguf_table(ggufs), ""]
    if any(r.get("onnx") for r in recs) or not ggufs:
        lines += [latency_table(recs), ""]
    files = "`model.gguf`" if ggufs and not any(r.get("onnx") for r in recs) else "`model.onnx`"
    lines += [f"Each `trial-<N>/` holds the HF folder, {files}, `export.json` and a README with the load code.", ""]
    return "\n".join(lines)


GGUF_HEADERS = [
    "trial",
    "plan",
    "model.gguf MB",
    "llama-perplexity / ours",
    "decode ms (llama-bench)",
    "decode ms (predicted)",
    "pred/meas",
    "prefill ms (llama-bench)",
    "prefill ms (predicted)",
    "speed-up",
    "generates",
]


def gguf_table(records: list[dict[str, Any]]) -> str:
    """Give the markdown table of GGUF exports: size, llama.cpp's perplexity beside ours, llama-bench's
    speed beside the prediction of a llama.cpp profile of this machine (a note when there is none)."""

    def f(d: dict, key: str, fmt: str = "{:.3g}") -> str:
        return fmt.format(d[key]) if key in d else "–"

    lines = ["| " + " | ".join(GGUF_HEADERS) + " |", "|" + "---|" * len(GGUF_HEADERS)]
    notes: set[str] = set()
    for r in records:
        g = r["gguf"]
        lat, chk = g.get("latency") or {}, g.get("llamacpp") or {}
        if "note" in lat:
            notes.add(lat["note"])
        row = [
            str(r["trial"]),
            r["description"] or "uncompressed",
            f"{g['file_bytes'] / 1e6:.1f}",
            f(chk, "ppl_llamacpp", "{:.3f}") + " / " + f(chk, "ppl_ours", "{:.3f}"),
            f(lat, "measured_decode_ms"),
            f(lat, "predicted_decode_ms"),
            f(lat, "decode_predicted_over_measured", "{:.2f}"),
            f(lat, "measured_prefill_ms"),
            f(lat, "predicted_prefill_ms"),
            f(lat, "speedup_vs_uncompressed", "{:.2f}x") + (" ⚠ slower" if lat.get("slower_than_uncompressed") else ""),
            "yes" if chk.get("generates") else "no",
        ]
        lines.append("| " + " | ".join(row) + " |")
    profiles = sorted({r["gguf"]["latency"]["profile"] for r in records if "profile" in r["gguf"].get("latency", {})})
    head = "GGUF files, run by llama.cpp on this machine" + (
        f"; predicted by {', '.join(profiles)}" if profiles else ""
    )
    return "\n".join([head + ".", "", *lines, *(["", *sorted(notes)] if notes else [])])


def point_readme(rec: dict[str, Any]) -> str:
    hf = rec.get("hf") or {}
    lines = [
        f"# Trial {rec['trial']} of study `{rec['study']}`",
        "",
        f"Plan: {rec['description'] or 'uncompressed'}",
        "",
    ]
    if hf:
        lines += ["## Load", "", "```python"]
        if hf.get("loadable_with_plain_transformers"):
            lines += [
                "from transformers import AutoModelForCausalLM",
                'model = AutoModelForCausalLM.from_pretrained(".")',
            ]
        else:
            lines += ["from autocompress.export import load_compressed", 'model = load_compressed(".")']
        lines += ["```", ""]
        if not hf.get("loadable_with_plain_transformers"):
            lines += [f"Plain transformers cannot load this folder: {'; '.join(hf['not_loadable_because'])}.", ""]
    ct = rec.get("compressed_tensors") or {}
    if ct.get("written"):
        schemes = ", ".join(f"`{k}` x{v}" for k, v in ct["schemes"].items()) or "none (every linear dense)"
        lines += [
            "## compressed-tensors (vLLM)",
            "",
            f"`{ct['folder']}/` ({ct['file_bytes'] / 1e6:.1f} MB): the plan's codes packed (`pack-quantized`), "
            f"scales in {ct['dtype']}; schemes: {schemes}.",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM  # with compressed-tensors installed",
        ]
        if ct["loadable_with_plain_transformers"]:
            lines += [f'model = AutoModelForCausalLM.from_pretrained("./{ct["folder"]}")']
        else:
            lines += [
                "from autocompress.export.compressed_tensors import asymmetric_loading",
                "with asymmetric_loading():  # asymmetric zero points: llm-compressor #1618",
                f'    model = AutoModelForCausalLM.from_pretrained("./{ct["folder"]}")',
            ]
        lines += ["```", "", f"`vllm serve ./{ct['folder']}`", ""]
        lines += [f"vLLM: {n}." for n in ct["vllm_notes"]] + ([""] if ct["vllm_notes"] else [])
    elif ct:
        lines += [f"No compressed-tensors folder: {'; '.join(ct['not_written_because'])}.", ""]
    if "gguf" in rec:
        g, chk = rec["gguf"], rec["gguf"]["llamacpp"]
        types = ", ".join(f"{k} x{v}" for k, v in g["tensor_types"].items())
        lines += [
            "## GGUF (llama.cpp)",
            "",
            f"`model.gguf` ({g['file_bytes'] / 1e6:.1f} MB, architecture `{g['architecture']}`): {types}. Every tensor "
            "reads back (gguf-py) as exactly the plan's weights.",
            "",
            "```bash",
            'llama-simple -m model.gguf -n 32 "The capital of France is"',
            "llama-perplexity -m model.gguf -f text.txt -c 256",
            "```",
            "",
            f"llama-perplexity on held-out text ({chk['ppl_tokens']} tokens scored, -c {chk['ctx']}): "
            f"{chk['ppl_llamacpp']:.3f}; our evaluation of the plan on the same tokens: {chk['ppl_ours']:.3f} "
            f"({chk['ppl_rel_diff']:+.2%}).",
            "",
        ]
    if "onnx" in rec:
        o = rec["onnx"]
        lines += [
            "## ONNX",
            "",
            f"`model.onnx` ({o['size_mb']} MB): {_onnx_io(o)}",
            f"Formats: {', '.join(f'{k} x{v}' for k, v in o['formats'].items())}.",
            f"Check against PyTorch ({o['check'].get('compared', 'as deployed')}): "
            f"{'passed' if o['check']['passed'] else 'FAILED'} (tolerance {o['check']['tolerance']:g}); as deployed: "
            f"relative L2 error {o['check']['relative_l2_error']:.3g}, top-1 agreement {o['check']['top1_agreement']:.3f}.",
            "",
        ]
        r = o.get("runtime_rounding") or {}
        if "kl_runtime" in r:
            lines += [
                f"On held-out text, onnxruntime's int8 activation rounding moves the next-token distributions by "
                f"KL {r['kl_runtime']:.3g} from our PyTorch model; the plan itself is KL {r['kl_plan']:.3g} from "
                "the base model"
                + (" (the runtime costs more than the compression)." if r["runtime_dominates"] else "."),
                "",
            ]
        if o["not_represented"]:
            lines += ["Not represented exactly:", "", *[f"- {n}" for n in o["not_represented"]], ""]
    lines += ["## What each technique became", ""]
    lines += [f"- **{t}**: HF: {v['hf']}. ONNX: {v['onnx']}." for t, v in rec["techniques"].items()] or ["- nothing"]
    lines += ["", "## Reproduce", "", "```sh", *rec["reproduce"], "```", ""]
    return "\n".join(lines)
