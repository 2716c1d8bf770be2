"""`CircuitBreaker`, after resilience4j's.

CLOSED: calls go through and their outcomes fill a sliding window (the last `window`
calls, or the calls of the last `window` seconds). Once the window holds `min_calls`
calls, a failure rate >= `failure_rate` or a slow-call rate >= `slow_call_rate` opens it.
OPEN: calls are refused at once with `CircuitOpenError` (which says when the breaker
will try again) for `wait_open` seconds, then HALF_OPEN: `half_open_calls` trial calls
go through (others are refused); when they are all done, the breaker closes if their
rates are under the thresholds, else opens again. Exceptions in `ignore` count neither
way. `force_open()`, `disable()` (always let through, record nothing) and `reset()`
are the manual controls. `for_key("openai:gpt-4o")` gives one breaker per key with the
same settings.

Shared across a fleet: a breaker attached to a step (or given to `app.share_breaker`)
publishes its openings and closings through the store, and every worker's copy of the
breaker of that name follows them (PostgreSQL: within milliseconds, by notification).
Each worker still counts its own calls; what is shared is the decision.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

from garrison._log import get_logger
from garrison.errors import CircuitOpenError, ConfigurationError

__all__ = ["CLOSED", "DISABLED", "FORCED_OPEN", "HALF_OPEN", "OPEN", "CircuitBreaker"]

log = get_logger(__name__)

T = TypeVar("T")

CLOSED = "CLOSED"
OPEN = "OPEN"
HALF_OPEN = "HALF_OPEN"
FORCED_OPEN = "FORCED_OPEN"
DISABLED = "DISABLED"

StateListener = Callable[["CircuitBreaker", str, str], None]


@dataclass(slots=True)
class _Outcome:
    at: float
    failed: bool
    slow: bool


class CircuitBreaker:
    """A circuit breaker (see the module doc). Usable as `async with breaker:`, with
    `await breaker.call(fn, *args)`, or attached to a step (`@app.step(breaker=...)`).

    Args:
        name: its name (in errors, logs and metrics).
        failure_rate: open at this fraction of failed calls (0.5 = 50 %).
        window: the sliding window: the last `window` calls (`window_type="count"`) or
            the calls of the last `window` seconds (`"time"`).
        min_calls: no decision before the window holds this many calls.
        wait_open: seconds OPEN before trying HALF_OPEN.
        half_open_calls: trial calls let through in HALF_OPEN.
        slow_call_duration: a call slower than this (seconds) is slow (None: never).
        slow_call_rate: open at this fraction of slow calls.
        failure_on: exception types that count as failures (default: `(Exception,)`).
        ignore: exception types that count neither way (e.g. a validation error).
        clock: time source `() -> seconds` (`time.monotonic`; inject one in tests).
    """

    def __init__(self, name: str, *, failure_rate: float = 0.5, window: float = 100,
                 window_type: str = "count", min_calls: int = 10, wait_open: float = 60.0,
                 half_open_calls: int = 10, slow_call_duration: float | None = None,
                 slow_call_rate: float = 1.0,
                 failure_on: tuple[type[BaseException], ...] = (Exception,),
                 ignore: tuple[type[BaseException], ...] = (),
                 clock: Callable[[], float] = time.monotonic) -> None:
        where = f"CircuitBreaker({name!r})"
        if not 0 < failure_rate <= 1 or not 0 < slow_call_rate <= 1:
            raise ConfigurationError(f"{where}: failure_rate and slow_call_rate are in (0, 1]")
        if window_type not in {"count", "time"}:
            raise ConfigurationError(f"{where}: window_type is 'count' or 'time', "
                                     f"not {window_type!r}")
        if window <= 0 or min_calls < 1 or half_open_calls < 1 or wait_open < 0:
            raise ConfigurationError(
                f"{where}: window > 0, min_calls >= 1, half_open_calls >= 1, wait_open >= 0")
        self.name = name
        self.failure_rate = failure_rate
        self.window = window
        self.window_type = window_type
        self.min_calls = min_calls
        self.wait_open = wait_open
        self.half_open_calls = half_open_calls
        self.slow_call_duration = slow_call_duration
        self.slow_call_rate = slow_call_rate
        self.failure_on = failure_on
        self.ignore = ignore
        self.clock = clock
        # A count window never holds more than `window` calls (resilience4j caps
        # minimumNumberOfCalls at the window size the same way).
        self._min_calls = min(min_calls, int(window)) if window_type == "count" else min_calls
        self._state = CLOSED
        self._outcomes: deque[_Outcome] = deque()
        self._failed = 0  # failed calls in _outcomes (kept as calls come and go)
        self._slow = 0
        self._opened_at = 0.0
        self._trials_started = 0
        self._trials: list[_Outcome] = []
        self._lock = threading.RLock()  # listeners called on a transition may read it
        self._keyed: dict[str, CircuitBreaker] = {}
        self._listeners: list[StateListener] = []
        self._entered: dict[int, list[float]] = {}
        self._publish: Callable[[str, str, float | None], None] | None = None
        self._following = False  # applying another worker's decision: do not echo it
        self.transitions: list[tuple[str, str]] = []  # (from, to), for metrics and tests

    # -- state ---------------------------------------------------------------------

    @property
    def state(self) -> str:
        """CLOSED, OPEN, HALF_OPEN, FORCED_OPEN or DISABLED (OPEN turns HALF_OPEN when
        its wait is over)."""
        with self._lock:
            self._maybe_half_open()
            return self._state

    def on_state_change(self, listener: StateListener) -> None:
        """Call `listener(breaker, old, new)` on every transition."""
        self._listeners.append(listener)

    def _move(self, new: str) -> None:
        old, self._state = self._state, new
        if old == new:
            return
        self.transitions.append((old, new))
        if new == OPEN:
            self._opened_at = self.clock()
        if new in {HALF_OPEN, CLOSED, OPEN}:
            self._trials_started = 0
            self._trials = []
        if new == CLOSED:
            self._clear()
        log.warning("breaker.state", breaker=self.name, old=old, new=new)
        for listener in self._listeners:
            listener(self, old, new)
        if self._publish is not None and not self._following and new != HALF_OPEN:
            self._publish(self.name, new, self.wait_open if new == OPEN else None)

    def share(self, publish: Callable[[str, str, float | None], None]) -> None:
        """Publish this breaker's decisions (and its keys') with `publish(name, state,
        open_for_s)`; the engine wires it to the store."""
        self._publish = publish
        for keyed in self._keyed.values():
            keyed.share(publish)

    def follow(self, state: str, open_for_s: float | None) -> None:
        """Apply a decision another worker published for this breaker."""
        with self._lock:
            self._following = True
            try:
                if state == OPEN and open_for_s is not None and open_for_s > 0:
                    if self._state in {CLOSED, HALF_OPEN}:
                        self._move(OPEN)
                        self._opened_at = self.clock() - (self.wait_open - open_for_s)
                elif state in {FORCED_OPEN, DISABLED} and self._state != state:
                    self._move(state)
                elif state == CLOSED and self._state in {OPEN, HALF_OPEN, FORCED_OPEN,
                                                         DISABLED}:
                    self._move(CLOSED)
            finally:
                self._following = False

    def _maybe_half_open(self) -> None:
        if self._state == OPEN and self.clock() - self._opened_at >= self.wait_open:
            self._move(HALF_OPEN)

    def force_open(self) -> None:
        with self._lock:
            self._move(FORCED_OPEN)

    def disable(self) -> None:
        with self._lock:
            self._move(DISABLED)

    def reset(self) -> None:
        """Back to CLOSED with an empty window."""
        with self._lock:
            self._move(CLOSED)
            self._clear()

    def for_key(self, key: str) -> CircuitBreaker:
        """The breaker for `key` (made on first use, same settings)."""
        with self._lock:
            found = self._keyed.get(key)
            if found is None:
                found = CircuitBreaker(
                    f"{self.name}:{key}", failure_rate=self.failure_rate, window=self.window,
                    window_type=self.window_type, min_calls=self.min_calls,
                    wait_open=self.wait_open, half_open_calls=self.half_open_calls,
                    slow_call_duration=self.slow_call_duration,
                    slow_call_rate=self.slow_call_rate, failure_on=self.failure_on,
                    ignore=self.ignore, clock=self.clock)
                for listener in self._listeners:
                    found.on_state_change(listener)
                if self._publish is not None:
                    found.share(self._publish)
                self._keyed[key] = found
            return found

    # -- calls ---------------------------------------------------------------------

    def acquire(self) -> float:
        """Ask to make a call: returns its start time, or raises `CircuitOpenError`."""
        with self._lock:
            self._maybe_half_open()
            now = self.clock()
            if self._state in {CLOSED, DISABLED}:
                return now
            if self._state == HALF_OPEN and self._trials_started < self.half_open_calls:
                self._trials_started += 1
                return now
            retry_in = (max(0.0, self._opened_at + self.wait_open - now)
                        if self._state == OPEN else None)
            raise CircuitOpenError(
                f"circuit breaker {self.name!r} is {self._state}: call refused"
                + (f"; it lets a trial call through in {retry_in:.1f} s"
                   if retry_in is not None else ""),
                breaker=self.name, state=self._state, retry_after=retry_in,
            )

    def release(self) -> None:
        """A call that `acquire` let through ended without an outcome to count (it was
        cancelled, or its error is ignored): a half-open trial slot is given back."""
        with self._lock:
            if self._state == HALF_OPEN and self._trials_started:
                self._trials_started -= 1

    def record(self, started: float, error: BaseException | None) -> None:
        """The outcome of a call that `acquire` let through."""
        if isinstance(error, asyncio.CancelledError) or (
                error is not None and isinstance(error, self.ignore)):
            self.release()  # counts neither way
            return
        failed = error is not None and isinstance(error, self.failure_on)
        now = self.clock()
        slow = (self.slow_call_duration is not None
                and now - started >= self.slow_call_duration)
        outcome = _Outcome(now, failed, slow)
        with self._lock:
            if self._state == HALF_OPEN:
                self._trials.append(outcome)
                if len(self._trials) >= self.half_open_calls:
                    self._move(OPEN if self._tripped(self._trials) else CLOSED)
            elif self._state == CLOSED:
                self._outcomes.append(outcome)
                self._failed += outcome.failed
                self._slow += outcome.slow
                self._trim(now)
                total = len(self._outcomes)
                if total >= self._min_calls and self._over(total, self._failed, self._slow):
                    self._move(OPEN)

    def _clear(self) -> None:
        self._outcomes.clear()
        self._failed = self._slow = 0

    def _trim(self, now: float) -> None:
        outcomes = self._outcomes
        while outcomes and (len(outcomes) > self.window if self.window_type == "count"
                            else outcomes[0].at <= now - self.window):
            gone = outcomes.popleft()
            self._failed -= gone.failed
            self._slow -= gone.slow

    def _over(self, total: int, failed: int, slow: int) -> bool:
        return failed / total >= self.failure_rate or slow / total >= self.slow_call_rate

    def _tripped(self, outcomes: Any) -> bool:
        return self._over(len(outcomes), sum(o.failed for o in outcomes),
                          sum(o.slow for o in outcomes))

    @property
    def metrics(self) -> dict[str, float]:
        """Calls in the window, failure and slow-call rates (in [0, 1])."""
        with self._lock:
            total = len(self._outcomes)
            if not total:
                return {"calls": 0, "failure_rate": 0.0, "slow_call_rate": 0.0}
            return {"calls": total, "failure_rate": self._failed / total,
                    "slow_call_rate": self._slow / total}

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """`await fn(*args, **kwargs)` through the breaker."""
        started = self.acquire()
        try:
            result = await fn(*args, **kwargs)
        except BaseException as exc:  # a cancellation counts neither way (see record)
            self.record(started, exc)
            raise
        self.record(started, None)
        return result

    async def __aenter__(self) -> CircuitBreaker:
        started = self.acquire()
        self._entered.setdefault(_task_key(), []).append(started)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        key = _task_key()
        starts = self._entered[key]
        started = starts.pop()
        if not starts:
            del self._entered[key]
        self.record(started, exc)


def _task_key() -> int:
    """`async with` blocks are matched per task (they may nest and run concurrently)."""
    task = asyncio.current_task()
    return id(task) if task is not None else 0
