"""``--sampler evo`` against NSGA-II (the default) at equal wall-clock time, same seeds.

    flock ~/.cache/ac-cpu.lock .venv/bin/python bench/evo.py                 # ~15 min warm, 2 cores
    .venv/bin/python bench/evo.py --seconds 60 --seeds 0 --out /tmp/evo.json  # smoke test

Each arm is ``autocompress search --hw jetson`` on the default model and space in a fresh process
with the same seed plans (baselines, mixed-precision and knapsack seeds, served first by both);
only the proposals after the seeds differ. A warm-up run evaluates the seeds once into the
evaluation cache, so neither arm spends its time on them (the arms run one after the other,
nsga2 first, on the same cache: evo could reuse a plan nsga2 evaluated, which their different
proposals make rare); the time budget counts from the first trial, so both get the same trial time.
Caveat: the default model is a dequantized Q4_1 GGUF, so Q4_1 (and Q5_1) reproduce it exactly
and the seeds already hold near-free plans down to ~85 % of the latency saving. Per arm: hypervolume of all evaluated plans and of the seeds alone (one box per study as
``autocompress search`` tracks it: KL from 0 to the worst baseline's, latency and memory from the
space's lowest to the base model's), the gain over the seeds, and the front points that no seed
plan dominates. Results are saved after every arm (a rerun resumes) to ``bench/results/evo.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from autocompress._io import atomic_write_text
from autocompress.search.hypervolume import box_of, feasible, reference_of, study_hypervolume
from autocompress.search.pareto import dominates, pareto_front

HERE = Path(__file__).parent
OUT = HERE / "results" / "evo.json"
ARMS = ("nsga2", "evo")
WARMUP_TRIALS = 36  # the default space's seeds on the Jetson (14 baselines, 20 mixed, 2 knapsack)


def _search(arm: str, seed: int, seconds: float, trials: int, work: Path, study: str) -> tuple[str, float]:
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "autocompress.cli", "search", "--hw", "jetson", "--sampler", arm]
    cmd += ["--trials", str(trials), "--timeout", str(seconds), "--study", study, "--out", str(work)]
    cmd += ["--full-eval", "0", "--seed", str(seed)]
    t0 = time.time()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{study} failed:\n{done.stderr[-3000:]}")
    return done.stdout + done.stderr, time.time() - t0


def warm_up(seed: int, work: Path) -> None:
    """Evaluate the seed plans once into the bench's evaluation cache (random proposals after them
    are never what nsga2 or evo propose)."""
    if not (work / f"warmup-s{seed}" / "pareto.json").is_file():
        print(f"warm-up: evaluating the seeds (seed {seed})", flush=True)
        _search("random", seed, 1e6, WARMUP_TRIALS, work, f"warmup-s{seed}")


def run_arm(arm: str, seed: int, seconds: float, trials: int, work: Path) -> dict:
    """Run one arm in a fresh process and give its figures."""
    study = f"{arm}-s{seed}"
    out, wall = _search(arm, seed, seconds, trials, work, study)
    opt = optuna.load_study(study_name=study, storage=f"sqlite:///{work / study / 'study.db'}")
    trials_ = opt.get_trials(deepcopy=False)
    box = box_of(opt)
    ref = reference_of(trials_, box["base"])
    seeded = [t for t in trials_ if {"baseline", "seed"} & set(t.user_attrs)]
    own = [t for t in trials_ if t not in seeded]
    hv_all = study_hypervolume(trials_, ref, box["ideal"])
    hv_seeds = study_hypervolume(seeded, ref, box["ideal"])
    seed_pts = [t.values for t in seeded if feasible(t)]
    own_pts = [t.values for t in own if feasible(t)]
    pts = seed_pts + own_pts
    front = [pts[i] for i in pareto_front(pts)]
    new = [p for p in front if p in own_pts and not any(dominates(s, p) for s in seed_pts)]
    setup = next((ln for ln in out.splitlines() if "set-up:" in ln), "")
    return {
        "arm": arm,
        "seed": seed,
        "wall_s": round(wall, 1),
        "setup_line": setup.strip(),
        "seed_trials": sum(t.state == TrialState.COMPLETE for t in seeded),
        "own_trials": sum(t.state == TrialState.COMPLETE for t in own),
        "own_stopped": sum(t.state == TrialState.PRUNED for t in own),
        "hv": hv_all,
        "hv_seeds": hv_seeds,
        "hv_gain_over_seeds": hv_all - hv_seeds,
        "front_points": len(front),
        "new_front_points": len(new),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=240.0, help="trial time per arm (set-up not counted)")
    ap.add_argument("--trials", type=int, default=400, help="upper bound on evaluated trials per arm")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-evo"))
    args = ap.parse_args()
    results = json.loads(args.out.read_text()) if args.out.is_file() else {"runs": []}
    settings = {"seconds": args.seconds, "trials": args.trials}
    if results.get("settings", settings) != settings:
        results = {"runs": []}  # other settings: start over
    results["settings"] = settings
    for seed in args.seeds:
        warm_up(seed, args.work)
        for arm in ARMS:
            if any(r["arm"] == arm and r["seed"] == seed for r in results["runs"]):
                continue
            study_dir = args.work / f"{arm}-s{seed}"
            if study_dir.exists():
                import shutil

                shutil.rmtree(study_dir)  # a half-run arm starts again
            print(f"running {arm} seed {seed} ({args.seconds:.0f} s of trials)", flush=True)
            results["runs"].append(run_arm(arm, seed, args.seconds, args.trials, args.work))
            args.out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(args.out, json.dumps(results, indent=1) + "\n")
    runs = results["runs"]
    print(f"{'arm':6} {'seed':>4} {'own':>5} {'stop':>5} {'hv':>8} {'hv seeds':>9} {'gain':>8} {'front':>6} {'new':>4}")
    for r in runs:
        print(
            f"{r['arm']:6} {r['seed']:>4} {r['own_trials']:>5} {r['own_stopped']:>5} {r['hv']:8.4f} "
            f"{r['hv_seeds']:9.4f} {r['hv_gain_over_seeds']:8.4f} {r['front_points']:>6} {r['new_front_points']:>4}"
        )
    gains = {a: [r["hv_gain_over_seeds"] for r in runs if r["arm"] == a] for a in ARMS}
    ratio = {a: sum(g) / len(g) for a, g in gains.items() if g}
    if ratio.get("nsga2", 0) > 0 and "evo" in ratio:
        print(f"mean hypervolume gain over the seeds: evo / nsga2 = {ratio['evo'] / ratio['nsga2']:.2f}")


if __name__ == "__main__":
    main()
