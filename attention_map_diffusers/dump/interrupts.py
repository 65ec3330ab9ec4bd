"""SIGTERM (a cluster's time limit) and Ctrl-C as an exception, so that a dump command can list its
finished runs before it exits. Standard library only."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


class Interrupted(BaseException):
    """Raised in the main thread when the process gets SIGTERM or SIGINT inside :func:`interrupts`.

    A BaseException, like KeyboardInterrupt: ``except Exception`` around one run must not swallow it.
    """

    def __init__(self, signum: int):
        self.signum = signum
        self.name = signal.Signals(signum).name
        super().__init__(self.name)

    @property
    def exit_code(self) -> int:
        """128 + the signal number, as a shell reports a process killed by it (143, 130)."""
        return 128 + self.signum


@contextlib.contextmanager
def interrupts() -> Iterator[None]:
    """Inside, SIGTERM and SIGINT raise :class:`Interrupted` once; a second signal while the command
    writes its last records is ignored. The previous handlers are back on exit. Outside the main
    thread (where handlers cannot be set) this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = []

    def handler(signum, frame):
        if fired:
            return
        fired.append(signum)
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
