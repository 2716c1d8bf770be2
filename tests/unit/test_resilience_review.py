"""Review of the resilience package: tests that fail because of real bugs."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from garrison import Context, Garrison, RunStatus, WorkflowFailed
from garrison.resilience import Child, CircuitBreaker, Retry, RetryBudget, Supervisor
from garrison.resilience._breaker import CLOSED, HALF_OPEN, OPEN
from garrison.testing import FakeClock

from ._support import ParkWatch


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
    for _ in range(5):
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


def test_a_retried_call_that_succeeds_gives_back_its_retry_cost() -> None:
    """botocore's retry quota (which `RetryBudget` says it follows) gives back the cost of
    the retry when a *retried* request succeeds (`release_retry_quota`: the capacity
    acquired for it), and only `NO_RETRY_INCREMENT` (1) for a first-try success. Here a
    retry costs 5 and its success returns 1: after an outage the bucket refills five
    times slower than botocore's and retries stay off long after the dependency is back.

    Why: _retry.py `Retry.succeeded` -> `RetryBudget.refund` always adds `refund`
    (1 token) and the engine (_execution.py `_run_step_live`, `succeeded()`) does not
    say whether the success followed a retry. Fix: pass the attempt number / tokens
    paid to `succeeded(attempt)` and refund what the retries of that call withdrew
    (capped at capacity), `refund` otherwise.
    """
    budget = RetryBudget("review-refund", capacity=10, retry_cost=5)
    budget.reset()
    retry = Retry(max_attempts=2, budget=budget, random=lambda: 0.0)
    assert retry.delay_s(1, ConnectionError("blip")) is not None  # one retry: pays 5
    assert budget.tokens == 5
    retry.succeeded(2)  # ... and the retried call succeeded (attempt 2)
    assert budget.tokens == 10
    retry.delay_s(1, ConnectionError("blip"))
    retry.succeeded(1)  # a first-try success gives back only `refund`
    assert budget.tokens == 6


async def _status(app: Garrison, run_id: str) -> RunStatus | None:
    run = await app.store.get_run(run_id)
    return run.status if run is not None else None


async def _until(app: Garrison, run_id: str, ok: Any, timeout: float = 8.0) -> RunStatus:
    async with asyncio.timeout(timeout):
        while True:
            found = await _status(app, run_id)
            if found is not None and ok(found):
                return found
            await asyncio.sleep(0.01)


async def test_one_for_all_never_restarts_a_temporary_sibling(db_url: str) -> None:
    """OTP: "a temporary child process is never restarted (even when the supervisor's
    restart strategy is rest_for_one or one_for_all and a sibling's death causes the
    temporary process to be terminated)". Here the permanent child `a` crashes, the
    supervisor stops the temporary `x` and then starts it again as `x#2`.

    Why: _supervisor.py `_Tree.restart`: `for target in sorted({index, *order}):
    await self.start(target)` restarts every stopped sibling whatever its restart type.
    Fix: stop every sibling in `order`, but start again only those whose `restart` is not
    "temporary" (OTP also drops a temporary child from the tree when it is stopped).
    """
    app = Garrison(db_url)

    @app.workflow(name="agent")
    async def agent(ctx: Context, label: str) -> str:
        command = await ctx.wait_for("cmd")
        if command == "crash":
            raise RuntimeError(f"{label} crashed")
        return f"{label}:{command}"

    tree = Supervisor("all", [Child(agent, ("a",), name="a"),
                              Child(agent, ("x",), name="x", restart="temporary")],
                      strategy="one_for_all")
    async with app:
        await app.start(tree, run_id="t")  # type: ignore[arg-type]
        await _until(app, "t/x#1", lambda s: True)
        await app.send("t/a#1", "cmd", "crash")
        await _until(app, "t/a#2", lambda s: True)
        assert await _until(app, "t/x#1", lambda s: s.is_terminal) is RunStatus.CANCELLED
        await asyncio.sleep(0.2)
        assert await app.store.get_run("t/x#2") is None, "a temporary child was restarted"
        await app.cancel("t")


async def test_a_step_timeout_counts_as_a_failure_in_the_steps_breaker(db_url: str) -> None:
    """A step whose attempts time out (`timeout=`) against a hanging dependency never
    opens its breaker: the timeout cancels the attempt inside `breaker.call`, which
    records the cancellation as a success.

    Why: _execution.py `_attempt` runs the guards inside `asyncio.timeout(limit)`; the
    expiry reaches _breaker.py `call` as CancelledError -> `record(started, None)`.
    resilience4j counts a TimeoutException as a failure (and a slow call).
    Fix: let `_attempt` report the expiry to the breaker as the `DeadlineExceeded` it
    raises (e.g. convert inside the guard chain: wrap `invoke` in the timeout and the
    guards around it), and record nothing for other cancellations.
    """
    breaker = CircuitBreaker("review-hang", min_calls=2, window=2, wait_open=60)
    app = Garrison(db_url)

    @app.step(name="hang", breaker=breaker, timeout=0.05)
    async def hang() -> None:
        await asyncio.sleep(3600)

    @app.workflow(name="w", quarantine=False)
    async def w(ctx: Context) -> None:
        await hang()

    async with app:
        for run_id in ("r1", "r2"):
            await app.start(w, run_id=run_id)  # type: ignore[arg-type]
            assert await _until(app, run_id, lambda s: s.is_terminal) is RunStatus.FAILED
    assert breaker.state == OPEN


async def test_remaining_read_by_workflow_code_replays_identically(db_url: str) -> None:
    """docs/resilience.md invites workflow code to read `garrison.remaining()`, but the
    value is the live clock's, not a journaled one: a workflow that decides on it
    ("enough time left? the thorough path, else the quick one") takes the other branch
    when it replays after a sleep, and the run dies with NonDeterminismError.

    Why: _context.py `remaining()` -> _execution.py `RunExecution.remaining()` reads
    `self.worker.clock.time()` with no journal entry. Fix: inside workflow code, answer
    from the journal (journal the clock read like `ctx.now()`, e.g. a NOW entry, and
    return `deadline_at - journaled_now`), keeping the live value for step bodies and
    for bounding attempts.
    """
    from garrison import remaining

    clock = FakeClock()
    watch = ParkWatch()
    app = Garrison(db_url, clock=clock, hooks=[watch])
    took: list[str] = []

    @app.step(name="thorough")
    async def thorough() -> str:
        took.append("thorough")
        return "thorough"

    @app.step(name="quick")
    async def quick() -> str:
        took.append("quick")
        return "quick"

    @app.workflow(name="w", timeout=100)
    async def w(ctx: Context) -> str:
        left = remaining()
        path = await (thorough() if left is not None and left > 50 else quick())
        await ctx.sleep(60)
        return path

    async with app:
        handle = await app.start(w, run_id="r")  # type: ignore[arg-type]
        await watch.parked("r", timeout_s=8)  # in its sleep (a fixed wait could flake)
        assert took == ["thorough"]
        clock.advance(60)
        assert await handle.result(timeout=8) == "thorough"


async def test_redrive_of_a_run_quarantined_in_a_retry_wait_runs_the_step_at_once(
    db_url: str,
) -> None:
    """A run whose deadline passes while a step waits in its retry backoff ends
    QUARANTINED with the step's PENDING entry (attempts, fire_at, error) left in the
    journal. `redrive` deletes only FAILED step entries, so the redriven run goes back to
    the old backoff: it waits out the rest of the old `fire_at` (here 95 s more) and
    counts on from the old attempts, although ADR 0008 / docs promise that "failed
    steps run again" with "a fresh attempt count".

    Why: _rows.py `REDRIVE_FORGET_FAILED` deletes `status = 'failed'` step entries only;
    _execution.py `call_step` treats the left PENDING step entry as "in backoff".
    Fix: also delete PENDING entries of kind 'step' on redrive (a retry wait is a failed
    attempt), in both stores.
    """
    clock = FakeClock()
    app = Garrison(db_url, clock=clock)
    calls: list[float] = []

    @app.step(name="flaky", retry=Retry(max_attempts=3, base=100, cap=100,
                                        random=lambda: 1.0))
    async def flaky() -> str:
        calls.append(clock.time())
        if len(calls) == 1:
            raise ConnectionError("down")
        return "up"

    @app.workflow(name="w", timeout=5)
    async def w(ctx: Context) -> str:
        return await flaky()

    async with app:
        await app.start(w, run_id="r")  # type: ignore[arg-type]
        async with asyncio.timeout(8):
            while not calls:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # journaled its retry wait and parked
        clock.advance(6)  # past the run's deadline
        assert await _until(app, "r", lambda s: s.is_terminal) is RunStatus.QUARANTINED
        await app.redrive("r")
        async with asyncio.timeout(3):
            while len(calls) < 2:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        assert await app.handle("r").result(timeout=5) == "up"


async def test_redrive_of_a_run_reading_remaining_keeps_its_journal_positions(
        db_url: str) -> None:
    """remaining() journaled its clock read only while the run had a deadline; redrive
    lifts the deadline, so the redriven replay took no position for it and every later
    operation moved by one: NonDeterminismError instead of continuing after the fix."""
    from garrison import remaining

    app = Garrison(db_url)
    state = {"broken": True, "charges": 0}

    @app.step(name="charge")
    async def charge(budget_s: float | None) -> str:
        state["charges"] += 1
        return "receipt"

    @app.step(name="notify")
    async def notify(receipt: str) -> str:
        if state["broken"]:
            raise RuntimeError("mail server down")
        return "sent"

    @app.workflow(name="refund", timeout=600)
    async def refund(ctx: Context) -> str:
        return await notify(await charge(remaining()))

    async with app:
        handle = await app.start(refund, run_id="r")  # type: ignore[arg-type]
        with pytest.raises(WorkflowFailed):
            await handle.result(timeout=8)
        state["broken"] = False
        await app.redrive("r")
        assert await handle.result(timeout=8) == "sent"
    assert state["charges"] == 1
