"""Line progress for non-terminal output: rate-limited lines, a last line, silence for short tasks."""

from __future__ import annotations

from autocompress.progress import LineProgress


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _progress() -> tuple[LineProgress, list[str], Clock]:
    lines: list[str] = []
    clock = Clock()
    return LineProgress(say=lines.append, every_s=30.0, clock=clock), lines, clock


def test_a_short_task_prints_nothing() -> None:
    p, lines, clock = _progress()
    with p:
        task = p.add_task("sensitivity table", total=None)
        for i in range(1, 11):
            clock.t += 1.0
            p.update(task, completed=i, total=10)
        p.remove_task(task)
    assert lines == []


def test_a_long_task_prints_at_most_once_per_interval_and_once_at_the_end() -> None:
    p, lines, clock = _progress()
    task = p.add_task("sensitivity table", total=None)
    for i in range(1, 101):  # 100 probes, 2 s each: 200 s
        clock.t += 2.0
        p.update(task, completed=i, total=100)
    assert len(lines) == 200 // 30 + 1  # one line per 30 s, then the last one
    assert lines[0] == "sensitivity table: 15/100, 0:30 elapsed, about 2:50 left"
    assert lines[-1] == "sensitivity table: 100/100, 3:20 elapsed"
    p.update(task, completed=100)  # a finished task says so once
    assert len(lines) == 200 // 30 + 1


def test_unknown_total_and_description_changes_show() -> None:
    p, lines, clock = _progress()
    task = p.add_task("recovery", total=None)
    clock.t += 45.0
    p.update(task, completed=7, description="recovery (KL 0.1234)")
    assert lines == ["recovery (KL 0.1234): 7 done, 0:45 elapsed"]
    clock.t += 3600.0
    p.update(task, advance=1)
    assert lines[-1] == "recovery (KL 0.1234): 8 done, 1:00:45 elapsed"


def test_tasks_are_rate_limited_separately() -> None:
    p, lines, clock = _progress()
    a = p.add_task("a", total=10)
    clock.t += 20.0
    b = p.add_task("b", total=10)
    clock.t += 15.0  # a: 35 s since it started, b: 15 s
    p.update(a, completed=1)
    p.update(b, completed=1)
    assert [line.split(":")[0] for line in lines] == ["a"]


def test_a_task_added_after_a_removal_does_not_take_a_live_tasks_place() -> None:
    p, lines, clock = _progress()
    a = p.add_task("a", total=10)
    b = p.add_task("b", total=10)
    p.remove_task(a)
    c = p.add_task("c", total=10)
    assert c != b
    clock.t += 31.0
    p.update(b, completed=1)
    assert lines[-1].startswith("b: 1/10")
