"""Training events: the only channel between a training job and whoever shows its progress.

The CLI renders them with tqdm, the WebUI tab polls them. A listener must be quick and never raise
into the training loop (errors in listeners are swallowed after being printed once).
"""
from __future__ import annotations

import threading
import time
import traceback
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

EVENT_KINDS = ("started", "step", "checkpoint_saved", "sample", "validation", "message", "finished", "failed",
               "stopped")


@dataclass
class Event:
    kind: str
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    loss: Optional[float] = None
    lr: Optional[float] = None
    it_per_s: Optional[float] = None
    eta_s: Optional[float] = None
    message: str = ""
    path: Optional[str] = None
    data: dict[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


Listener = Callable[[Event], None]


class EventBus:
    """Fan-out to listeners plus a bounded history the UI can poll with `since(index)`."""

    def __init__(self, history: int = 10000):
        self._listeners: list[Listener] = []
        self._history: deque[Event] = deque(maxlen=history)
        self._count = 0
        self._lock = threading.Lock()
        self._failed_listeners: set[int] = set()

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def emit(self, kind: str, **kw) -> Event:
        if kind not in EVENT_KINDS:
            raise ValueError(f"unknown event kind {kind!r}")
        event = Event(kind=kind, **kw)
        with self._lock:
            self._history.append(event)
            self._count += 1
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:  # a broken progress display must not kill a training run
                if id(listener) not in self._failed_listeners:
                    self._failed_listeners.add(id(listener))
                    try:
                        traceback.print_exc()
                    except Exception:  # stderr itself is gone (a closed pipe): nothing left to tell
                        pass
        return event

    def since(self, index: int) -> tuple[list[Event], int]:
        """Events after the `index`-th emitted one, and the new index to poll from."""
        with self._lock:
            first = self._count - len(self._history)
            start = max(index, first) - first
            return list(self._history)[start:], self._count

    @property
    def last(self) -> Optional[Event]:
        with self._lock:
            return self._history[-1] if self._history else None


class StepTimer:
    """it/s and ETA from a moving window of recent steps."""

    def __init__(self, window: int = 20):
        self._times: deque[float] = deque(maxlen=window)

    def tick(self) -> None:
        self._times.append(time.perf_counter())

    def rate(self) -> Optional[float]:
        if len(self._times) < 2:
            return None
        span = self._times[-1] - self._times[0]
        return (len(self._times) - 1) / span if span > 0 else None

    def eta(self, remaining_steps: int) -> Optional[float]:
        r = self.rate()
        return remaining_steps / r if r else None
