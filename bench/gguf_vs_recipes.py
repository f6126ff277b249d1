"""Our searched GGUF files against llama.cpp's own recipes, measured with llama.cpp on this machine.

    flock ~/.cache/ac-cpu.lock python bench/gguf_vs_recipes.py --study gguf-bench [--hw local-llamacpp]

(Not named ``bench/gguf.py``: a script folder's module named ``gguf`` hides the ``gguf`` package from
every other script run from ``bench/``.)

For every recipe (Q8_0 ... Q2_K, each with and without an importance matrix made by llama-imatrix from
our calibration split), written by ``llama-quantize`` from the base model's F32 GGUF, and for every
front point of a finished llama.cpp study (exported with ``autocompress.export.gguf``): file bytes,
perplexity by ``llama-perplexity`` on held-out text (never the calibration text; ``--chunks`` chunks
of ``--ctx`` tokens), decode and prefill tokens/s by ``llama-bench`` (``--threads``), and the study
profile's predicted decode speed for the front points. Then, per recipe: our best front point at no
more than its file size and whether the recipe is dominated (a point with <= its bytes, <= its
perplexity and >= its decode speed).

The default model's base is a dequantized Q4_1 GGUF: Q4_1 reproduces it exactly and Q5_1 can hold
it exactly too. Run the study with both removed from the space (``search_spaces/gguf-bench.yaml``);
the Q4_1 recipe is reported apart (``holds_base_grid``) and no conclusion rests on it.

Every measurement is stored in bench/results/gguf.json as it is made (a rerun resumes); the files
live in ~/.cache/autocompress/bench-gguf/. Speeds need a quiet machine: on a shared one, run with
``--speed skip`` (perplexity only), then ``--speed redo`` when nothing else runs, which times every
file again in one pass (``speed_pass`` in each row names it). A speed pass times the files in
``--rounds`` interleaved rounds (every file once per round, in a seeded shuffled order), so a slow
spell of the machine spreads over all files instead of landing on the few timed during it; a file's
speed is the median of its rounds, ``tg_round_spread`` the rounds' (max - min) / median.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from pathlib import Path
from typing import Any

import gguf

from autocompress.calib import held_out_text
from autocompress.export.gguf import export_gguf
from autocompress.runtime import llamacpp, recipes
from autocompress.runtime.llama_bench import GEN_TOKENS, PROMPT_TOKENS, measure_gguf
from autocompress.workbench import Workbench

RESULTS = Path(__file__).parent / "results" / "gguf.json"
WORK = Path.home() / ".cache" / "autocompress" / "bench-gguf"


def bench_speed(path: Path, threads: int, repeats: int = 3) -> dict[str, float]:
    """Give llama-bench's decode and prefill tokens/s for a file (medians of ``repeats``)."""
    m = measure_gguf(path, threads=threads, repeats=repeats)
    return {"tg_tps": m["decode_tok_s"], "pp_tps": m["prefill_tok_s"]}


def measure(row: dict[str, Any], path: Path, text: Path, args: argparse.Namespace) -> bool:
    """Fill what ``row`` lacks of a file's bytes and perplexity; give whether anything was measured
    (speeds come after, from ``speed_pass``)."""
    if "ppl" in row:
        return False
    ppl = llamacpp.perplexity(path, text, ctx=args.ctx, chunks=args.chunks, threads=args.threads)
    row.update(bytes=path.stat().st_size, ppl=ppl)
    return True


