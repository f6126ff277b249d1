"""Quantizer speed of the format registry against an earlier commit's, on the default model's tensors.

    flock ~/.cache/ac-cpu.lock python -P bench/formats_speed.py [--baseline fc51542] [--block 0]

Both versions quantize the seven linears of one block of the default model (576x576, 192x576 twice,
576x576, 1536x576 twice, 576x1536) in every GGUF block format, without and with an importance
vector (a fixed imatrix-like Σx² per input: the scale searches' cost does not depend on its values),
each in its own process on one thread. The baseline's ``autocompress`` is the one of ``--baseline``
(``git archive``); the current one is the working tree. The packed bytes of the two must be equal
(the speed-up must not change a byte); the table gives seconds per block and the ratio.

Results: bench/results/formats_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "formats_speed.json"
NAMES = ("Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0", "IQ4_NL", "Q3_K", "Q2_K")


def worker(block: int, out: str) -> None:
    """Quantize the block's linears in every format (this process's ``autocompress``); save seconds and bytes."""
    import hashlib

    import torch
    from safetensors import safe_open

    from autocompress import formats
    from autocompress.model.loading import default_model_dir

    torch.set_num_threads(1)
    with safe_open(str(default_model_dir() / "model.safetensors"), "pt") as f:
        stored = list(f.keys())
        names = sorted(k for k in stored if f".layers.{block}." in k and k.endswith("proj.weight"))
        weights = {k: f.get_tensor(k).float() for k in names}
    g = torch.Generator().manual_seed(1)
    result = {}
    for name in NAMES:
        fmt = formats.get(name)
        for method in ("rtn", "imatrix"):
            seconds, digest = 0.0, hashlib.sha256()
            for w in weights.values():
                if fmt.check(tuple(w.shape)):
                    continue
                imp = torch.rand(w.shape[1], generator=g) ** 8 * 100 + 0.01 if method == "imatrix" else None
                t0 = time.perf_counter()
                q = fmt.quantize(w, imp)
                seconds += time.perf_counter() - t0
                digest.update(fmt.pack(q).tobytes())
            result[f"{name}/{method}"] = {"seconds": seconds, "sha256": digest.hexdigest()}
            print(f"  {name:7s} {method:8s} {seconds:6.2f} s", file=sys.stderr, flush=True)
    Path(out).write_text(json.dumps(result))


def run_side(pythonpath: Path, cwd: Path, block: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
        out = tmp.name
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    subprocess.run(
        [sys.executable, "-P", __file__, "--worker", out, "--block", str(block)], env=env, cwd=cwd, check=True
    )
    data = json.loads(Path(out).read_text())
    os.unlink(out)
    return data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", default="fc51542", help="commit whose autocompress/formats is the baseline")
    ap.add_argument("--block", type=int, default=0)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.block, args.worker)
        return
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "base.tar"
        subprocess.run(["git", "archive", "-o", str(archive), args.baseline, "autocompress"], cwd=ROOT, check=True)
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        print(f"baseline {args.baseline}:", flush=True)
        base = run_side(Path(tmp), Path(tmp), args.block)
    print("current tree:", flush=True)
    cur = run_side(ROOT, ROOT, args.block)
    rows = []
    print(f"\n{'format':8s} {'method':8s} {'baseline s':>10s} {'current s':>10s} {'speed-up':>8s}  bytes")
    for key in base:
        name, method = key.split("/")
        b, c = base[key]["seconds"], cur[key]["seconds"]
        same = base[key]["sha256"] == cur[key]["sha256"]
        rows.append({"format": name, "method": method, "baseline_s": b, "current_s": c, "same_bytes": same})
        print(f"{name:8s} {method:8s} {b:10.2f} {c:10.2f} {b / c:7.2f}x  {'equal' if same else 'DIFFER'}")
    tb, tc = sum(r["baseline_s"] for r in rows), sum(r["current_s"] for r in rows)
    print(f"{'all':17s} {tb:10.2f} {tc:10.2f} {tb / tc:7.2f}x  {sum(r['same_bytes'] for r in rows)}/{len(rows)} equal")
    out = {"baseline": args.baseline, "block": args.block, "threads": 1, "rows": rows, "total_speedup": tb / tc}
    RESULTS.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
