"""SIGINT, SIGTERM and SIGUSR1 while a run is in progress: noted, and acted on at a step boundary."""

from __future__ import annotations

import contextlib
import signal
from typing import Any, Iterator

SIGNALS = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM", signal.SIGUSR1: "SIGUSR1"}


class Interrupted(BaseException):
    """A signal stopped the run (a BaseException, like KeyboardInterrupt: no `except Exception` takes it)."""

    def __init__(self, signum: int, epoch: int | None = None, step: int | None = None, finished: bool = False):
        super().__init__(SIGNALS.get(signum, str(signum)))
        self.signum = signum
        self.epoch, self.step = epoch, step   # where the student's training stopped (None: before it began)
        self.finished = finished   # the signal came while the finished run's results were written
        self.teacher = False       # the signal came while the teacher trained


class Signals:
    """SIGINT, SIGTERM and SIGUSR1 while a run is in progress. Outside training steps a signal stops
    the run at once (raises Interrupted); while `deferred` it is noted and the training loop stops
    at the next step boundary, after saving last.pt."""

    def __init__(self) -> None:
        self.pending: int | None = None
        self.deferred = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.pending is not None:
            return  # the first signal is being acted on; kill -9 stops at once
        self.pending = signum
        if not self.deferred:
            raise Interrupted(self.pending)

    def __enter__(self) -> "Signals":
        import threading

        if threading.current_thread() is not threading.main_thread():
            return self  # only the main thread may handle signals (a launcher running jobs in threads)
        for signum in SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def hold(self) -> None:
        """From now on a signal is noted, never raised: what is being written is written whole."""
        self.deferred = True

    @contextlib.contextmanager
    def deferring(self, raise_pending: bool = True) -> Iterator[None]:
        """Signals are noted, not raised, inside; a pending one is raised on leaving (if asked)."""
        previous, self.deferred = self.deferred, True
        try:
            yield
        finally:
            self.deferred = previous
        if self.pending is not None and not previous and raise_pending:
            raise Interrupted(self.pending)
