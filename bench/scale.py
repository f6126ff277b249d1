"""Real model sizes on this machine: random-init models built from the configs of Llama-3.2-1B and
Qwen2.5-1.5B run through the pipeline's set-up (activation statistics, calibration Hessians, the
sensitivity table) and a stated number of trials; peak RSS, seconds per phase and per trial.

    flock ~/.cache/ac-cpu.lock .venv/bin/python bench/scale.py [--models llama-3.2-1b] [--trials 10]
    SCALE_CODE=/tmp/ac-before flock ... python bench/scale.py --code before   # today's code, same script
    flock ~/.cache/ac-cpu.lock .venv/bin/python bench/scale.py --gptq        # lazy-batch vs column loop

The configs are written out below (no network): Llama-3.2-1B from ``meta-llama/Llama-3.2-1B``'s
config.json (hidden 2048, 16 layers, 32 heads / 8 KV heads of 64, intermediate 8192, vocab 128256,
tied embeddings, rope θ 500000), Qwen2.5-1.5B from ``Qwen/Qwen2.5-1.5B``'s config.json (hidden 1536,
28 layers, 12 heads / 2 KV heads of 128, intermediate 8960, vocab 151936, tied, rope θ 1e6, q/k/v
bias). Weights are random (seed 0): timings and memory depend on shapes only, quality figures mean
nothing here. Text is the byte tokenizer's (ids < 259 exist in every vocabulary).

The space is per block, Q4_0 or dense for each block's attention and MLP (no pruning, low-rank,
structure, embedding format), so the table is 2 probes per block; ``--method`` picks the quantizer:
``rtn`` (default: the pipeline's own overheads, what the memory-lean changes touch) or ``gptq``
(what the default space uses: adds GPTQ's compute, the same for both versions of the code). The
calibration Hessians are collected in the set-up either way. The hardware profile (raspberry-pi-5,
llama.cpp) only names the runtime. A trial = apply the plan + KL on the proxy
sequence (one sequence of 128 tokens, as the table). ``s_per_trial_cold``: per-linear variant
caches emptied first (every changed linear compressed again, GPTQ included); ``s_per_trial_warm``:
the variants the table computed read back (memory, then the on-disk variant cache), as in a search
after its table. Each run uses a fresh cache folder, so nothing is read from an earlier run.

Memory is guarded: a row stops (and records why) when this process passes ``--max-rss-gb`` or the
machine's available memory falls under 1.5 GB, so a run cannot starve the other users of the box.
Rows are written to bench/results/scale.json as they finish (rerun to resume; ``--force`` redoes).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

# bench/ holds scripts named like packages (gguf.py): never import from the script's own folder (python -P).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]
RESULTS = Path(os.environ.get("SCALE_RESULTS") or Path(__file__).parent / "results" / "scale.json")

# config.json numbers of the released models (see the module docstring for the sources).
MODELS: dict[str, dict] = {
    "llama-3.2-1b": {
        "arch": "llama",
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "vocab_size": 128256,
        "tie_word_embeddings": True,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 131072,
    },
    "qwen2.5-1.5b": {
        "arch": "qwen2",
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 32768,
    },
    "llama-3.1-8b": {  # meta-llama/Llama-3.1-8B config.json; for a GPU run (formula terms only on this machine)
        "arch": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 128256,
        "tie_word_embeddings": False,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 131072,
    },
    "smoke": {  # a quick check of the script itself
        "arch": "llama",
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 1024,
        "tie_word_embeddings": True,
    },
}

SPACE_YAML = """name: scale-bench
description: per-block {method} Q4_0 or dense (bench/scale.py)
granularity: block
linear:
  format: [dense, Q4_0]
  quant_method: [{method}]
embedding_format: [dense]
baselines:
  uncompressed: {}
"""
PROFILE = "raspberry-pi-5"


def _portable_code_path(pkg: Path) -> str:
    """Give the package folder relative to the repository, or ``<SCALE_CODE folder name>/autocompress``."""
    repo = Path(__file__).resolve().parents[1]
    try:
        return str(pkg.resolve().relative_to(repo))
    except ValueError:
        return f"{pkg.resolve().parent.name}/{pkg.name}"


def _use_code(root: str | None) -> None:
    """Import ``autocompress`` from ``root`` (a copy of an earlier commit) instead of the editable install."""
    if not root:
        return
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in str(getattr(f, "__module__", ""))]
    sys.path.insert(0, root)
    mod = importlib.import_module("autocompress")
    assert str(Path(mod.__file__).resolve()).startswith(str(Path(root).resolve())), mod.__file__


def _rss_gb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


def _available_gb() -> float:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1e6
    return float("inf")


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


class Guard:
    """Watch this process's memory; on a breach write the partial row with the reason and exit."""

    def __init__(self, max_rss_gb: float, on_breach) -> None:
        self.max_rss_gb, self.on_breach, self.phase = max_rss_gb, on_breach, "start"
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        while True:
            rss, avail = _rss_gb(), _available_gb()
            if rss > self.max_rss_gb or avail < 1.5:
                self.on_breach(f"stopped in {self.phase}: rss {rss:.1f} GB, machine available {avail:.1f} GB")
                os._exit(3)
            time.sleep(0.2)


