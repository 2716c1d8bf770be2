"""`FakeClock`: time that stands still until a test moves it."""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["FakeClock"]


class FakeClock:
    """A `Clock` that stands still until `advance()`; wakes the worker when moved.

    ```python
    clock = FakeClock()
    app = Garrison("sqlite:///:memory:", clock=clock)
    clock.advance(3600)   # a one-hour ctx.sleep fires now
    ```
    """

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = start
        self._listeners: list[Callable[[], None]] = []

    def time(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        """Move time forward by `seconds` and wake whoever subscribed."""
        if seconds < 0:
            raise ValueError(f"FakeClock.advance({seconds}): time only moves forward")
        self._now += seconds
        for listener in list(self._listeners):
            listener()

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call `listener()` after every `advance` (the worker subscribes to this)."""
        self._listeners.append(listener)