def speed_pass(items: list[tuple[dict[str, Any], Path]], args: argparse.Namespace, out: dict[str, Any]) -> None:
    """Time the files that need it (``--speed measure``: those never timed; ``redo``: those not timed
    in the pass ``--speed-pass``) in ``--rounds`` interleaved rounds, saving after each timing (a
    rerun with the same pass name resumes); set each file's speeds to the median of its rounds."""
    if args.speed == "skip":
        return
    todo = [
        (row, path)
        for row, path in items
        if (args.speed == "redo" and row.get("speed_pass") != args.speed_pass)
        or (args.speed == "measure" and "tg_tps" not in row)
    ]
    for row, _ in todo:
        if (row.get("speed_rounds") or {}).get("pass") != args.speed_pass:
            row["speed_rounds"] = {"pass": args.speed_pass, "tg_tps": [], "pp_tps": []}
    for rnd in range(args.rounds):
        order = list(todo)
        random.Random(f"{args.speed_pass}/{rnd}").shuffle(order)
        left = [(row, path) for row, path in order if len(row["speed_rounds"]["tg_tps"]) <= rnd]
        if left:
            print(f"speed pass {args.speed_pass!r}, round {rnd + 1} of {args.rounds}: {len(left)} file(s)")
        for row, path in left:
            m = bench_speed(path, args.threads)
            row["speed_rounds"]["tg_tps"].append(m["tg_tps"])
            row["speed_rounds"]["pp_tps"].append(m["pp_tps"])
            save(out)
    for row, _ in todo:
        tg, pp = row["speed_rounds"]["tg_tps"], row["speed_rounds"]["pp_tps"]
        row.update(
            tg_tps=statistics.median(tg),
            pp_tps=statistics.median(pp),
            tg_round_spread=(max(tg) - min(tg)) / statistics.median(tg),
            speed_pass=args.speed_pass,
        )
    save(out)


def speed_text(row: dict[str, Any]) -> str:
    return f"tg {row['tg_tps']:6.1f}  pp {row['pp_tps']:6.1f}" if "tg_tps" in row else "speed not measured yet"


def tensor_bytes(path: Path) -> int:
    """Give the bytes of a GGUF file's tensors (the file less its metadata and tokenizer)."""
    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)


def points_at_recipe_sizes(front: list[Any], rows: list[dict[str, Any]], made: dict[str, Any], cost: Any) -> list[Any]:
    """Give, for each recipe, the front point with the least KL whose predicted tensor bytes are at
    most the recipe file's tensor bytes (each point once, in front order). Exporting a point applies
    its plan again (minutes with GPTQ codes), so only the points the comparison needs are measured."""
    weights = {c.trial: cost.predict(c.plan).weights_mb * 1e6 for c in front}
    keep: set[int] = set()
    for r in rows:
        if r["name"] not in made:
            continue  # measured by an earlier run with another --recipes
        limit = tensor_bytes(made[r["name"]][1])
        fits = [c for c in front if weights[c.trial] <= limit]
        if fits:
            keep.add(min(fits, key=lambda c: c.metrics.get("kl", float("inf"))).trial)
    return [c for c in front if c.trial in keep]


