"""The search against simpler searches and a peer tool, at equal wall-clock time per arm.

    flock /tmp/autocompress-cpu.lock python bench/search.py            # ~25 min on 2 cores
    python bench/search.py --seconds 20 --seeds 1 --no-inc --out /tmp/s.json   # smoke test

Same model (default SmolLM2-135M), profile (jetson), space (default), data, budgets (none) and
evaluation engine for every arm; only the proposal strategy differs:

- ``ours``: NSGA-II whose generation 0 is the seeds (uniform baselines, mixed-precision seeds and the
  knapsack allocation), as ``autocompress search`` runs it;
- ``random``: Optuna's RandomSampler on the same space, no seeds;
- ``nsga2-noseed``: NSGA-II with the same population size but a random generation 0;
- ``baselines``: the space's uniform baselines alone (deterministic: one set, shown for each seed);
- ``inc``: Intel Neural Compressor 3.10 ``autotune`` over RTN weight-only configs (bits 4/8, group
  32/128, sym/asym), in its own venv ``bench/.venv-inc`` (see ``bench/inc_autotune.py``).

Each search arm gets ``--seconds`` of wall-clock time (trial loop, seeding included; the shared
model, calibration statistics and sensitivity table are loaded once before). The evaluation cache
is off, so no arm reuses another's evaluations. Hypervolume: one box for all arms, per objective
from the ideal point (KL 0; the space's lowest latency and memory) to the reference point (the
worst uniform baseline's KL; the base model's latency and memory), as ``autocompress search``
tracks it (``autocompress.search.hypervolume``). A baseline is "matched" when our front holds a
plan at least as good on every objective; since our search starts from the baselines, the JSON
also gives the stricter fraction dominated by a plan the search found. Writes
``bench/results/search.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ["AUTOCOMPRESS_EVAL_CACHE"] = "off"  # every arm pays for its own evaluations

import optuna
from optuna.trial import TrialState

from autocompress._io import atomic_write_text
from autocompress.calib import DataConfig
from autocompress.errors import PlanError
from autocompress.evaluate import Evaluator
from autocompress.hardware import CostModel, load_profile
from autocompress.plan import LayerChoice, ModelRef, Plan
from autocompress.search.budget import Budget
from autocompress.search.engine import TrialRunner, _sensitivity
from autocompress.search.hypervolume import cost_box, hypervolume
from autocompress.search.seeding import knapsack_seed_params
from autocompress.space import SearchSpace, SpaceContext
from autocompress.workbench import Workbench

HERE = Path(__file__).parent
OUT = HERE / "results" / "search.json"
INC_PYTHON = HERE / ".venv-inc" / "bin" / "python"
ARMS = ("ours", "random", "nsga2-noseed")
EPS = 1e-12

optuna.logging.set_verbosity(optuna.logging.WARNING)


def weakly_dominates(p, q) -> bool:
    return all(a <= b + EPS for a, b in zip(p, q, strict=True))


def dominates(p, q) -> bool:
    return weakly_dominates(p, q) and any(a < b - EPS for a, b in zip(p, q, strict=True))


class Bench:
    def __init__(self, model: str | None, hw: str) -> None:
        self.wb = Workbench.open(model, DataConfig(), log=print)
        a = self.wb.lm.anatomy
        self.profile = load_profile(hw)
        self.space = SearchSpace.load("default").for_runtime(self.profile.runtime)
        self.cost_model = CostModel(self.profile, a)
        self.ctx = SpaceContext(a, self.wb.stats.drop_order(), self.wb.provenance(seed=0, profile=self.profile.id))
        self.table = _sensitivity(self.wb, self.space, self.ctx, None, print)
        self.evaluator = Evaluator(self.wb.lm.model, self.wb.data, a.task)
        self.box = cost_box(self.cost_model, self.space, self.ctx)  # base cost and the space's ideal point

    def point(self, plan: Plan, kl: float) -> tuple[float, float, float]:
        c = self.cost_model.predict(plan)
        return (kl, c.latency_ms, c.memory_mb)

    def baselines(self) -> dict[str, tuple[float, float, float]]:
        out = {}
        for name, params in self.space.baseline_params(self.wb.lm.anatomy).items():
            plan = self.space.plan_from_params(params, self.ctx)
            out[name] = self.point(plan, self.evaluator.proxy(self.wb.apply(plan)).kl)
            print(f"  baseline {name:18s} KL {out[name][0]:.4f}  {out[name][1]:.3f} ms  {out[name][2]:.1f} MB")
        return out

    def arm(self, arm: str, seed: int, seconds: float, folder: Path) -> list[dict]:
        """Run one search arm for ``seconds``; give its evaluated trials (values, baseline/seed tags)."""
        start = time.time()
        a = self.wb.lm.anatomy
        baselines = self.space.baseline_params(a)
        order = sorted(range(a.num_blocks), key=lambda i: -self.wb.stats.block_distance[i])
        seeds = self.space.mixed_seed_params(a, order)
        seeds.update(knapsack_seed_params(self.space, self.ctx, self.table, self.cost_model))
        population = max(8, len(baselines) + len(seeds))
        sampler = (
            optuna.samplers.RandomSampler(seed=seed)
            if arm == "random"
            else optuna.samplers.NSGAIISampler(seed=seed, population_size=population)
        )
        opt = optuna.create_study(directions=["minimize"] * 3, sampler=sampler)
        if arm == "ours":
            for name, params in baselines.items():
                opt.enqueue_trial(params, user_attrs={"baseline": name})
            for name, params in seeds.items():
                opt.enqueue_trial(params, user_attrs={"seed": name})
        ctx = SpaceContext(a, self.ctx.drop_order, self.wb.provenance(seed=seed, profile=self.profile.id))
        runner = TrialRunner(
            opt, self.space, ctx, self.wb, self.evaluator, self.cost_model, Budget(), folder, self.table
        )
        runner.run(10**6, start + seconds)
        done = opt.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        return [{"values": list(t.values), "baseline": t.user_attrs.get("baseline")} for t in done]

    def inc(self, folder: Path) -> dict:
        """Run INC's autotune in its own venv; place its pick on our objectives."""
        if not INC_PYTHON.is_file():
            return {"error": f"{INC_PYTHON} not found (see bench/inc_autotune.py for its install)"}
        from safetensors.torch import save_file

        tokens = folder / "proxy.safetensors"
        save_file({"proxy": self.wb.data.proxy.contiguous()}, str(tokens))
        out = folder / "inc.json"
        cmd = [str(INC_PYTHON), str(HERE / "inc_autotune.py"), self.wb.lm.source, str(tokens), str(out)]
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()
            return {"error": f"inc_autotune.py exited {proc.returncode}: {tail[-1][:300] if tail else ''}"}
        res = json.loads(out.read_text())
        res["wall_seconds"] = time.time() - t0
        p = res["picked"]
        setting = {"bits": p["bits"], "group_size": p["group_size"], "symmetric": p["symmetric"], "quant_method": "rtn"}
        try:
            choice = LayerChoice.from_dict(setting, "INC pick")
        except PlanError:  # 8-bit is per output row here: costed without groups
            choice = LayerChoice.from_dict({k: v for k, v in setting.items() if k != "group_size"}, "INC pick")
        a = self.wb.lm.anatomy
        plan = Plan(model=ModelRef.of(a), layers={s.name: choice for s in a.linears})
        res["point"] = self.point(plan, res["kl"])
        res["our_rtn_kl"] = self.evaluator.proxy(self.wb.apply(plan)).kl  # same format, our quantizer
        return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=120.0, help="wall-clock seconds per search arm and seed")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--model", default=None, help="model [default: SmolLM2-135M]")
    ap.add_argument("--hw", default="jetson")
    ap.add_argument("--no-inc", action="store_true", help="skip the Intel Neural Compressor arm")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    t0 = time.time()
    b = Bench(args.model, args.hw)
    print("uniform baselines:")
    base_pts = b.baselines()
    named = {k: v for k, v in base_pts.items() if k != "uncompressed"}
    ref = (max(v[0] for v in base_pts.values()), *b.box["base"])
    ideal = b.box["ideal"]
    print(
        f"hypervolume box ({b.profile.id}): KL 0-{ref[0]:.4f}, {ideal[1]:.3f}-{ref[1]:.3f} ms/token, "
        f"{ideal[2]:.1f}-{ref[2]:.1f} MB"
    )
    seeds = list(range(args.seeds))
    hv: dict[str, list[float]] = {arm: [] for arm in (*ARMS, "baselines")}
    n_eval: dict[str, list[int]] = {arm: [] for arm in ARMS}
    fronts: dict[str, list[list[tuple]]] = {arm: [] for arm in ARMS}
    matched, strictly = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for arm in ARMS:
                trials = b.arm(arm, seed, args.seconds, Path(tmp) / f"{arm}-{seed}")
                pts = [tuple(t["values"]) for t in trials]
                hv[arm].append(hypervolume(pts, ref, ideal))
                n_eval[arm].append(len(pts))
                fronts[arm].append(pts)
                print(f"seed {seed} {arm:13s} {len(pts):4d} evaluated  HV {hv[arm][-1]:.4f}")
                if arm == "ours":
                    found = [tuple(t["values"]) for t in trials if not t["baseline"]]
                    for v in named.values():
                        matched.append(any(weakly_dominates(p, v) for p in pts))
                        strictly.append(any(dominates(p, v) for p in found))
            hv["baselines"].append(hypervolume(base_pts.values(), ref, ideal))
        inc = {"error": "skipped (--no-inc)"}
        if not args.no_inc:
            try:
                inc = b.inc(Path(tmp))
            except Exception as exc:  # the peer tool's failure is a result, not a crash of the benchmark
                inc = {"error": f"{exc.__class__.__name__}: {str(exc)[:300]}"}
    mean = {arm: sum(v) / len(v) for arm, v in hv.items()}
    ratio = mean["ours"] / mean["random"] if mean["random"] > 0 else None  # None: random found nothing in the box
    if "point" in inc:
        per_seed = [any(dominates(p, inc["point"]) for p in f) for f in fronts["ours"]]
        inc_dominated: bool | None = all(per_seed)
        inc_reason = f"dominated by our front in {sum(per_seed)}/{len(per_seed)} seeds"
    else:
        inc_dominated, inc_reason, per_seed = None, inc["error"], []
    result = {
        "model": b.wb.lm.anatomy.name,
        "profile": b.profile.id,
        "space": b.space.name,
        "wall_seconds_per_arm": args.seconds,
        "seeds": seeds,
        "reference_point": {"kl": ref[0], "latency_ms": ref[1], "memory_mb": ref[2]},
        "ideal_point": {"kl": ideal[0], "latency_ms": ideal[1], "memory_mb": ideal[2]},
        "hv": hv,
        "hv_mean": mean,
        "evaluated_trials": n_eval,
        "hv_ratio_vs_random": ratio,
        "baselines_dominated_or_matched": sum(matched) / len(matched),
        "baselines_strictly_dominated_by_found_plans": sum(strictly) / len(strictly),
        "baselines": {k: {"kl": v[0], "latency_ms": v[1], "memory_mb": v[2]} for k, v in base_pts.items()},
        "inc_pick_dominated": inc_dominated,
        "inc_reason": inc_reason,
        "inc": inc,
        "total_seconds": time.time() - t0,
    }
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    print()
    print(f"| arm | HV per seed | mean HV | evaluated trials (mean) |  ({args.seconds:g} s per arm)")
    print("|---|---|---|---|")
    for arm in (*ARMS, "baselines"):
        evals = f"{sum(n_eval[arm]) / len(n_eval[arm]):.0f}" if arm in n_eval else str(len(base_pts))
        print(f"| {arm} | {', '.join(f'{x:.4f}' for x in hv[arm])} | {mean[arm]:.4f} | {evals} |")
    if ratio is None:
        print("HV ours / random: unbounded: random found no plan inside the box (target >= 1.3)")
    else:
        print(f"HV ours / random: {ratio:.2f}x (target >= 1.3)")
    print(
        f"uniform baselines dominated or matched by our front: {result['baselines_dominated_or_matched']:.0%}; "
        f"strictly dominated by a plan the search found: {result['baselines_strictly_dominated_by_found_plans']:.0%}"
    )
    if "point" in inc:
        p = inc["picked"]
        print(
            f"INC autotune pick: {p['bits']}-bit g{p['group_size']} {'sym' if p['symmetric'] else 'asym'} RTN, "
            f"KL {inc['kl']:.4f} (our RTN of that format: {inc['our_rtn_kl']:.4f}), {inc['point'][1]:.3f} ms, "
            f"{inc['point'][2]:.1f} MB, {inc['seconds']:.0f} s tuning; {inc_reason}"
        )
    else:
        print(f"INC: {inc_reason}")
    print(f"wrote {args.out} ({result['total_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
