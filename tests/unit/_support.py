"""Shared test helpers: simulated in-process crashes through the engine's hooks."""

from __future__ import annotations

import asyncio

from garrison import EngineHooks, StepInfo


class Crash(BaseException):
    """Raised by `CrashAt` to abandon a run mid-flight, as a dying process would."""


class CrashAt(EngineHooks):
    """Raise `Crash` at the `n`-th occurrence of hook `point` (started/completed/committed)."""

    def __init__(self, point: str, n: int) -> None:
        self.point = point
        self.n = n
        self.seen = 0
        self.crashed = asyncio.Event()

    def _tick(self, point: str) -> None:
        if point != self.point or self.crashed.is_set():
            return
        self.seen += 1
        if self.seen == self.n:
            self.crashed.set()
            raise Crash(f"simulated crash at {point} #{self.n}")

    def step_started(self, step: StepInfo) -> None:
        self._tick("started")

    def step_completed(self, step: StepInfo, duration_s: float) -> None:
        self._tick("completed")

    def step_committed(self, step: StepInfo) -> None:
        self._tick("committed")


class ParkWatch(EngineHooks):
    """Lets a test await the moment a run is parked in the store (no polling)."""

    def __init__(self) -> None:
        self._parked: dict[str, asyncio.Event] = {}

    def _event(self, run_id: str) -> asyncio.Event:
        return self._parked.setdefault(run_id, asyncio.Event())

    def run_parked(self, run_id: str, wake_at: float | None) -> None:
        self._event(run_id).set()

    async def parked(self, *run_ids: str, timeout_s: float = 5.0) -> None:
        async with asyncio.timeout(timeout_s):
            for run_id in run_ids:
                await self._event(run_id).wait()
