"""The search against its own seeds and other proposers: same seeds, fresh processes, equal time.

    nohup flock ~/.cache/ac-cpu.lock .venv/bin/python bench/search.py > /tmp/search.log 2>&1 &   # ~2-2.5 h, resumable
    .venv/bin/python bench/search.py --model tiny-llama --minutes 0.5 --trials 60 --seeds 1 \\
        --ppl-tokens 4096 --out /tmp/search-smoke.json                                    # smoke, ~3 min

Default model (SmolLM2-135M), ``--hw jetson`` (llama.cpp), space ``search-bench`` (the default joint
space with Q4_1 and Q5_1 left out: the base is a dequantized Q4_1 GGUF, which both hold exactly).
Every arm starts from the same seeds, the study's own (uniform baselines, mixed-precision seeds,
knapsack plans, llama.cpp recipes on a llama.cpp profile), served first by ``autocompress search``;
only what follows differs:

- ``seeds``: the seeds alone;
- ``nsga2`` / ``tpe`` / ``random`` / ``evo``: ``search(sampler=...)`` (``evo``: the level-switch
  evolution at fixed cost targets, ``autocompress/search/evo.py``): the seeds, then ``--minutes`` of
  trial time or ``--trials`` evaluated trials beyond the seeds, whichever comes first;
- ``knapsack``: the seeds, then the dense knapsack plans (``Knapsack.spread``, ``DENSE_TARGETS``
  targets) not already among them.

Fairness: each arm x seed runs in its own process (``python bench/search.py --child``) with one
thread (``AUTOCOMPRESS_THREADS=1``, OMP/MKL 1, torch 1) and its own cache folder, two at a time on
the two cores. Set-up is built once (``prebuild``: a one-trial search in a cache of its own) and the
cache's ``models`` (the converted base, hard-linked), ``stats``, ``hessians``, ``sensitivity`` and
``recipes`` folders are copied into each arm's cache before it starts. The seeds arm runs first; its
evaluation cache (``evals``: the proxy KL of the seed plans, nothing else) is copied into the other
arms' caches of the same seed, so every arm holds the same seed results and spends its time budget
(which ``search`` starts at the first trial; set-up is not charged) on its own proposals. No arm sees
another's proposals. Each finished arm x seed goes into ``--out`` at once; a rerun skips those (and
restarts unfinished ones from a clean folder); other settings start over. The old Intel Neural
Compressor arm is gone (its own venv, one pick, no seeds: not comparable under these rules).

Time (estimated, not yet measured on the default model): set-up ~5-10 min once; the two seeds
arms (~30 seed plans each at one thread) ~10-15 min side by side; then the two knapsack arms (~20
dense plans each, ~10-15 min) and eight 20-min sampler arms, two at a time, ~95 min; then the
perplexity re-score on 32k tokens, ~1-1.5 min per distinct plan at 2 threads (~15-25 plans): ~2-2.5 h
in all. ``--minutes 15`` takes ~20 min off.

Indicators, computed from the stored points at the end (``--summarise`` recomputes them):
hypervolume on (log10 KL, latency, memory) in one fixed box: KL from ``KL_FLOOR_FACTOR`` below
the least seed KL (points under it count at the floor) to twice the worst seed KL, which every arm
reaches since every arm evaluates the seeds; latency and memory from the space's extreme plans to
the base model; IGD+ to the union front of all arms and seeds (same scaled box); ``new_front_points``,
front points no seed weakly dominates; perplexity on ``--ppl-tokens`` held-out tokens (the split the
search's proxy and perplexity use, rows after the proxy) of each arm's least-KL plan at or below 3
fixed latency targets (a quarter, half and three quarters of the way from the fastest seed to the
base) and at the latencies of the llama.cpp recipe seeds (``recipe_targets_ms``: on the default model
the upper two fixed targets fall where the seeds already lose no perplexity, so no ratio is defined
there, while every recipe sits in the part of the front that costs quality); the KL noise floor:
the spread of a plan's KL over ``NOISE_SUBSETS`` disjoint held-out subsets of the proxy's size,
turned into a hypervolume band (differences inside it are ties).
Writes ``bench/results/search.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
OUT = HERE / "results" / "search.json"
ARMS = ("seeds", "knapsack", "nsga2", "tpe", "random", "evo")
SAMPLER_ARMS = ("nsga2", "tpe", "random", "evo")
SPACE = "search-bench"
COPIED = ("models", "stats", "hessians", "sensitivity", "recipes")  # set-up every arm starts with
KL_FLOOR_FACTOR = 10.0  # the box's KL floor: the least seed KL / this
KL_REF_FACTOR = 2.0  # the box's reference KL: the worst seed KL x this
TARGET_FRACTIONS = (0.25, 0.5, 0.75)  # latency targets, from the fastest seed (0) to the base (1)
NO_LOSS = 0.001  # a perplexity loss under this fraction of the base's counts as none (no ratio formed)
RECIPE_PREFIX = "recipe "  # seed names of the llama.cpp recipes: their latencies are the second target set
NOISE_SUBSETS = 8
DENSE_PREFIX = "dense "  # user attr name prefix of the knapsack arm's extra plans
ONE_THREAD = {"AUTOCOMPRESS_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# ---- indicators (pure: minimised objectives, numpy only) -------------------------------------------------


def weakly_dominates(p: Sequence[float], q: Sequence[float]) -> bool:
    return all(a <= b for a, b in zip(p, q, strict=True))


def front_of(points: Sequence[Sequence[float]]) -> list[tuple[float, ...]]:
    """Give the non-dominated points (duplicates once), sorted."""
    pts = sorted({tuple(map(float, p)) for p in points})
    return [p for p in pts if not any(q != p and weakly_dominates(q, p) for q in pts)]


def igd_plus(points: Sequence[Sequence[float]], reference_front: Sequence[Sequence[float]]) -> float:
    """Give IGD+ of ``points`` to ``reference_front`` (Ishibuchi et al. 2015): the mean over the
    reference points of the distance to the nearest point, counting only where it is worse."""
    a = np.asarray(points, dtype=float)
    z = np.asarray(reference_front, dtype=float)
    if not len(z):
        return 0.0
    if not len(a):
        return math.inf
    d = np.sqrt((np.maximum(a[None, :, :] - z[:, None, :], 0.0) ** 2).sum(-1))  # [ref, point]
    return float(d.min(1).mean())


class Box:
    """The fixed objective box: (log10 KL, latency, memory) scaled to [0, 1] from ideal to reference."""

    def __init__(self, kl_floor: float, kl_ref: float, ideal_cost: Sequence[float], base_cost: Sequence[float]) -> None:
        self.low = np.array([math.log10(kl_floor), *ideal_cost], dtype=float)
        self.high = np.array([math.log10(kl_ref), *base_cost], dtype=float)

    def scaled(self, points: Sequence[Sequence[float]], kl_shift: float = 0.0) -> np.ndarray:
        """Give points (KL, latency, memory) in the box's unit coordinates; ``kl_shift`` adds to log10 KL."""
        p = np.asarray(points, dtype=float).reshape(-1, 3).copy()
        p[:, 0] = np.maximum(np.log10(np.maximum(p[:, 0], 10 ** self.low[0])) + kl_shift, self.low[0])
        span = np.where(self.high > self.low, self.high - self.low, 1.0)
        return (p - self.low) / span

    def hypervolume(self, points: Sequence[Sequence[float]], kl_shift: float = 0.0) -> float:
        from autocompress.search.hypervolume import hypervolume

        return hypervolume(self.scaled(points, kl_shift), np.ones(3), np.zeros(3))


