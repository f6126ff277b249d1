"""Progress for output that is not a terminal (a log file, CI, ``nohup``).

rich's live display draws nothing there, so a 20-minute sensitivity table looked like a hung run.
``LineProgress`` takes the calls the code makes on a rich ``Progress`` (``add_task``, ``update``,
``remove_task``, used as a context manager) and writes one line per task at most every
``every_s`` seconds, plus a last one when a task that has printed finishes. Short tasks stay silent.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

EVERY_S = 30.0  # seconds between two lines of one task


@dataclass
class _Task:
    description: str
    total: float | None
    completed: float
    started: float
    printed: float | None = None  # when this task last wrote a line
    finished: bool = False


@dataclass
class LineProgress:
    """A line-per-interval stand-in for ``rich.progress.Progress``; ``say`` writes one line."""

    say: Callable[[str], None]
    every_s: float = EVERY_S
    clock: Callable[[], float] = time.monotonic
    tasks: dict[int, _Task] = field(default_factory=dict)
    _ids: Iterator[int] = field(default_factory=itertools.count, repr=False)  # ids stay unique after a removal

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **_: Any) -> int:
        tid = next(self._ids)
        self.tasks[tid] = _Task(description, total, completed, self.clock())
        return tid

    def update(
        self,
        task_id: int,
        *,
        completed: float | None = None,
        total: float | None = None,
        description: str | None = None,
        advance: float | None = None,
        **_: Any,
    ) -> None:
        t = self.tasks[task_id]
        if description is not None:
            t.description = description
        if total is not None:
            t.total = total
        if completed is not None:
            t.completed = completed
        if advance is not None:
            t.completed += advance
        now = self.clock()
        done = t.total is not None and t.completed >= t.total
        if done and t.finished:
            return
        last = t.started if t.printed is None else t.printed
        if (done and t.printed is not None) or now - last >= self.every_s:
            t.printed, t.finished = now, done
            self.say(self._line(t, now))

    def remove_task(self, task_id: int) -> None:
        self.tasks.pop(task_id, None)

    @staticmethod
    def _line(t: _Task, now: float) -> str:
        elapsed = now - t.started
        if t.total is None:
            return f"{t.description}: {t.completed:g} done, {_clock(elapsed)} elapsed"
        text = f"{t.description}: {t.completed:g}/{t.total:g}, {_clock(elapsed)} elapsed"
        if 0 < t.completed < t.total:
            text += f", about {_clock(elapsed * (t.total - t.completed) / t.completed)} left"
        return text


def _clock(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
