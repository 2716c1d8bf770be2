"""Review of the resilience package: tests that fail because of real bugs."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from garrison import CircuitOpenError, Context, Garrison, RunStatus
from garrison.resilience import Child, CircuitBreaker, Retry, RetryBudget, Supervisor
from garrison.resilience._breaker import CLOSED, HALF_OPEN, OPEN
from garrison.testing import FakeClock


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_count_window_smaller_than_min_calls_still_opens() -> None:
    """A count window of 5 calls with the default `min_calls=10` can never hold 10 calls
    (`_trim` keeps at most `window`), so the breaker never opens, however many calls fail.

    Why: _breaker.py `record`: `total >= self.min_calls` with `total <= window` (`_trim`);
    resilience4j caps `minimumNumberOfCalls` at `slidingWindowSize` for a count-based
    window (CircuitBreakerConfig.Builder.build). Fix: in `__init__`, for
    `window_type == "count"`, use `min(min_calls, int(window))` (or refuse the setting
    with a ConfigurationError).
    """
    breaker = CircuitBreaker("tiny", window=5, clock=_Clock())
    for _ in range(20):
        started = breaker.acquire()
        breaker.record(started, ConnectionError("down"))
    assert breaker.state == OPEN


def test_a_cancelled_half_open_trial_does_not_close_the_breaker() -> None:
    """A trial call cancelled in HALF_OPEN is recorded as a *success* by `call()` and
    `__aexit__` (`record(started, None)`), so one cancelled trial (a run cancelled, a
    step timeout, a Fallback racing) closes a breaker whose dependency is still down.

    Why: _breaker.py `call` (`except asyncio.CancelledError: self.record(started, None)`)
    and `__aexit__` (`None if isinstance(exc, CancelledError)`). resilience4j releases
    the permission on cancellation (`releasePermission()`): it counts neither way.
    Fix: on CancelledError, release the trial slot (as for `ignore`d errors) and record
    nothing.
    """
    clock = _Clock()
    breaker = CircuitBreaker("pay", min_calls=2, window=2, wait_open=10, half_open_calls=1,
                             clock=clock)
    for _ in range(2):
        breaker.record(breaker.acquire(), ConnectionError("down"))
    assert breaker.state == OPEN
    clock.now += 10
    assert breaker.state == HALF_OPEN

    async def hang() -> None:
        await asyncio.sleep(3600)

    async def scenario() -> None:
        task = asyncio.create_task(breaker.call(hang))
        await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())
    assert breaker.state == HALF_OPEN  # the trial never told anything about the dependency
    assert breaker.transitions[-1] != (HALF_OPEN, CLOSED)


def test_a_cancelled_call_does_not_dilute_the_closed_window() -> None:
    """In CLOSED, every cancelled call is counted as a success, lowering the failure rate
    (timeouts of a hanging dependency are cancellations: the breaker never opens).

    Why: same lines as above (_breaker.py `call`, `__aexit__`). Fix: record nothing.
    """
    breaker = CircuitBreaker("hangs", min_calls=4, window=4, failure_rate=0.5, clock=_Clock())

    async def hang() -> None:
        await asyncio.sleep(3600)

    async def scenario() -> None:
        for _ in range(2):
            task = asyncio.create_task(breaker.call(hang))
            await asyncio.sleep(0)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())
    assert breaker.metrics["calls"] == 0


def test_a_state_listener_may_read_the_breaker() -> None:
    """A listener given to `on_state_change` that reads `breaker.state` or
    `breaker.metrics` (the obvious thing to log) deadlocks the thread for ever.

    Why: _breaker.py `_move` calls the listeners while holding `self._lock`, a
    non-reentrant `threading.Lock`, and `state`/`metrics` take it again. Fix: collect
    the transition under the lock and call listeners (and `_publish`) after releasing
    it, or use `threading.RLock`.
    """
    clock = _Clock()
    breaker = CircuitBreaker("log", min_calls=1, window=1, clock=clock)
    seen: list[Any] = []
    breaker.on_state_change(lambda b, old, new: seen.append(b.metrics))

    def trip() -> None:
        breaker.record(breaker.acquire(), ConnectionError("down"))

    thread = threading.Thread(target=trip, daemon=True)
    thread.start()
    thread.join(2.0)
    assert not thread.is_alive(), "deadlock: the listener waits on the breaker's lock"
    assert len(seen) == 1
