"""Run the two process-kill tests many times and print their failure rates (not part of CI).

    python bench/kill_loop.py --runs 30            # both tests, 30 runs each
    python bench/kill_loop.py --runs 30 --lock ~/.cache/ac-cpu.lock [--resume]

Each run is a fresh pytest process, so every run starts a new search from nothing. The failures
these tests had were races with the signal's arrival, so they show only over many runs. Writes
``bench/results/kill_loop.json`` with every run's outcome and the last failure's output.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

TESTS = (
    "tests/search/test_resume.py::test_sigkill_then_resume_keeps_finished_trials",
    "tests/test_interrupt.py::test_keyboard_interrupt_stops_cleanly_and_resumes",
)


def run_once(test: str, lock: str | None) -> tuple[bool, float, str]:
    """Give (passed, seconds, output tail) of one pytest run of ``test``; the seconds are the run's own,
    after the lock was taken."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", test]
    with open(lock or os.devnull, "a") as held:
        if lock:
            fcntl.flock(held, fcntl.LOCK_EX)  # released when the file closes
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        return proc.returncode == 0, time.time() - t0, (proc.stdout + proc.stderr)[-3000:]


ROOT = Path(__file__).resolve().parents[1]


def portable(text: str) -> str:
    """Give a failure's output with this machine's paths replaced: the repository by ``.``, pytest's
    temporary folders by ``<tmp>``, the home folder by ``~`` (results are committed)."""
    text = text.replace(str(ROOT), ".")
    text = re.sub(r"/tmp/pytest-of-[^/]+/pytest-\d+", "<tmp>", text)
    return text.replace(str(Path.home()), "~")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--lock", default=None, help="flock this file around each run (shared machines)")
    ap.add_argument("--test", action="append", help="a pytest node id (repeatable) [default: both kill tests]")
    ap.add_argument("--out", default="bench/results/kill_loop.json")
    ap.add_argument("--resume", action="store_true", help="keep the runs already in --out; run up to --runs each")
    args = ap.parse_args()
    tests = args.test or list(TESTS)
    results: dict[str, dict] = {t: {"runs": 0, "failures": 0, "seconds": [], "last_failure": None} for t in tests}
    if args.resume and Path(args.out).is_file():  # a rerun carries on where the last one stopped
        results.update({t: r for t, r in json.loads(Path(args.out).read_text()).items() if t in results})
    for i in range(args.runs):
        for t in tests:  # interleaved, so a slow spell on the machine hits both tests alike
            if results[t]["runs"] > i:
                continue
            ok, secs, tail = run_once(t, args.lock)
            r = results[t]
            r["runs"] += 1
            r["seconds"].append(round(secs, 1))
            if not ok:
                r["failures"] += 1
                r["last_failure"] = portable(tail)
            print(f"run {i + 1:>2}  {'pass' if ok else 'FAIL'}  {secs:6.1f} s  {t}", flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{'test':<80} {'runs':>5} {'failures':>9} {'rate':>6}")
    for t, r in results.items():
        print(f"{t:<80} {r['runs']:>5} {r['failures']:>9} {r['failures'] / max(r['runs'], 1):>6.1%}")


if __name__ == "__main__":
    main()