def save(out: dict[str, Any]) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=1) + "\n")
    tmp.replace(RESULTS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", help="finished llama.cpp study whose front is compared (omit: recipes only)")
    ap.add_argument("--studies", default="studies")
    ap.add_argument("--hw", default=None, help="profile for predicted speed (default: the study's)")
    ap.add_argument("--recipes", default=",".join(recipes.RECIPES))
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--chunks", type=int, default=128, help="128 x 256 = 32,768 held-out tokens")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--points",
        choices=("recipes", "all"),
        default="recipes",
        help="front points measured: the least-KL one at each recipe's size (default), or every one",
    )
    ap.add_argument(
        "--speed",
        choices=("measure", "skip", "redo"),
        default="measure",
        help="llama-bench speeds: measure where missing (default), skip (perplexity only: for a busy machine; "
        "a later run fills them), or redo every file's once more in one quiet pass (--speed-pass names it)",
    )
    ap.add_argument(
        "--speed-pass", default="1", help="name of a --speed redo pass (a rerun with the same name resumes it)"
    )
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds per speed pass")
    ap.add_argument(
        "--summarise", action="store_true", help="judge and print from the stored JSON only (measures nothing)"
    )
    args = ap.parse_args()

    out = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    if args.summarise:
        summarise(out)
        save(out)
        print_table(out)
        return
    out.update(ctx=args.ctx, chunks=args.chunks, threads=args.threads, scored_tokens=args.chunks * (args.ctx // 2 - 1))
    wb = Workbench.open(log=print)
    WORK.mkdir(parents=True, exist_ok=True)
    text = WORK / "held-out.txt"
    text.write_text(held_out_text(wb.data_config))

    # the base model (F32 GGUF: llama-quantize's input, and the perplexity every loss is measured from)
    made = recipes.recipe_plans(wb, WORK, tuple(args.recipes.split(",")), with_imatrix=True, log=print)
    base = out.setdefault("base", {})
    if measure(base, WORK / "base-f32.gguf", text, args):
        save(out)
    timed = [(base, WORK / "base-f32.gguf")]  # every file the speed pass times
    print(f"base (F32 GGUF): ppl {base['ppl']:.3f}, {speed_text(base)}")
    rows = {r["name"]: r for r in out.get("recipes", [])}
    for label, (plan, path) in made.items():
        r = rows.setdefault(label, {"name": label, "plan_hash": plan.hash()})
        r["holds_base_grid"] = label.split("+")[0] in recipes.HOLDS_BASE_GRID
        if measure(r, path, text, args):
            out["recipes"] = list(rows.values())
            save(out)
        timed.append((r, path))
        print(f"{label:16s} {r['bytes'] / 1e6:7.1f} MB  ppl {r['ppl']:8.3f}  {speed_text(r)}")
    out["recipes"] = list(rows.values())
    save(out)

    if not args.study:
        speed_pass(timed, args, out)
        return
    from autocompress.export.study import open_study
    from autocompress.hardware.cost import CostModel
    from autocompress.hardware.profile import load_profile

    view = open_study(args.study, args.studies)
    hw = args.hw or view.profile
    # the scenario llama-bench measures: a 64-token prefill, decode from a near-empty context
    cost = CostModel(load_profile(hw), view.anatomy, prompt_tokens=PROMPT_TOKENS, context_tokens=GEN_TOKENS // 2)
    front = {f["trial"]: f for f in out.get("front", []) if f.get("study") == args.study}
    chosen = view.front if args.points == "all" else points_at_recipe_sizes(view.front, out["recipes"], made, cost)
    print(f"front: {len(view.front)} points; measuring {len(chosen)} ({args.points})")
    for c in chosen:
        f = front.setdefault(c.trial, {"study": args.study, "trial": c.trial, "plan_hash": c.plan.hash()})
        f["description"] = c.description
        path = WORK / f"{args.study}-trial-{c.trial}.gguf"
        if not path.is_file():
            export_gguf(wb, c.plan, path)
        f["predicted_tg_tps"] = 1e3 / cost.predict(c.plan).latency_ms
        if measure(f, path, text, args):
            out["front"] = list(front.values())
            save(out)
        timed.append((f, path))
        print(
            f"trial {c.trial:4d} {f['bytes'] / 1e6:7.1f} MB  ppl {f['ppl']:8.3f}  {speed_text(f)} (pred tg {f['predicted_tg_tps']:6.1f})"
        )
    points = list(front.values())
    out["front"] = points
    out["hw"] = hw
    save(out)
    speed_pass(timed, args, out)
    if any("tg_tps" not in r for r in [*points, *out["recipes"], base]):
        print("speeds not all measured (--speed skip): run again without it to fill them and compare")
        return
    for label, (plan, _path) in made.items():  # the recipes' plans, read back from their files, priced too
        c = cost.predict(plan)
        rows[label]["predicted_tg_tps"] = 1e3 / c.latency_ms
        rows[label]["predicted_pp_tps"] = PROMPT_TOKENS * 1e3 / c.prefill_ms
    summarise(out)
    save(out)
    print_table(out)


def summarise(out: dict[str, Any]) -> None:
    """Judge every recipe against the measured front points (at most its bytes) and compare predicted
    with measured decode speed, into ``out``.

    llama-bench's decode rate is noisy here (32 tokens, 3 repeats, a 2-core VM): each recipe with and
    without an importance matrix has the same tensor types, so their spread is the noise of one
    timing (``speed_noise``: the median relative difference of those pairs); a recipe is also judged
    with speeds equal within that noise (``dominated_within_noise_by_trial``)."""
    base, points = out["base"], out["front"]
    rows = {r["name"]: r for r in out["recipes"]}
    pairs = [(r, rows[r["name"] + "+imatrix"]) for r in out["recipes"] if r["name"] + "+imatrix" in rows]
    diffs = [abs(a["tg_tps"] - b["tg_tps"]) / ((a["tg_tps"] + b["tg_tps"]) / 2) for a, b in pairs]
    noise = statistics.median(diffs) if diffs else 0.0
    out["speed_noise"] = noise
    out["speed_noise_max"] = max(diffs, default=0.0)
    spreads = [r["tg_round_spread"] for r in [out["base"], *out["recipes"], *points] if "tg_round_spread" in r]
    out["tg_round_spread_median"] = statistics.median(spreads) if spreads else None
    for r in out["recipes"]:
        fits = [f for f in points if f["bytes"] <= r["bytes"]]
        best = min(fits, key=lambda f: f["ppl"], default=None)
        r["best_trial_at_size"] = best["trial"] if best else None
        r["best_ppl_at_size"] = best["ppl"] if best else None
        for key, slack in (("dominated_by_trial", 0.0), ("dominated_within_noise_by_trial", noise)):
            dom = [f for f in fits if f["ppl"] <= r["ppl"] and f["tg_tps"] >= r["tg_tps"] * (1 - slack)]
            r[key] = min(dom, key=lambda f: f["ppl"])["trial"] if dom else None
    judged = [r for r in out["recipes"] if not r["holds_base_grid"]]
    for key in ("dominated_by_trial", "dominated_within_noise_by_trial"):
        frac = sum(r[key] is not None for r in judged) / len(judged)
        out["recipes_dominated_fraction" + ("_within_noise" if "noise" in key else "")] = frac
    out["recipes_better_ppl_at_size_fraction"] = sum(
        r["best_ppl_at_size"] is not None and r["best_ppl_at_size"] <= r["ppl"] for r in judged
    ) / len(judged)
    q4km = next((r for r in judged if r["name"] == "Q4_K_M"), None)
    if q4km and q4km["best_ppl_at_size"] is not None:
        out["ppl_loss_ratio_at_q4_k_m"] = (q4km["best_ppl_at_size"] - base["ppl"]) / (q4km["ppl"] - base["ppl"])
    # predicted against measured decode, for every file measured: the front points and the recipes
    for key, group in (("front", points), ("recipes", [r for r in out["recipes"] if "predicted_tg_tps" in r])):
        errs = [abs(f["predicted_tg_tps"] / f["tg_tps"] - 1) for f in group]
        out[f"within_10pct_{key}"] = sum(e <= 0.10 for e in errs) / len(errs) if errs else None
        out[f"median_abs_speed_error_{key}"] = statistics.median(errs) if errs else None
    errs = [abs(f["predicted_tg_tps"] / f["tg_tps"] - 1) for f in [*points, *out["recipes"]] if "predicted_tg_tps" in f]
    out["within_10pct"] = sum(e <= 0.10 for e in errs) / len(errs) if errs else None
    out["median_abs_speed_error"] = statistics.median(errs) if errs else None


def print_table(out: dict[str, Any]) -> None:
    """Print the recipes against our best front point at their size, as a Markdown table."""
    front = {f["trial"]: f for f in out["front"]}
    print("| recipe | MB | ppl | tg tok/s | our best point at <= its size: trial, MB, ppl, tg tok/s | dominated |")
    print("|---|---|---|---|---|---|")
    for r in out["recipes"]:
        f = front.get(r["best_trial_at_size"])
        ours = f"{f['trial']}: {f['bytes'] / 1e6:.1f}, {f['ppl']:.3f}, {f['tg_tps']:.1f}" if f else "none"
        dom = (
            "yes"
            if r["dominated_by_trial"] is not None
            else "within noise"
            if r["dominated_within_noise_by_trial"] is not None
            else "no"
        )
        grid = " (holds the base's grid)" if r["holds_base_grid"] else ""
        print(f"| {r['name']}{grid} | {r['bytes'] / 1e6:.1f} | {r['ppl']:.3f} | {r['tg_tps']:.1f} | {ours} | {dom} |")
    keys = (
        "recipes_dominated_fraction",
        "recipes_dominated_fraction_within_noise",
        "recipes_better_ppl_at_size_fraction",
    )
    keys += ("ppl_loss_ratio_at_q4_k_m", "within_10pct", "median_abs_speed_error", "speed_noise")
    print(json.dumps({k: out.get(k) for k in keys}))


if __name__ == "__main__":
    main()