# ---- one arm, in its own process ----------------------------------------------------------------------------


def _study(folder: Path):
    import optuna

    db = next((folder / "studies").glob("*/study.db"))
    return optuna.load_study(study_name=db.parent.name, storage=f"sqlite:///{db}")


def child(args: argparse.Namespace) -> int:
    """Run one arm × seed in ``args.folder`` (the parent set the cache and threads); write result.json."""
    import torch
    from optuna.trial import TrialState

    from autocompress.search.engine import search
    from autocompress.search.samplers import SEEDS_KEY

    torch.set_num_threads(1)
    folder = Path(args.folder)
    arm, seed = args.child, args.seed
    common = dict(model=args.model, hw=args.hw, space=SPACE, out=folder / "studies", seed=seed, full_eval=0, log=print)
    t0 = time.time()
    setup = 0.0
    if arm in SAMPLER_ARMS:  # the seeds first (their results are in the cache: free), then the search's own
        res = search(sampler=arm, trials=args.n_seeds + args.trials, timeout=args.minutes * 60, **common)
        setup = res.setup_s
    else:  # the seeds alone: learn how many from the study, then evaluate exactly those (resuming it)
        res = search(sampler="random", trials=1, **common)
        setup += res.setup_s
        n_seeds = len(_study(folder).user_attrs[SEEDS_KEY])
        res = search(sampler="random", trials=n_seeds, **common)
        setup += res.setup_s
        if arm == "knapsack":
            extra = _dense_plans(args, folder, seed)
            opt = _study(folder)
            done = len(opt.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
            for name, params in extra.items():  # numbered after every seed, so the seeds keep theirs
                opt.enqueue_trial(params, user_attrs={"seed": DENSE_PREFIX + name})
            res = search(sampler="random", trials=done + len(extra), **common)
            setup += res.setup_s
    opt = _study(folder)
    n_seeds = len(opt.user_attrs[SEEDS_KEY])
    rows, starts, ends = [], [], []
    for t in opt.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        name = t.user_attrs.get("baseline") or t.user_attrs.get("seed")
        kind = "seed" if t.number < n_seeds else ("dense" if str(name).startswith(DENSE_PREFIX) else "searched")
        rows.append(
            {
                "trial": t.number,
                "kind": kind,
                "name": name,
                "values": list(t.values),
                "plan_hash": t.user_attrs.get("plan_hash"),
            }
        )
        starts.append(t.datetime_start.timestamp())
        ends.append(t.datetime_complete.timestamp())
    if arm in SAMPLER_ARMS and n_seeds != args.n_seeds:
        print(f"warning: {n_seeds} seeds in this study, {args.n_seeds} in the seeds run")
    out = {
        "arm": arm,
        "seed": seed,
        "n_seeds": n_seeds,
        "trials": rows,
        "counts": res.counts,
        "setup_s": setup,
        "trial_s": (max(ends) - min(starts)) if rows else 0.0,  # first trial's start to last's end
        "busy_s": sum(e - b for b, e in zip(starts, ends, strict=True)),  # evaluated trials only
        "wall_s": time.time() - t0,
        "study_dir": str(res.study_dir),
    }
    (folder / "result.json").write_text(json.dumps(out, indent=1) + "\n")
    return 0


def _dense_plans(args: argparse.Namespace, folder: Path, seed: int) -> dict:
    """Give the dense knapsack plans' trial parameters (those not already a seed's), named."""
    from autocompress.hardware import CostModel, load_profile
    from autocompress.search.samplers import SEEDS_KEY
    from autocompress.search.seeding import Seed, build_knapsack
    from autocompress.search.table import sensitivity_table
    from autocompress.space import SearchSpace, SpaceContext
    from autocompress.workbench import Workbench

    profile = load_profile(args.hw)
    wb = Workbench.open(args.model, log=print)
    wb.numerics = profile.numerics
    a = wb.lm.anatomy
    space = SearchSpace.load(SPACE).for_profile(profile)
    ctx = SpaceContext(anatomy=a, drop_order=wb.stats.drop_order(), provenance=wb.provenance(seed=seed))
    table = sensitivity_table(wb, space, ctx, None, print)
    ks = None if table is None else build_knapsack(space, ctx, table, CostModel(profile, a))
    if ks is None:
        return {}
    seeds = [Seed.from_list(s).params for s in _study(folder).user_attrs[SEEDS_KEY]]
    out = {}
    for name, alloc in ks.spread().items():
        params = ks.params(alloc)
        if params not in seeds and params not in out.values():
            out[name] = params
    print(f"knapsack arm: {len(out)} dense plans beyond the seeds")
    return out


# ---- the parent: prebuild, arms two at a time, scoring, summary ------------------------------------------------


def prebuild(args: argparse.Namespace, work: Path) -> Path:
    """Build the set-up every arm starts with (a one-trial seeds run); give its cache folder."""
    cache = work / "prebuild" / "cache"
    if (work / "prebuild" / "result.json").is_file():
        return cache
    shutil.rmtree(work / "prebuild", ignore_errors=True)
    cache.mkdir(parents=True)
    from autocompress._io import cache_dir

    home = cache_dir() / "models"  # the converted base, if this machine has it: hard-linked, not redone
    if home.is_dir():
        shutil.copytree(home, cache / "models", copy_function=_link)
    print("prebuild: conversion, statistics, Hessians, sensitivity table (not charged to any arm)")
    t0 = time.time()
    one = argparse.Namespace(**{**vars(args), "trials": 1})  # one trial: everything before it is set-up
    if _run_child(one, "nsga2", 0, work / "prebuild", cache, log=work / "prebuild.log").wait() != 0:
        raise SystemExit(f"prebuild failed; see {work / 'prebuild.log'}")
    print(f"prebuild: {time.time() - t0:.0f} s")
    return cache


def _link(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _child_cmd(args: argparse.Namespace, arm: str, seed: int, folder: Path, n_seeds: int) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", arm, "--seed", str(seed), "--folder", str(folder)]
    cmd += ["--hw", args.hw, "--minutes", str(args.minutes), "--trials", str(args.trials), "--n-seeds", str(n_seeds)]
    return cmd + (["--model", args.model] if args.model else [])


def _run_child(
    args: argparse.Namespace, arm: str, seed: int, folder: Path, cache: Path, log: Path, n_seeds: int = 0
) -> subprocess.Popen:
    env = {**os.environ, **ONE_THREAD, "AUTOCOMPRESS_CACHE": str(cache)}
    env.pop("AUTOCOMPRESS_EVAL_CACHE", None)  # under the arm's own cache
    with open(log, "w") as fh:
        return subprocess.Popen(_child_cmd(args, arm, seed, folder, n_seeds), env=env, stdout=fh, stderr=fh)


def start_arm(args: argparse.Namespace, work: Path, setup_cache: Path, arm: str, seed: int, n_seeds: int):
    """Start one arm x seed in a clean folder whose cache holds the set-up (and, but for the seeds arm,
    the seeds arm's evaluations of the seed plans: the same seed results in every arm, at no cost)."""
    folder = work / f"{arm}-{seed}"
    shutil.rmtree(folder, ignore_errors=True)  # an unfinished earlier try starts again from clean
    cache = folder / "cache"
    cache.mkdir(parents=True)
    for name in COPIED:
        if (setup_cache / name).is_dir():
            shutil.copytree(setup_cache / name, cache / name, copy_function=_link if name == "models" else shutil.copy2)
    if arm != "seeds":
        shutil.copytree(work / f"seeds-{seed}" / "cache" / "evals", cache / "evals")
    return _run_child(args, arm, seed, folder, cache, log=work / f"{arm}-{seed}.log", n_seeds=n_seeds)


def run_arms(args: argparse.Namespace, work: Path, result: dict) -> None:
    setup_cache = prebuild(args, work)
    runs = result["runs"]
    todo = [(arm, s) for arm in args.arms for s in range(args.seeds) if f"{arm}/{s}" not in runs]  # seeds first
    running: dict[tuple[str, int], subprocess.Popen] = {}
    while todo or running:
        ready = [(arm, s) for arm, s in todo if arm == "seeds" or f"seeds/{s}" in runs]
        if not ready and not running:
            raise SystemExit("the seeds arm failed; the other arms need its evaluations (see its log)")
        while ready and len(running) < args.parallel:
            arm, s = ready.pop(0)
            todo.remove((arm, s))
            print(f"start {arm} seed {s}", flush=True)
            n = runs[f"seeds/{s}"]["n_seeds"] if arm != "seeds" else 0
            running[(arm, s)] = start_arm(args, work, setup_cache, arm, s, n)
        time.sleep(2)
        for key, proc in list(running.items()):
            if proc.poll() is None:
                continue
            del running[key]
            arm, s = key
            res_file = work / f"{arm}-{s}" / "result.json"
            if proc.returncode != 0 or not res_file.is_file():
                print(f"{arm} seed {s} FAILED (exit {proc.returncode}); see {work / f'{arm}-{s}.log'}", flush=True)
                continue
            res = json.loads(res_file.read_text())
            result["runs"][f"{arm}/{s}"] = res
            save(args.out, result)
            n = len(res["trials"])
            print(f"done {arm} seed {s}: {n} evaluated in {res['trial_s']:.0f} s (set-up {res['setup_s']:.0f} s)")


def save(path: Path, result: dict) -> None:
    from autocompress._io import atomic_write_text

    atomic_write_text(path, json.dumps(result, indent=1) + "\n")


def box_of(args: argparse.Namespace, result: dict) -> Box:
    """Give the fixed box, from the seeds (evaluated alike in every arm) and the space's costs."""
    seeds = [t["values"] for r in result["runs"].values() for t in r["trials"] if t["kind"] == "seed"]
    kls = [v[0] for v in seeds if v[0] > 0]
    c = result["costs"]
    return Box(min(kls) / KL_FLOOR_FACTOR, max(kls) * KL_REF_FACTOR, c["ideal"], c["base"])


def costs(args: argparse.Namespace, wb, space, ctx) -> dict:
    from autocompress.hardware import CostModel, load_profile
    from autocompress.search.hypervolume import cost_box

    box = cost_box(CostModel(load_profile(args.hw), wb.lm.anatomy), space, ctx)
    return {"base": box["base"], "ideal": box["ideal"][1:]}


def picks(result: dict, targets: Sequence[float]) -> dict[str, list[dict | None]]:
    """Give, per run and target, the least-KL evaluated plan at or below the target latency."""
    out = {}
    for key, r in result["runs"].items():
        row = []
        for target in targets:
            ok = [t for t in r["trials"] if t["values"][1] <= target]
            row.append(min(ok, key=lambda t: (t["values"][0], t["values"][1])) if ok else None)
        out[key] = row
    return out


def recipe_targets(result: dict) -> list[tuple[str, float]]:
    """Give (recipe, predicted latency) of the llama.cpp recipe seeds, fastest first: the latencies users
    already have a file for, all in the part of the front that costs quality."""
    seeds = result["runs"]["seeds/0"]["trials"]
    got = {t["name"][len(RECIPE_PREFIX) :]: t["values"][1] for t in seeds if t["name"].startswith(RECIPE_PREFIX)}
    return sorted(got.items(), key=lambda kv: kv[1])


def ppl_at(result: dict, targets: Sequence[float], arms: Sequence[str], n_seeds: int) -> dict[str, list[list]]:
    """Give arm -> per seed, the perplexity of its least-KL plan at or below each target (None: none there)."""
    ppl = result.get("ppl_by_plan", {})
    chosen = picks(result, targets) if targets else {}
    return {
        a: [
            [ppl.get(t["plan_hash"]) if t else None for t in chosen[f"{a}/{s}"]]
            for s in range(n_seeds)
            if f"{a}/{s}" in chosen
        ]
        for a in arms
    }


def loss_ratios(at: dict[str, list[list]], base: float | None, n: int) -> list[float | None]:
    """Give per target evo's perplexity loss over the base (mean over seeds) / the best seed plan's
    (None where either is missing or the best seed plan loses less than ``NO_LOSS`` of the base
    perplexity: a ratio of two such differences is noise, and no plan can do much better there)."""
    if not base or not at.get("evo") or not at.get("seeds"):
        return [None] * n
    ratios = []
    for i in range(n):
        evo = [row[i] for row in at["evo"] if row[i] is not None]
        seed = [row[i] for row in at["seeds"] if row[i] is not None]
        if evo and seed and min(seed) > base * (1 + NO_LOSS):
            ratios.append((statistics.mean(evo) - base) / (min(seed) - base))
        else:
            ratios.append(None)
    return ratios


def spread_on_front(trials: list[dict], n: int) -> list[dict]:
    """Give up to ``n`` front trials spread evenly by latency (the fastest and the slowest among them)."""
    front_pts = set(front_of([t["values"] for t in trials]))
    front = sorted(
        {tuple(t["values"]): t for t in trials if tuple(map(float, t["values"])) in front_pts}.values(),
        key=lambda t: t["values"][1],
    )
    if not front or n <= 0:
        return []
    idx = sorted({round(i * (len(front) - 1) / max(n - 1, 1)) for i in range(n)})
    return [front[i] for i in idx]


def score(args: argparse.Namespace, work: Path, result: dict) -> None:
    """Perplexity of each run's plans at the latency targets, base perplexity, KL noise floor (resumable)."""
    os.environ["AUTOCOMPRESS_CACHE"] = str(work / "prebuild" / "cache")
    import dataclasses

    import torch

    from autocompress.calib import load_token_data
    from autocompress.evaluate.metrics import kl_to_base, output_logprobs, perplexity
    from autocompress.hardware import load_profile
    from autocompress.plan import Plan
    from autocompress.space import SearchSpace, SpaceContext
    from autocompress.workbench import Workbench

    torch.set_num_threads(args.parallel)
    profile = load_profile(args.hw)
    wb = Workbench.open(args.model, log=print)
    wb.numerics = profile.numerics
    space = SearchSpace.load(SPACE).for_profile(profile)
    ctx = SpaceContext(anatomy=wb.lm.anatomy, drop_order=wb.stats.drop_order(), provenance=wb.provenance())
    result["costs"] = costs(args, wb, space, ctx)
    seed_lat = [t["values"][1] for r in result["runs"].values() for t in r["trials"] if t["kind"] == "seed"]
    lo, hi = min(seed_lat), result["costs"]["base"][0]
    result["latency_targets_ms"] = [lo + f * (hi - lo) for f in TARGET_FRACTIONS]
    result["recipe_targets_ms"] = recipe_targets(result)
    cfg = wb.data_config
    big = load_token_data(wb.lm.tokenizer, dataclasses.replace(cfg, eval_tokens=args.ppl_tokens))
    if not torch.equal(big.proxy, wb.data.proxy):
        raise SystemExit("the held-out proxy rows differ from the search's")
    ppl = result.setdefault("ppl_by_plan", {})
    result["ppl_tokens"] = int(big.eval.numel())

    def model_of(key: str, trial: int):
        plan = Plan.load(Path(result["runs"][key]["study_dir"]) / "plans" / f"{trial}.yaml")
        return plan, wb.apply(plan)

    if "base_ppl" not in result:
        result["base_ppl"] = perplexity(wb.lm.model, big.eval, big.eval_chars).ppl
        save(args.out, result)
    chosen = picks(result, result["latency_targets_ms"])
    at_recipes = picks(result, [lat for _, lat in result["recipe_targets_ms"]])
    for key in chosen:
        for t in [*chosen[key], *at_recipes[key]]:
            if t is None or t["plan_hash"] in ppl:
                continue
            t0 = time.time()
            plan, model = model_of(key, t["trial"])
            with wb.evaluating(plan, model) as m:
                ppl[t["plan_hash"]] = perplexity(m, big.eval, big.eval_chars).ppl
            print(f"perplexity {key} trial {t['trial']}: {ppl[t['plan_hash']]:.3f} ({time.time() - t0:.0f} s)")
            save(args.out, result)
    front_ppl = result.setdefault("front_ppl", {})  # run -> [latency_ms, KL, perplexity] along its front
    for key, r in result["runs"].items():
        for t in spread_on_front(r["trials"], args.ppl_front):
            if t["plan_hash"] not in ppl:
                plan, model = model_of(key, t["trial"])
                with wb.evaluating(plan, model) as m:
                    ppl[t["plan_hash"]] = perplexity(m, big.eval, big.eval_chars).ppl
            row = [t["values"][1], t["values"][0], ppl[t["plan_hash"]]]
            if row not in front_ppl.setdefault(key, []):
                front_ppl[key].append(row)
            save(args.out, result)
    if "kl_noise_floor" not in result:  # the seeds run's target plans, KL on disjoint held-out subsets
        rows = wb.data.proxy.shape[0]
        subsets = [big.eval[i * rows : (i + 1) * rows] for i in range(min(NOISE_SUBSETS, big.eval.shape[0] // rows))]
        bases = [output_logprobs(wb.lm.model, s) for s in subsets]
        per_plan = {}
        for t in chosen.get("seeds/0", []):
            if t is None or t["plan_hash"] in per_plan or t["values"][0] <= 0:
                continue
            plan, model = model_of("seeds/0", t["trial"])
            with wb.evaluating(plan, model) as m:
                per_plan[t["plan_hash"]] = [kl_to_base(m, s, b).kl for s, b in zip(subsets, bases, strict=True)]
        rel = [statistics.stdev(v) / statistics.mean(v) for v in per_plan.values() if len(v) > 1]
        logs = [statistics.stdev([math.log10(x) for x in v]) for v in per_plan.values() if len(v) > 1 and min(v) > 0]
        result["kl_noise_floor"] = {
            "subsets": len(subsets),
            "tokens_per_subset": int(rows * big.eval.shape[1]),
            "kl_per_subset": per_plan,
            "relative_std_median": statistics.median(rel) if rel else None,
            "log10_std_median": statistics.median(logs) if logs else None,
        }
        save(args.out, result)


def summarise(args: argparse.Namespace, result: dict) -> dict:
    """Compute the indicators and goals from the stored runs (and perplexities); give the result."""
    box = box_of(args, result)
    arms = [a for a in ARMS if any(k.split("/")[0] == a for k in result["runs"])]
    n_seeds = max(int(k.split("/")[1]) for k in result["runs"]) + 1
    pts = {k: [t["values"] for t in r["trials"]] for k, r in result["runs"].items()}
    union = front_of([box.scaled([p])[0] for v in pts.values() for p in v])
    noise = (result.get("kl_noise_floor") or {}).get("log10_std_median") or 0.0
    hv, igd, new, new_noise, evals, trial_s = ({a: [] for a in arms} for _ in range(6))
    for a in arms:
        for s in range(n_seeds):
            r = result["runs"].get(f"{a}/{s}")
            if r is None:
                continue
            p = pts[f"{a}/{s}"]
            hv[a].append(box.hypervolume(p))
            igd[a].append(igd_plus(front_of(box.scaled(p)), union))
            seed_pts = [t["values"] for t in r["trials"] if t["kind"] == "seed"]
            front = [f for f in front_of(p) if not any(weakly_dominates(q, f) for q in seed_pts)]
            new[a].append(len(front))
            shifted = box.scaled(seed_pts, -noise)  # a point beats the seeds beyond noise
            new_noise[a].append(sum(not any(weakly_dominates(q, x) for q in shifted) for x in box.scaled(front)))
            evals[a].append(len(p))
            trial_s[a].append(r["trial_s"])
    seeds_hv = hv.get("seeds", [])
    gain = {}
    for a in arms:
        diffs = [h - seeds_hv[i] for i, h in enumerate(hv[a]) if i < len(seeds_hv)]
        gain[a] = statistics.mean(diffs) if diffs else None
    band = None
    if seeds_hv and noise:
        seed_run = [t["values"] for t in result["runs"]["seeds/0"]["trials"]]
        band = box.hypervolume(seed_run) - box.hypervolume(seed_run, noise)
    targets = result.get("latency_targets_ms", [])
    at_targets = ppl_at(result, targets, arms, n_seeds)
    recipe_lat = [lat for _, lat in result.get("recipe_targets_ms", [])]
    at_recipes = ppl_at(result, recipe_lat, arms, n_seeds)
    goals = {}
    if gain.get("evo") is not None and gain.get("nsga2"):
        goals["evo_hv_gain_over_nsga2_gain"] = gain["evo"] / gain["nsga2"]
    goals["evo_hv_gain_over_nsga2_gain_wanted"] = 2.0
    base = result.get("base_ppl")
    goals["evo_ppl_loss_over_best_seed"] = loss_ratios(at_targets, base, len(targets))
    goals["evo_ppl_loss_over_best_seed_at_recipes"] = loss_ratios(at_recipes, base, len(recipe_lat))
    goals["evo_ppl_loss_over_best_seed_wanted"] = 0.7
    result.update(
        {
            "box": {
                "objectives": ["log10_kl", "latency_ms", "memory_mb"],
                "ideal": box.low.tolist(),
                "reference": box.high.tolist(),
                "kl_floor": 10 ** box.low[0],
                "kl_reference": 10 ** box.high[0],
            },
            "hv": hv,
            "hv_gain_over_seeds": gain,
            "hv_tie_band": band,
            "igd_plus": igd,
            "new_front_points": new,
            "new_front_points_beyond_noise": new_noise,
            "ppl_at_targets": at_targets,
            "ppl_at_recipe_targets": at_recipes,
            "trials_evaluated": evals,
            "trial_seconds": trial_s,
            "goals": goals,
        }
    )
    return result


def table(result: dict) -> str:
    def f(xs: list, fmt: str = "{:.4f}") -> str:
        return ", ".join("-" if x is None else fmt.format(x) for x in xs)

    targets = result.get("latency_targets_ms", [])
    recipes = result.get("recipe_targets_ms", [])
    lines = [
        f"| arm | HV per seed | HV gain over seeds | IGD+ | new front points (beyond noise) | trials | "
        f"ppl at {', '.join(f'{t:.2f}' for t in targets)} ms | "
        f"ppl at the recipes' {', '.join(f'{n} {t:.2f}' for n, t in recipes)} ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for a in result["hv"]:
        g = result["hv_gain_over_seeds"].get(a)
        ppl = "; ".join(f(row, "{:.3f}") for row in result["ppl_at_targets"].get(a, []))
        at_recipes = "; ".join(f(row, "{:.3f}") for row in result.get("ppl_at_recipe_targets", {}).get(a, []))
        lines.append(
            f"| {a} | {f(result['hv'][a])} | {'-' if g is None else f'{g:+.4f}'} | {f(result['igd_plus'][a])} | "
            f"{f(result['new_front_points'][a], '{:d}')} ({f(result['new_front_points_beyond_noise'][a], '{:d}')}) | "
            f"{f(result['trials_evaluated'][a], '{:d}')} | {ppl} | {at_recipes} |"
        )
    nf = result.get("kl_noise_floor") or {}
    band = result.get("hv_tie_band")
    lines.append("")
    lines.append(
        f"base perplexity {result.get('base_ppl', math.nan):.3f} on {result.get('ppl_tokens')} held-out tokens; "
        f"KL noise floor: relative std {_num(nf.get('relative_std_median'))} over {nf.get('subsets')} subsets of "
        f"{nf.get('tokens_per_subset')} tokens; HV differences under {band if band is None else f'{band:.4f}'} are ties"
    )
    g = result["goals"]
    ratios = g.get("evo_ppl_loss_over_best_seed") or []
    at_recipes = g.get("evo_ppl_loss_over_best_seed_at_recipes") or []
    lines.append(
        f"goals: evo HV gain / nsga2 HV gain = {_num(g.get('evo_hv_gain_over_nsga2_gain'))} (want >= 2); "
        f"evo ppl loss / best seed's at the targets = {', '.join(map(_num, ratios)) or '-'}, at the recipes' "
        f"latencies = {', '.join(map(_num, at_recipes)) or '-'} (want <= 0.7; '-': the best seed plan there "
        f"loses under {NO_LOSS:.1%} of the base perplexity, so no ratio is formed)"
    )
    return "\n".join(lines)


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model [default: SmolLM2-135M]")
    ap.add_argument("--hw", default="jetson")
    ap.add_argument("--minutes", type=float, default=20.0, help="trial time per arm and seed")
    ap.add_argument("--trials", type=int, default=150, help="evaluated trials per arm and seed beyond the seeds")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    ap.add_argument("--parallel", type=int, default=2, help="arms at a time (one thread each)")
    ap.add_argument("--ppl-tokens", type=int, default=32768, help="held-out tokens for the perplexity re-score")
    ap.add_argument(
        "--ppl-front", type=int, default=0, help="also re-score this many points spread along each run's front"
    )
    ap.add_argument(
        "--work", type=Path, default=None, help="arm folders [default: ~/.cache/autocompress-bench/<--out path>]"
    )
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--summarise", action="store_true", help="recompute the indicators from --out only")
    ap.add_argument("--child", choices=ARMS, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--n-seeds", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [a for a in args.arms if a not in ARMS]
    if bad or "seeds" not in args.arms:
        ap.error(f"--arms: choose from {', '.join(ARMS)}, seeds included (the reference); got {bad or args.arms}")
    key = str(args.out.resolve()).strip("/").replace("/", "_")
    work = args.work or Path.home() / ".cache" / "autocompress-bench" / key  # arm folders, per output file
    work.mkdir(parents=True, exist_ok=True)
    result = json.loads(args.out.read_text()) if args.out.is_file() else {}
    settings = {
        "model": args.model or "default",
        "profile": args.hw,
        "space": SPACE,
        "minutes_per_arm": args.minutes,
        "trials_per_arm": args.trials,
        "threads_per_arm": 1,
        "arms_at_a_time": args.parallel,
        "copied_into_each_arm_cache": [*COPIED, "evals of the seed plans, from the seeds arm of the same seed"],
        "time_budget": "per sampler arm: --minutes from its first trial (the seeds, read from the cache, take ~0 s)",
    }
    if result.get("settings") != settings:
        result = {"settings": settings, "runs": {}}  # other settings: start over
    t0 = time.time()
    if not args.summarise:
        run_arms(args, work, result)
        score(args, work, result)
    result = summarise(args, result)
    result["wall_seconds_this_call"] = time.time() - t0
    save(args.out, result)
    print(table(result))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
