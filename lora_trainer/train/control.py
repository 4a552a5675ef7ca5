"""Stopping a run from outside: Ctrl-C, SIGTERM, the UI's Stop button or the WebUI's Interrupt."""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager


class StopRequested(Exception):
    """Raised inside a phase that cannot finish a step (model load, latent caching, a sample render) when a stop
    was asked for; the trainer turns it into a clean `stopped` end, never a failure."""


class StopFlag:
    def __init__(self):
        self._event = threading.Event()
        self.reason = ""

    def set(self, reason: str = "stop requested") -> None:
        if not self._event.is_set():
            self.reason = reason
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def __bool__(self) -> bool:  # `if stop:` reads naturally in the loop
        return self.is_set()

    def check(self) -> None:
        """Raises StopRequested when set (for phases between optimizer steps)."""
        if self.is_set():
            raise StopRequested(self.reason)


@contextmanager
def stop_on_signals(flag: StopFlag, same_signal_within_s: float = 0.0):
    """The first Ctrl-C / SIGTERM asks the loop to checkpoint and stop; a second Ctrl-C aborts at once.

    same_signal_within_s: a signal that follows the first this soon is the same request (under torchrun or
    accelerate launch the terminal's Ctrl-C reaches each process, and the launcher passes it on again)."""
    if threading.current_thread() is not threading.main_thread():
        yield flag  # signal handlers can only live in the main thread; the UI uses flag.set()
        return

    import time

    previous = {}
    first = {"at": None}

    def handler(signum, frame):
        now = time.monotonic()
        if first["at"] is not None and now - first["at"] < same_signal_within_s:
            return
        if flag.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        first["at"] = now
        flag.set(f"received {signal.Signals(signum).name}: saving a checkpoint and stopping "
                 f"(press Ctrl-C again to abort without saving)")

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
