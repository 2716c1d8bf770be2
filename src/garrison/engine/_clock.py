"""Time as an argument: the `Clock` seam and the real clock."""

from __future__ import annotations

import time
from typing import Protocol

__all__ = ["Clock", "SystemClock"]


class Clock(Protocol):
    """Wall-clock seconds since the epoch. Tests pass `garrison.testing.FakeClock`."""

    def time(self) -> float: ...


class SystemClock:
    """The real wall clock (`time.time()`)."""

    def time(self) -> float:
        return time.time()