def build(name: str, device: str = "cpu"):
    """Give the random-init model (eval) for ``name``'s config: fp32 on the CPU, built directly in
    bf16 on a CUDA device (no fp32 copy there)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    spec = dict(MODELS[name])
    arch = spec.pop("arch")
    cfg_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if arch == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    cfg = cfg_cls(**spec, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    if device == "cpu":
        model = model_cls(cfg).float().eval()
    else:
        dtype = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            with torch.device(device):
                model = model_cls(cfg).eval()
        finally:
            torch.set_default_dtype(dtype)
    model.config._name_or_path = name
    return model


def _key(row: dict) -> tuple:
    return row["model"], row["code"], row["device"], row.get("quant_method", "gptq")


def load_results() -> dict:
    if RESULTS.is_file():
        return json.loads(RESULTS.read_text())
    return {"rows": [], "gptq": []}


def save_results(res: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, RESULTS)


def _put_row(row: dict) -> None:
    res = load_results()
    res["rows"] = [r for r in res["rows"] if _key(r) != _key(row)]
    res["rows"].append(row)
    save_results(res)


def run_model(
    name: str,
    code: str,
    trials: int,
    cold: int,
    calib_tokens: int,
    max_rss_gb: float,
    method: str = "gptq",
    device: str = "cpu",
) -> dict:
    """Give one row: set-up phases, table and trials of ``name`` with the code imported now."""
    import optuna
    import torch

    import autocompress
    from autocompress.calib import DataConfig, activation_stats, load_token_data
    from autocompress.compress import apply as apply_mod
    from autocompress.compress.hessian import calibration_hessians
    from autocompress.evaluate import Evaluator
    from autocompress.hardware import load_profile
    from autocompress.model.inspect import anatomy_of
    from autocompress.model.loading import LoadedModel
    from autocompress.model.tokenizer import ByteTokenizer
    from autocompress.search.table import sensitivity_table
    from autocompress.space import SearchSpace, SpaceContext
    from autocompress.workbench import Workbench

    torch.set_grad_enabled(False)
    row: dict = {
        "model": name,
        "code": code,
        "quant_method": method,
        # which copy of the package ran, without this machine's paths: the repository's, or SCALE_CODE's folder
        "code_path": _portable_code_path(Path(autocompress.__file__).parent),
        "device": torch.device(device).type,
        "threads": torch.get_num_threads(),
        "calib_tokens": calib_tokens,
        "trials": trials,
        "cold_trials": cold,
        "peak_gpu_gb": None,
        "complete": False,
    }
    guard = Guard(max_rss_gb, lambda why: _put_row({**row, "stopped": why, "peak_rss_gb": peak_rss_gb()}))

    def phase(label: str) -> None:
        guard.phase = label
        row[f"rss_after_{label}_gb"] = round(_rss_gb(), 2)
        row["peak_rss_gb"] = round(peak_rss_gb(), 2)
        if row["device"] == "cuda":
            row["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        _put_row(row)

    t = time.perf_counter()
    model = build(name, device)
    row["params"] = sum(p.numel() for p in model.parameters())
    row["build_s"] = round(time.perf_counter() - t, 1)
    anatomy = anatomy_of(model, name=name, model_hash=f"scale-bench-{name}-seed0")
    lm = LoadedModel(model=model, tokenizer=ByteTokenizer(), anatomy=anatomy, source=name)
    phase("build")

    cfg = DataConfig(calib_tokens=calib_tokens, proxy_tokens=256, eval_tokens=256)
    data = load_token_data(lm.tokenizer, cfg)
    guard.phase = "stats"
    t = time.perf_counter()
    stats = activation_stats(model, anatomy, data)
    row["stats_s"] = round(time.perf_counter() - t, 1)
    phase("stats")
    on_device = {"device": torch.device(device)} if "device" in Workbench.__dataclass_fields__ else {}
    wb = Workbench(lm=lm, data=data, data_config=cfg, stats=stats, **on_device)

    guard.phase = "hessians"
    t = time.perf_counter()
    if hasattr(wb, "hessians"):  # the workbench keeps its own (no per-process registry)
        wb.hessians()
    else:
        calibration_hessians(model, anatomy, data)
    row["hessian_s"] = round(time.perf_counter() - t, 1)
    phase("hessians")

    space_path = Path(os.environ["AUTOCOMPRESS_CACHE"]) / "scale-bench.yaml"
    space_path.write_text(SPACE_YAML.replace("{method}", method))
    space = SearchSpace.load(space_path).for_profile(load_profile(PROFILE))
    ctx = SpaceContext(anatomy=anatomy, drop_order=stats.drop_order(), provenance=wb.provenance(seed=0))
    _variant_folder(wb, apply_mod, Path(os.environ["AUTOCOMPRESS_CACHE"]) / "variants")
    guard.phase = "table"
    t = time.perf_counter()
    table = sensitivity_table(wb, space, ctx, None, lambda _m: None)
    row["table_s"] = round(time.perf_counter() - t, 1)
    row["table_entries"] = len(table.entries)
    phase("table")

    evaluator = Evaluator(model, data, anatomy.task)
    study = optuna.create_study(directions=["minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    plans = [space.suggest(study.ask(), ctx) for _ in range(trials)]
    share = "share_base" in Workbench.apply.__code__.co_varnames  # the cheap trial path, where it exists

    def trial(plan) -> float:
        t0 = time.perf_counter()
        compressed = wb.apply(plan, share_base=True) if share else wb.apply(plan)
        with wb.evaluating(plan, compressed) as m:
            evaluator.proxy(m)
        del compressed
        return time.perf_counter() - t0

    guard.phase = "warm trials"
    warm = [trial(p) for p in plans]
    row["s_per_trial_warm"] = round(sum(warm) / len(warm), 2)
    row["warm_each_s"] = [round(x, 2) for x in warm]
    phase("warm_trials")

    guard.phase = "cold trials"
    _variant_folder(wb, apply_mod, None)
    cold_s = []
    for p in plans[:cold]:
        if hasattr(wb, "variants"):
            wb.variants.clear()
        else:
            apply_mod.clear_cache()
        cold_s.append(trial(p))
    row["s_per_trial_cold"] = round(sum(cold_s) / max(len(cold_s), 1), 2) if cold_s else None
    row["cold_each_s"] = [round(x, 2) for x in cold_s]
    row["quantized_units_per_trial"] = [
        sum(1 for s in anatomy.linears if p.choice_for(s.name).quantized) for p in plans[:cold]
    ]
    row["complete"] = True
    phase("cold_trials")
    return row


def _variant_folder(wb, apply_mod, folder: Path | None) -> None:
    """Keep the workbench's variants on disk in ``folder`` (None: memory only), with either version of the code."""
    if hasattr(wb, "variants"):  # the workbench owns its cache
        wb.variants.folder = folder
    else:  # the module-level cache of earlier versions
        apply_mod.set_disk_cache(folder)


