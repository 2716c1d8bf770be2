"""The resilience policies on their own: injected clocks, seeded randomness, no sleeps."""

from __future__ import annotations

import asyncio
import random
from collections import deque
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from garrison import BulkheadFull, CircuitOpenError, ConfigurationError
from garrison.errors import FallbackExhausted, RateLimited
from garrison.resilience import (
    Bulkhead,
    CircuitBreaker,
    Fallback,
    RateLimiter,
    Retry,
    RetryBudget,
    retry_after_s,
)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# -- Retry ---------------------------------------------------------------------------


def test_retry_backoff_is_full_jitter_within_the_capped_exponential() -> None:
    seeded = random.Random(7)
    retry = Retry(max_attempts=10, base=0.5, cap=3.0, random=seeded.random)
    for attempt in range(1, 9):
        delay = retry.delay_s(attempt, ConnectionError())
        assert delay is not None
        assert 0 <= delay <= min(3.0, 0.5 * 2 ** (attempt - 1))
    first = Retry(max_attempts=10, base=0.5, cap=3.0, random=random.Random(7).random)
    second = Retry(max_attempts=10, base=0.5, cap=3.0, random=random.Random(7).random)
    waits = [first.delay_s(n, ConnectionError()) for n in range(1, 9)]
    assert waits == [second.delay_s(n, ConnectionError()) for n in range(1, 9)]  # same seed
    assert len(set(waits)) == len(waits)  # and jittered: no two equal


def test_retry_gives_up_after_max_attempts_and_on_permanent_errors() -> None:
    retry = Retry(max_attempts=3, retry_on=(TimeoutError, ConnectionError),
                  give_up_on=(ConnectionRefusedError,))
    assert retry.delay_s(1, TimeoutError()) is not None
    assert retry.delay_s(3, TimeoutError()) is None  # the third attempt was the last
    assert retry.delay_s(1, ValueError("bad input")) is None  # not transient
    assert retry.delay_s(1, ConnectionRefusedError()) is None  # declared permanent
    by_predicate = Retry(retry_on=lambda e: "429" in str(e))
    assert by_predicate.delay_s(1, RuntimeError("HTTP 429")) is not None
    assert by_predicate.delay_s(1, RuntimeError("HTTP 400")) is None


def test_retry_stops_when_the_next_attempt_would_pass_max_elapsed() -> None:
    retry = Retry(max_attempts=10, base=1.0, cap=1.0, max_elapsed=5.0, random=lambda: 1.0)
    assert retry.delay_s(2, TimeoutError(), elapsed_s=3.9) == 1.0
    assert retry.delay_s(2, TimeoutError(), elapsed_s=4.5) is None


