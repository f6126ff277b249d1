"""Ctrl-C at safe points: a search stops between storage writes, never inside one.

A KeyboardInterrupt raised while Optuna asks for a trial leaves that trial RUNNING with nobody to
fail it (``ask`` had not returned it yet); raised inside a database write it can leave a logged
traceback behind. While the gate is shut, SIGINT is only recorded, and raised the moment the gate
opens again; the search opens it around the work that takes the time (applying a plan, running the
model), so Ctrl-C still stops a trial at once.

Only the main thread can own SIGINT, and only a process whose SIGINT raises KeyboardInterrupt (the
Python default) is changed; anywhere else the gate does nothing.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType


class InterruptGate:
    """Holds SIGINT back while shut (``shut()``), lets it through while open (``open()``)."""

    def __init__(self) -> None:
        self.pending = False
        self._shut = False

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.pending = True

    def _raise_pending(self) -> None:
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt

    @staticmethod
    def _ours() -> bool:
        return threading.current_thread() is threading.main_thread()

    @contextlib.contextmanager
    def shut(self) -> Iterator[None]:
        """Record SIGINT instead of raising it inside the block; raise it at the block's end."""
        if self._shut or not self._ours() or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            yield
            return
        signal.signal(signal.SIGINT, self._record)
        self._shut = True
        try:
            yield
        finally:
            self._shut = False
            signal.signal(signal.SIGINT, signal.default_int_handler)
        self._raise_pending()

    @contextlib.contextmanager
    def open(self) -> Iterator[None]:
        """Let SIGINT raise at once inside the block (raising first one recorded while shut)."""
        if not self._shut:
            yield
            return
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            self._raise_pending()
            yield
        finally:
            signal.signal(signal.SIGINT, self._record)