def gptq_speed(n_linears: int, fmt_name: str = "Q4_0", reps: int = 3) -> list[dict]:
    """Give per-linear timings of GPTQ with lazy batches of 128 columns vs one column at a time
    (the error of each column pushed onto every later column at once), on the default model.

    Each linear is timed ``reps`` times per variant, the two variants alternating, after one untimed
    warm-up run; the fastest run counts (the box is shared: slower runs measure the neighbours)."""
    import torch

    from autocompress import formats
    from autocompress.compress.hessian import calibration_hessians
    from autocompress.workbench import Workbench

    torch.set_grad_enabled(False)
    wb = Workbench.open(None)
    hess = wb.hessians() if hasattr(wb, "hessians") else calibration_hessians(wb.lm.model, wb.lm.anatomy, wb.data)
    fmt = formats.get(fmt_name)
    rows = []
    sites = wb.lm.anatomy.linears
    step = max(1, len(sites) // n_linears)
    for site in sites[::step][:n_linears]:
        w = wb.lm.model.get_submodule(site.name).weight.detach().float()
        h = hess.get(site.name)
        out: dict[str, tuple[float, torch.Tensor]] = {}
        if not rows:
            formats.gptq_quantize(w, h, fmt, act_order=True, block=128)  # warm-up (first-call allocations)
        for _ in range(reps):
            for label, block in (("lazy_batch_128", 128), ("column_loop", 1)):
                t = time.perf_counter()
                q = formats.gptq_quantize(w, h, fmt, act_order=True, block=block)
                s = time.perf_counter() - t
                out[label] = (min(s, out[label][0]) if label in out else s, fmt.dequantize(q))
        a, b = out["lazy_batch_128"][1], out["column_loop"][1]
        rows.append(
            {
                "linear": site.name,
                "shape": list(w.shape),
                "format": fmt_name,
                "lazy_batch_s": round(out["lazy_batch_128"][0], 3),
                "column_loop_s": round(out["column_loop"][0], 3),
                "speedup": round(out["column_loop"][0] / out["lazy_batch_128"][0], 2),
                "max_abs_diff": float((a - b).abs().max()),
                "share_equal": float((a == b).float().mean()),
                "reps": reps,
                "weight_rms": float(w.pow(2).mean().sqrt()),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def memory_terms(name: str) -> dict:
    """Give the terms of the peak-memory formula for ``name``'s config, in GB (from shapes alone)."""
    c = MODELS[name]
    d, ff, n, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    hd = c.get("head_dim") or d // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    bias = q + 2 * kv if c["arch"] == "qwen2" else 0
    per_block = d * q + 2 * d * kv + q * d + 3 * d * ff + 2 * d + bias
    params = v * d * (1 if c["tie_word_embeddings"] else 2) + n * per_block + d
    block_h = (2 * d * d + q * q + ff * ff) * 4  # inputs of q/k/v, o, gate/up, down: Σ in² float32
    return {
        "params": params,
        "base_fp32_gb": round(params * 4 / 1e9, 2),
        "base_bf16_gb": round(params * 2 / 1e9, 2),
        "hessians_all_gb": round(n * block_h / 1e9, 2),
        "hessians_one_block_gb": round(block_h / 1e9, 3),
        "largest_hessian_gb": round(max(d, q, ff) ** 2 * 4 / 1e9, 3),
        "calib_logits_per_batch_gb": round(4 * 256 * v * 4 / 1e9, 2),  # batch 4 x 256 tokens, float32
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="llama-3.2-1b")
    ap.add_argument("--code", default="after", help="label of the code measured (before = SCALE_CODE's copy)")
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--cold", type=int, default=2, help="how many of the trials also run cold")
    ap.add_argument("--calib-tokens", type=int, default=1024)
    ap.add_argument("--method", default="rtn", choices=("rtn", "gptq"), help="quantizer of the bench space")
    ap.add_argument("--max-rss-gb", type=float, default=19.0)
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--gptq", type=int, default=0, help="time GPTQ blocking on this many default-model linears")
    ap.add_argument("--formula", action="store_true", help="print the peak-memory formula's terms and exit")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (the model built there; bf16 on a GPU)")
    args = ap.parse_args()
    if args.formula:
        res = load_results()
        res["memory_terms"] = {m: memory_terms(m) for m in MODELS if m != "smoke"}
        save_results(res)
        for m, terms in res["memory_terms"].items():
            print(m, json.dumps(terms))
        return
    _use_code(os.environ.get("SCALE_CODE"))

    if args.gptq:
        res = load_results()
        res["gptq"] = gptq_speed(args.gptq)
        save_results(res)
        tot_lazy = sum(r["lazy_batch_s"] for r in res["gptq"])
        tot_loop = sum(r["column_loop_s"] for r in res["gptq"])
        print(
            f"GPTQ on {len(res['gptq'])} linears: column loop {tot_loop:.2f} s, lazy batch {tot_lazy:.2f} s, "
            f"speed-up {tot_loop / tot_lazy:.2f}x; max |diff| {max(r['max_abs_diff'] for r in res['gptq']):.3g}, "
            f"weights equal: {min(r['share_equal'] for r in res['gptq']):.5f} (worst linear)"
        )
        return

    done = {_key(r) for r in load_results()["rows"] if r.get("complete")}
    for name in args.models.split(","):
        if (name, args.code, args.device.split(":")[0], args.method) in done and not args.force:
            print(f"{name} / {args.code}: done (use --force to redo)")
            continue
        with tempfile.TemporaryDirectory(prefix="scale-cache-") as tmp:
            os.environ["AUTOCOMPRESS_CACHE"] = tmp
            row = run_model(
                name, args.code, args.trials, args.cold, args.calib_tokens, args.max_rss_gb, args.method, args.device
            )
        print(json.dumps(row, indent=1))
    print_table(load_results())


def print_table(res: dict) -> None:
    cols = (
        "model",
        "code",
        "quant_method",
        "device",
        "params",
        "peak_rss_gb",
        "hessian_s",
        "table_s",
        "s_per_trial_warm",
        "s_per_trial_cold",
        "trials",
    )
    print(" | ".join(cols))
    for r in res["rows"]:
        print(" | ".join(str(r.get(c, r.get("stopped", "-") if c == "table_s" else "-")) for c in cols))


if __name__ == "__main__":
    main()