def test_retry_honours_a_servers_retry_after() -> None:
    error = RuntimeError("429")
    error.response = SimpleNamespace(headers={"retry-after": "7"})  # type: ignore[attr-defined]
    assert retry_after_s(error) == 7.0
    assert Retry(cap=1.0, random=lambda: 0.0).delay_s(1, error) == 7.0
    assert Retry(honor_retry_after=False, random=lambda: 0.0).delay_s(1, error) == 0.0
    dated = RuntimeError("503")
    dated.response = SimpleNamespace(  # type: ignore[attr-defined]
        headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"})
    assert retry_after_s(dated) == 0.0  # a date in the past: go now


def test_retry_budget_stops_retries_when_spent_and_refills_on_success() -> None:
    budget = RetryBudget("test-budget-spent", capacity=10, retry_cost=5, refund=5)
    budget.reset()
    retry = Retry(max_attempts=100, budget=budget, random=lambda: 0.0)
    assert retry.delay_s(1, ConnectionError()) == 0.0
    assert retry.delay_s(1, ConnectionError()) == 0.0
    assert retry.delay_s(1, ConnectionError()) is None  # spent: fail fast
    retry.succeeded()
    assert retry.delay_s(1, ConnectionError()) == 0.0
    assert RetryBudget("test-budget-spent").tokens == budget.tokens  # shared by name


def test_retry_and_budget_refuse_bad_settings() -> None:
    with pytest.raises(ConfigurationError, match="max_attempts"):
        Retry(max_attempts=0)
    with pytest.raises(ConfigurationError, match="capacity"):
        RetryBudget("bad", capacity=0)


# -- CircuitBreaker -------------------------------------------------------------------


def make_breaker(clock: Clock, **options: Any) -> CircuitBreaker:
    defaults: dict[str, Any] = {"failure_rate": 0.5, "window": 4, "min_calls": 4,
                                "wait_open": 10.0, "half_open_calls": 2}
    return CircuitBreaker("dep", clock=clock, **{**defaults, **options})


def test_breaker_opens_at_the_failure_rate_after_min_calls() -> None:
    clock = Clock()
    breaker = make_breaker(clock)
    for error in (None, ValueError(), None):
        breaker.record(breaker.acquire(), error)
    assert breaker.state == "CLOSED"  # 3 calls < min_calls
    breaker.record(breaker.acquire(), ValueError())
    assert breaker.state == "OPEN"  # 2 of 4 failed
    with pytest.raises(CircuitOpenError, match="'dep' is OPEN") as refused:
        breaker.acquire()
    assert refused.value.retry_after == 10.0  # type: ignore[attr-defined]


def test_breaker_half_opens_after_the_wait_and_closes_on_good_trials() -> None:
    clock = Clock()
    breaker = make_breaker(clock)
    for _ in range(4):
        breaker.record(breaker.acquire(), ValueError())
    clock.now = 10.0
    assert breaker.state == "HALF_OPEN"
    first, second = breaker.acquire(), breaker.acquire()
    with pytest.raises(CircuitOpenError):
        breaker.acquire()  # only half_open_calls trials
    breaker.record(first, None)
    breaker.record(second, None)
    assert breaker.state == "CLOSED"
    assert breaker.transitions == [("CLOSED", "OPEN"), ("OPEN", "HALF_OPEN"),
                                   ("HALF_OPEN", "CLOSED")]


def test_breaker_reopens_when_trials_fail() -> None:
    clock = Clock()
    breaker = make_breaker(clock)
    for _ in range(4):
        breaker.record(breaker.acquire(), ValueError())
    clock.now = 10.0
    for error in (ValueError(), ValueError()):
        breaker.record(breaker.acquire(), error)
    assert breaker.state == "OPEN"
    clock.now = 15.0
    assert breaker.state == "OPEN"  # a fresh wait started at 10
    clock.now = 20.0
    assert breaker.state == "HALF_OPEN"


def test_breaker_counts_slow_calls_and_ignores_declared_errors() -> None:
    clock = Clock()
    breaker = make_breaker(clock, slow_call_duration=2.0, slow_call_rate=0.75,
                           ignore=(KeyError,))
    for _ in range(10):
        breaker.record(breaker.acquire(), KeyError())  # counts neither way
    assert breaker.metrics["calls"] == 0
    for _ in range(3):
        started = breaker.acquire()
        clock.now += 3.0
        breaker.record(started, None)  # a slow success
    breaker.record(breaker.acquire(), None)
    assert breaker.state == "OPEN"  # 3 of 4 slow


def test_breaker_time_window_forgets_old_calls() -> None:
    clock = Clock()
    breaker = make_breaker(clock, window=60, window_type="time", min_calls=3)
    breaker.record(breaker.acquire(), ValueError())
    breaker.record(breaker.acquire(), ValueError())
    clock.now = 61.0
    breaker.record(breaker.acquire(), None)
    breaker.record(breaker.acquire(), None)
    breaker.record(breaker.acquire(), ValueError())
    assert breaker.state == "CLOSED"  # the two early failures left the window


def test_breaker_manual_controls_and_keys() -> None:
    clock = Clock()
    breaker = make_breaker(clock)
    gpt = breaker.for_key("openai:gpt-4o")
    assert gpt is breaker.for_key("openai:gpt-4o") and gpt.name == "dep:openai:gpt-4o"
    for _ in range(4):
        gpt.record(gpt.acquire(), ValueError())
    assert gpt.state == "OPEN" and breaker.state == "CLOSED"  # keys are independent
    breaker.force_open()
    with pytest.raises(CircuitOpenError, match="FORCED_OPEN"):
        breaker.acquire()
    breaker.disable()
    for _ in range(10):
        breaker.record(breaker.acquire(), ValueError())
    assert breaker.state == "DISABLED"
    breaker.reset()
    assert breaker.state == "CLOSED"


async def test_breaker_wraps_any_awaitable_and_async_with() -> None:
    clock = Clock()
    breaker = make_breaker(clock, min_calls=2, window=2)
    seen: list[tuple[str, str]] = []
    breaker.on_state_change(lambda b, old, new: seen.append((old, new)))

    async def boom() -> None:
        raise ConnectionError("down")

    for _ in range(2):
        with pytest.raises(ConnectionError):
            await breaker.call(boom)
    with pytest.raises(CircuitOpenError):
        async with breaker:
            raise AssertionError("never runs")
    assert seen == [("CLOSED", "OPEN")]


class ReferenceBreaker:
    """A small model of the count-window breaker, to check the real one against."""

    def __init__(self, window: int, min_calls: int, rate: float, wait: float,
                 trials: int) -> None:
        self.window, self.min_calls, self.rate = window, min_calls, rate
        self.wait, self.trials = wait, trials
        self.state, self.calls = "CLOSED", deque[bool](maxlen=window)
        self.opened, self.started, self.results = 0.0, 0, list[bool]()

    def tick(self, now: float) -> None:
        if self.state == "OPEN" and now - self.opened >= self.wait:
            self.state, self.started, self.results = "HALF_OPEN", 0, []

    def allowed(self, now: float) -> bool:
        self.tick(now)
        if self.state == "CLOSED":
            return True
        if self.state == "HALF_OPEN" and self.started < self.trials:
            self.started += 1
            return True
        return False

    def record(self, now: float, failed: bool) -> None:
        if self.state == "HALF_OPEN":
            self.results.append(failed)
            if len(self.results) >= self.trials:
                bad = sum(self.results) / len(self.results) >= self.rate
                self.state = "OPEN" if bad else "CLOSED"
                self.opened = now if bad else self.opened
                self.calls.clear()
        elif self.state == "CLOSED":
            self.calls.append(failed)
            if len(self.calls) >= self.min_calls and sum(self.calls) / len(
                    self.calls) >= self.rate:
                self.state, self.opened = "OPEN", now


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.sampled_from([0.0, 0.0, 1.0, 6.0])),
                max_size=80))
