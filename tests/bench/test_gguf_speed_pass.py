"""bench/gguf_vs_recipes.py's speed pass: interleaved rounds, medians, resume (llama-bench replaced)."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location(
    "bench_gguf_vs_recipes", Path(__file__).parents[2] / "bench" / "gguf_vs_recipes.py"
)
bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench)


def _args(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"speed": "redo", "speed_pass": "p", "rounds": 3, "threads": 2, **kw})


class Clock:
    """A fake llama-bench: file ``i`` runs at 10 * (i + 1) tokens/s, 20 % slower during a slow spell."""

    def __init__(self, slow: set[int] = frozenset(), fail_at: int | None = None) -> None:
        self.calls: list[str] = []
        self.slow, self.fail_at = slow, fail_at

    def __call__(self, path: Path, threads: int) -> dict[str, float]:
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise KeyboardInterrupt
        self.calls.append(path.name)
        rate = 10.0 * (int(path.stem) + 1) * (0.8 if len(self.calls) - 1 in self.slow else 1.0)
        return {"tg_tps": rate, "pp_tps": 5 * rate}


@pytest.fixture
def files(monkeypatch):
    monkeypatch.setattr(bench, "save", lambda out: None)
    return [({"name": str(i)}, Path(f"{i}.gguf")) for i in range(4)]


def test_rounds_interleave_files_and_a_slow_spell_does_not_move_the_median(files, monkeypatch) -> None:
    clock = Clock(slow={0, 1, 2, 3})  # the whole first round runs slow
    monkeypatch.setattr(bench, "bench_speed", clock)
    bench.speed_pass(files, _args(), {})
    rounds = [clock.calls[i : i + 4] for i in range(0, 12, 4)]
    assert all(sorted(r) == sorted(p.name for _, p in files) for r in rounds)  # every file once per round
    assert len({tuple(r) for r in rounds}) > 1  # in a different order from round to round
    for i, (row, _) in enumerate(files):
        assert row["tg_tps"] == pytest.approx(10.0 * (i + 1))  # the slow round is outvoted
        assert row["tg_round_spread"] == pytest.approx(0.2)
        assert row["speed_pass"] == "p"


def test_an_interrupted_pass_resumes_without_timing_a_file_twice_per_round(files, monkeypatch) -> None:
    first = Clock(fail_at=6)
    monkeypatch.setattr(bench, "bench_speed", first)
    with pytest.raises(KeyboardInterrupt):
        bench.speed_pass(files, _args(), {})
    assert not any("tg_tps" in row for row, _ in files)  # nothing claims a finished pass
    again = Clock()
    monkeypatch.setattr(bench, "bench_speed", again)
    bench.speed_pass(files, _args(), {})
    assert len(first.calls) + len(again.calls) == 12
    assert all(len(row["speed_rounds"]["tg_tps"]) == 3 for row, _ in files)
    # a finished pass is not timed again; a new pass name times every file again
    done = Clock()
    monkeypatch.setattr(bench, "bench_speed", done)
    bench.speed_pass(files, _args(), {})
    assert done.calls == []
    bench.speed_pass(files, _args(speed_pass="q", rounds=1), {})
    assert len(done.calls) == 4 and all(row["speed_pass"] == "q" for row, _ in files)


def test_measure_times_only_files_never_timed_and_skip_times_none(files, monkeypatch) -> None:
    clock = Clock()
    monkeypatch.setattr(bench, "bench_speed", clock)
    files[0][0]["tg_tps"] = 99.0
    bench.speed_pass(files, _args(speed="skip"), {})
    assert clock.calls == []
    bench.speed_pass(files, _args(speed="measure", rounds=1), {})
    assert sorted(clock.calls) == ["1.gguf", "2.gguf", "3.gguf"] and files[0][0]["tg_tps"] == 99.0