def test_breaker_matches_a_reference_model(calls: list[tuple[bool, float]]) -> None:
    clock = Clock()
    breaker = CircuitBreaker("model", failure_rate=0.5, window=5, min_calls=3, wait_open=5.0,
                             half_open_calls=2, clock=clock)
    model = ReferenceBreaker(window=5, min_calls=3, rate=0.5, wait=5.0, trials=2)
    for failed, advance in calls:
        clock.now += advance
        expected = model.allowed(clock.now)
        try:
            started = breaker.acquire()
        except CircuitOpenError:
            assert not expected
            continue
        assert expected
        breaker.record(started, ValueError() if failed else None)
        model.record(clock.now, failed)
        assert breaker.state == model.state


# -- Bulkhead, RateLimiter, Fallback -----------------------------------------------------


async def test_bulkhead_caps_concurrency_and_rejects_after_its_wait() -> None:
    bulkhead = Bulkhead("db", max_concurrent=2, max_wait=0.0)
    gate = asyncio.Event()
    peak = 0

    async def hold() -> None:
        nonlocal peak
        peak = max(peak, bulkhead.active)
        await gate.wait()

    holders = [asyncio.create_task(bulkhead.call(hold)) for _ in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(BulkheadFull, match="'db' is full"):
        await bulkhead.call(hold)
    gate.set()
    await asyncio.gather(*holders)
    assert peak == 2 and bulkhead.active == 0 and bulkhead.rejected == 1
    waiting = Bulkhead("db2", max_concurrent=1, max_wait=5.0)
    async with waiting:
        late = asyncio.create_task(waiting.call(asyncio.sleep, 0))
        await asyncio.sleep(0)
    await late  # it waited for the place and got it


async def test_rate_limiter_is_a_token_bucket() -> None:
    clock = Clock()
    limiter = RateLimiter("api", rate=2, per=1.0, clock=clock)
    await limiter.acquire()
    await limiter.acquire()
    with pytest.raises(RateLimited) as refused:
        await limiter.acquire()
    assert refused.value.retry_after == pytest.approx(0.5)  # type: ignore[attr-defined]
    clock.now = 0.5
    await limiter.acquire()
    assert limiter.for_key("a") is limiter.for_key("a")


async def test_fallback_takes_the_next_alternative_and_says_who_served() -> None:
    async def primary(q: str) -> str:
        raise CircuitOpenError("open", breaker="primary", state="OPEN", retry_after=1.0)

    async def secondary(q: str) -> str:
        return ""

    async def cached_answer(q: str) -> str:
        return f"cached:{q}"

    answer = await Fallback([primary, secondary, cached_answer], validate=bool)("q1")
    assert (answer.value, answer.served_by, answer.degraded) == (
        "cached:q1", "cached_answer", True)
    assert [name for name, _ in answer.errors] == ["primary", "secondary"]
    first = await Fallback([cached_answer])("q2")
    assert not first.degraded
    with pytest.raises(FallbackExhausted, match="primary: CircuitOpenError"):
        await Fallback([primary])("q3")
