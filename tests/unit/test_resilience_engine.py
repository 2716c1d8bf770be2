"""Resilience policies attached to steps and workflows, through the engine."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import pytest

from garrison import (
    CircuitOpenError,
    Context,
    DeadlineExceeded,
    Garrison,
    RunStatus,
    WorkflowError,
    WorkflowFailed,
    remaining,
)
from garrison.resilience import CircuitBreaker, Fallback, Retry, RetryBudget
from garrison.store import StepStatus
from garrison.testing import FakeClock

from ._support import ParkWatch


async def test_retry_wait_is_durable_and_the_attempt_count_survives_a_restart(
    db_url: str, clock: FakeClock,
) -> None:
    calls: list[int] = []
    second_failed = asyncio.Event()
    retry = Retry(max_attempts=5, base=10.0, cap=10.0, random=lambda: 1.0)

    def build(watch: ParkWatch | None = None) -> Garrison:
        app = Garrison(db_url, clock=clock, hooks=(watch,) if watch else ())

        @app.step(name="flaky", retry=retry)
        async def flaky() -> str:
            calls.append(len(calls) + 1)
            if len(calls) < 3:
                if len(calls) == 2:
                    second_failed.set()
                raise ConnectionError(f"down #{len(calls)}")
            return "up"

        @app.workflow(name="w")
        async def w(ctx: Context) -> str:
            return await flaky()

        return app

    watch = ParkWatch()
    app = build(watch)
    async with app:
        await app.start("w", run_id="r")  # type: ignore[arg-type]
        await watch.parked("r")  # parked in its backoff: no coroutine held
        [entry] = await app.store.load_journal("r")
        assert (entry.status, entry.attempts) == (StepStatus.PENDING, 1)
        assert entry.fire_at == clock.time() + 10.0 and "down #1" in (entry.error or "")
    again = build()
    async with again:  # a restart during the backoff: the wait goes on, the count stays
        clock.advance(10.0)
        await asyncio.wait_for(second_failed.wait(), 10)
        await asyncio.sleep(0.1)  # its retry wait is journaled before time moves on
        clock.advance(10.0)
        assert await again.handle("r").result(timeout=10) == "up"
        [entry] = await again.store.load_journal("r")
    assert calls == [1, 2, 3] and (entry.status, entry.attempts) == (StepStatus.COMPLETED, 3)


async def test_a_failed_run_is_quarantined_and_redrive_continues_it(db_url: str) -> None:
    app = Garrison(db_url)
    broken = True
    ran: list[str] = []

    @app.step(name="reserve")
    async def reserve() -> str:
        ran.append("reserve")
        return "held"

    @app.step(name="charge")
    async def charge() -> str:
        ran.append("charge")
        if broken:
            raise PermissionError("card declined by a bad config")
        return "paid"

    @app.workflow(name="order")
    async def order(ctx: Context) -> str:
        return f"{await reserve()}+{await charge()}"

    async with app:
        handle = await app.start(order, run_id="o1")
        with pytest.raises(WorkflowFailed, match=r"QUARANTINED.*app\.redrive"):
            await handle.result(timeout=10)
        run = await handle.record()
        assert run.status is RunStatus.QUARANTINED and run.inputs  # inputs and error kept
        assert "card declined" in (run.error or "")
        broken = False  # the fix
        again = await app.redrive("o1")
        assert await again.result(timeout=10) == "held+paid"
        with pytest.raises(WorkflowError, match="only a QUARANTINED run"):
            await app.redrive("o1")
    assert ran == ["reserve", "charge", "charge"]  # the completed step did not run again


async def test_quarantine_false_ends_failed(db_url: str) -> None:
    app = Garrison(db_url)

    @app.workflow(name="w", quarantine=False)
    async def w(ctx: Context) -> None:
        raise ValueError("no")

    async with app:
        handle = await app.start(w)
        with pytest.raises(WorkflowFailed):
            await handle.result(timeout=10)
        assert await handle.status() is RunStatus.FAILED
        with pytest.raises(WorkflowError, match="it is FAILED"):
            await app.redrive(handle.run_id)


async def test_step_timeout_cancels_the_attempt_and_retry_covers_it(db_url: str) -> None:
    app = Garrison(db_url)
    attempts: list[float] = []

    @app.step(name="slow", timeout=0.05, retry=Retry(max_attempts=3, base=0.0,
                                                     retry_on=(TimeoutError,)))
    async def slow() -> str:
        attempts.append(time.monotonic())
        if len(attempts) == 1:
            await asyncio.sleep(30)  # hangs: cancelled by the timeout
        return "ok"

    @app.step(name="hangs", timeout=0.05)
    async def hangs() -> None:
        await asyncio.sleep(30)

    @app.workflow(name="w")
    async def w(ctx: Context) -> str:
        first = await slow()
        try:
            await hangs()
        except DeadlineExceeded as exc:
            return f"{first}/{type(exc).__name__}"
        return "unreachable"

    async with app:
        assert await (await app.start(w)).result(timeout=10) == "ok/DeadlineExceeded"
    assert len(attempts) == 2


async def test_run_deadline_is_seen_by_steps_and_ends_the_run(db_url: str,
                                                                clock: FakeClock) -> None:
    app = Garrison(db_url, clock=clock)
    seen: list[float | None] = []
    both_looked = asyncio.Event()

    @app.step(name="look")
    async def look() -> None:
        seen.append(remaining())
        if len(seen) == 2:
            both_looked.set()

    @app.workflow(name="child")
    async def child(ctx: Context) -> None:
        await look()

    @app.workflow(name="w", timeout=60)
    async def w(ctx: Context) -> None:
        await look()
        await (await ctx.start_child(child)).result()
        await ctx.sleep(3600)  # longer than the deadline

    async with app:
        handle = await app.start(w)
        # both steps ran before the clock moves (a fixed wait flaked under load)
        await asyncio.wait_for(both_looked.wait(), timeout=10)
        clock.advance(61)
        with pytest.raises(WorkflowFailed, match="DeadlineExceeded"):
            await handle.result(timeout=10)
        assert await handle.status() is RunStatus.QUARANTINED
    assert seen == [60.0, 60.0]  # the child inherited the parent's deadline
    assert remaining() is None  # outside a run


async def test_an_open_breaker_makes_steps_fail_fast_without_calling(db_url: str) -> None:
    app = Garrison(db_url)
    breaker = CircuitBreaker("dep-fast", failure_rate=0.5, window=4, min_calls=4,
                             wait_open=60.0)
    called = 0

    @app.step(name="call_dep", breaker=breaker)
    async def call_dep() -> None:
        nonlocal called
        called += 1
        raise ConnectionError("down")

    @app.workflow(name="w", quarantine=False)
    async def w(ctx: Context) -> str:
        try:
            await call_dep()
        except CircuitOpenError:
            return "refused"
        except ConnectionError:
            return "failed"
        return "ok"

    async with app:
        outcomes = [await (await app.start(w)).result(timeout=10) for _ in range(10)]
    assert outcomes == ["failed"] * 4 + ["refused"] * 6
    assert called == 4 and breaker.state == "OPEN"


async def test_cascade_breaker_and_budget_bound_the_calls_to_a_failing_dependency(
    db_url: str,
) -> None:
    """A dependency down for its first 300 calls; 120 runs call it at once. Plain
    retries keep hammering it; a breaker + retry budget + fallback send a bounded number
    of calls and every run still finishes (degraded where the dependency was down)."""
    async def scenario(protected: bool) -> tuple[int, list[Any]]:
        calls = 0

        async def dependency() -> str:
            nonlocal calls
            calls += 1
            await asyncio.sleep(0.005)
            if calls <= 300:  # down until it has refused 300 calls
                raise ConnectionError("dependency down")
            return "fresh"

        app = Garrison(db_url.replace(".db", f"-{protected}.db"))
        budget = RetryBudget(f"cascade-{protected}-{db_url}", capacity=50, retry_cost=5)
        breaker = CircuitBreaker(f"cascade-{protected}", failure_rate=0.5, window=20,
                                 min_calls=10, wait_open=0.5, half_open_calls=3)
        retry = Retry(max_attempts=6, base=0.05, cap=0.2,
                      budget=budget if protected else None)

        @app.step(name="ask", retry=retry, breaker=breaker if protected else None)
        async def ask() -> str:
            return await dependency()

        @app.step(name="cached")
        async def cached() -> str:
            return "cached"

        @app.workflow(name="w", quarantine=False)
        async def w(ctx: Context) -> str:
            if not protected:
                return await ask()
            served = await Fallback([ask, cached])()
            return served.value

        async with app:
            handles = [await app.start(w) for _ in range(120)]
            results = []
            for handle in handles:
                try:
                    results.append(await handle.result(timeout=60))
                except WorkflowFailed:
                    results.append("lost")
        return calls, results

    plain_calls, _ = await scenario(protected=False)
    guarded_calls, guarded = await scenario(protected=True)
    print(f"\ncascade: dependency calls plain={plain_calls} protected={guarded_calls}; "
          f"degraded={guarded.count('cached')}/120")
    assert "lost" not in guarded and set(guarded) <= {"fresh", "cached"}
    assert guarded_calls * 2 < plain_calls  # the breaker and budget bound the storm
    assert plain_calls >= 300  # without them, retries ran into all 300 refusals


async def test_reliability_figures_come_from_the_store(db_url: str) -> None:
    from garrison.resilience import reliability

    app = Garrison(db_url)
    tries: dict[int, int] = {}

    @app.step(name="call", retry=Retry(max_attempts=3, base=0.0))
    async def call(i: int) -> int:
        tries[i] = tries.get(i, 0) + 1
        if i % 4 == 0 or (i % 2 == 0 and tries[i] < 2):
            raise ConnectionError("flaky")  # i % 4 == 0 always fails; other evens once
        return i

    @app.workflow(name="job")
    async def job(ctx: Context, i: int) -> int:
        return await call(i)

    async with app:
        for i in range(8):
            with contextlib.suppress(WorkflowFailed):
                await (await app.start(job, i)).result(timeout=10)
        figures = await reliability(app.store)
    job_figures, call_figures = figures.workflows["job"], figures.steps["call"]
    assert job_figures.runs == 8 and job_figures.by_status == {"COMPLETED": 6, "QUARANTINED": 2}
    assert job_figures.success_rate == 0.75
    assert (call_figures.completed, call_figures.failed) == (6, 2)
    assert call_figures.retries == 2 * 2 + 2  # two always-failing (2 retries), two flaky (1)
    assert call_figures.success_rate == 0.75


async def test_postgres_a_breaker_opened_by_one_worker_opens_on_the_others() -> None:
    from tests.pg import fresh_postgres_url

    url = fresh_postgres_url()
    calls: dict[str, int] = {"w1": 0, "w2": 0}

    def worker(name: str) -> tuple[Garrison, CircuitBreaker]:
        app = Garrison(url, worker_id=name)
        breaker = CircuitBreaker("shared-dep", failure_rate=0.5, window=4, min_calls=4,
                                 wait_open=60.0)  # each process has its own object

        @app.step(name="call_dep", breaker=breaker)
        async def call_dep() -> None:
            calls[name] += 1
            raise ConnectionError("down")

        @app.workflow(name=f"w-{name}", quarantine=False)
        async def flow(ctx: Context) -> str:
            try:
                await call_dep()
            except CircuitOpenError:
                return "refused"
            except ConnectionError:
                return "failed"
            return "ok"

        return app, breaker

    (first, first_breaker), (second, second_breaker) = worker("w1"), worker("w2")
    async with first, second:
        for _ in range(4):
            await (await first.start("w-w1")).result(timeout=10)  # type: ignore[arg-type]
        assert first_breaker.state == "OPEN"
        async with asyncio.timeout(5):  # the decision reaches the other worker
            while second_breaker.state != "OPEN":  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        outcome = await (await second.start("w-w2")).result(timeout=10)  # type: ignore[arg-type]
    assert outcome == "refused" and calls == {"w1": 4, "w2": 0}


async def test_a_rate_limiter_on_a_step_keeps_its_bucket_in_the_store(db_url: str) -> None:
    from garrison.errors import RateLimited
    from garrison.resilience import RateLimiter

    app = Garrison(db_url)
    limiter = RateLimiter("shared-api", rate=2, per=3600.0)  # 2 an hour, no waiting

    @app.step(name="call_api", rate_limiter=limiter)
    async def call_api() -> str:
        return "ok"

    @app.workflow(name="w", quarantine=False)
    async def w(ctx: Context) -> str:
        try:
            return await call_api()
        except RateLimited:
            return "limited"

    async with app:
        outcomes = [await (await app.start(w)).result(timeout=10) for _ in range(3)]
        waits = await app.store.take_token("shared-api", rate_per_s=2 / 3600, burst=2)
    assert outcomes == ["ok", "ok", "limited"]
    if app.store.fleet:  # PostgreSQL: the bucket is in the store, every worker sees it spent
        assert waits > 0
    else:  # SQLite: one worker; the limiter counts in the process, the store's is untouched
        assert waits == 0.0


async def test_postgres_a_retry_budget_on_a_step_is_one_budget_for_the_fleet() -> None:
    from tests.pg import fresh_postgres_url

    url = fresh_postgres_url()
    attempts: dict[str, int] = {"w1": 0, "w2": 0}

    def worker(name: str) -> Garrison:
        app = Garrison(url, worker_id=name)
        budget = RetryBudget(f"fleet-budget-{url}", capacity=10, retry_cost=5)

        @app.step(name="call", retry=Retry(max_attempts=5, base=0.0, budget=budget))
        async def call() -> None:
            attempts[name] += 1
            raise ConnectionError("down")

        @app.workflow(name=f"w-{name}", quarantine=False)
        async def flow(ctx: Context) -> None:
            await call()

        return app

    first, second = worker("w1"), worker("w2")
    async with first, second:
        with pytest.raises(WorkflowFailed):
            await (await first.start("w-w1")).result(timeout=10)  # type: ignore[arg-type]
        with pytest.raises(WorkflowFailed):
            await (await second.start("w-w2")).result(timeout=10)  # type: ignore[arg-type]
    # 10 tokens pay two retries in the whole fleet: w1 made 1 + 2 attempts, w2 only 1.
    assert attempts == {"w1": 3, "w2": 1}


async def test_postgres_a_bulkhead_on_a_step_holds_across_the_fleet() -> None:
    from garrison import BulkheadFull
    from garrison.resilience import Bulkhead
    from tests.pg import fresh_postgres_url

    url = fresh_postgres_url()
    active = peak = 0
    release = asyncio.Event()

    def worker(name: str) -> Garrison:
        app = Garrison(url, worker_id=name)
        bulkhead = Bulkhead("fleet-db", max_concurrent=2, max_wait=0.0)  # one per process

        @app.step(name="query", bulkhead=bulkhead)
        async def query() -> str:
            nonlocal active, peak
            active += 1
            peak = max(peak, active)
            await release.wait()
            active -= 1
            return "rows"

        @app.workflow(name=f"w-{name}", quarantine=False)
        async def flow(ctx: Context) -> str:
            try:
                return await query()
            except BulkheadFull:
                return "full"

        return app

    first, second = worker("w1"), worker("w2")
    async with first, second:
        handles = []
        for app, name in ((first, "w1"), (second, "w2")) * 3:
            handles.append(await app.start(f"w-{name}"))  # type: ignore[arg-type]
        async with asyncio.timeout(10):
            while active < 2:  # noqa: ASYNC110  # the places fill up
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)  # the others find the bulkhead full
        release.set()
        outcomes = [await h.result(timeout=10) for h in handles]
    assert peak == 2  # never more than 2 in the whole fleet
    assert sorted(outcomes) == ["full"] * 4 + ["rows"] * 2


def test_breaker_figures_count_opens_time_open_and_recoveries() -> None:
    from garrison.resilience._metrics import _breaker_figures

    history = [("dep", "OPEN", 100.0), ("dep", "OPEN", 101.0),  # a second worker agreeing
               ("dep", "CLOSED", 130.0), ("dep", "FORCED_OPEN", 200.0),
               ("dep", "CLOSED", 210.0), ("dep", "OPEN", 300.0),
               ("other", "DISABLED", 50.0)]
    figures = _breaker_figures(history, now=320.0)
    dep = figures["dep"]
    assert (dep.opens, dep.recoveries, dep.state) == (3, 2, "OPEN")
    assert dep.time_open_s == 30.0 + 10.0 + 20.0  # the open spell still running counts
    assert dep.mean_time_to_recovery_s == 20.0
    assert figures["other"].opens == 0


async def test_a_shared_breakers_opening_and_recovery_are_in_the_figures(db_url: str) -> None:
    from garrison.resilience import reliability

    app = Garrison(db_url)
    breaker = CircuitBreaker("figures-dep", failure_rate=0.5, window=2, min_calls=2,
                             wait_open=0.2, half_open_calls=1)
    healthy = False

    @app.step(name="call_dep", breaker=breaker)
    async def call_dep() -> str:
        if not healthy:
            raise ConnectionError("down")
        return "up"

    @app.workflow(name="w", quarantine=False)
    async def w(ctx: Context) -> str:
        try:
            return await call_dep()
        except (ConnectionError, CircuitOpenError):
            return "no"

    async with app:
        for _ in range(2):
            await (await app.start(w)).result(timeout=10)
        assert breaker.state == "OPEN"
        await asyncio.sleep(0.3)  # the wait is over: a trial goes through
        healthy = True
        assert await (await app.start(w)).result(timeout=10) == "up"
        assert breaker.state == "CLOSED"
        await asyncio.sleep(0.2)  # the decisions are published in the background
        figures = (await reliability(app.store)).breakers["figures-dep"]
    assert (figures.opens, figures.recoveries, figures.state) == (1, 1, "CLOSED")
    assert figures.mean_time_to_recovery_s is not None
    assert figures.mean_time_to_recovery_s >= 0.2


async def test_a_poison_run_is_quarantined_and_never_blocks_its_queue(db_url: str) -> None:
    app = Garrison(db_url)
    app.queue("serial", concurrency=1)

    @app.workflow(name="job")
    async def job(ctx: Context, payload: str) -> str:
        if payload == "poison":
            raise ValueError("cannot parse the message")
        return payload.upper()

    async with app:
        poison = await app.start(job, "poison", queue="serial")
        good = await app.start(job, "fine", queue="serial")
        assert await good.result(timeout=10) == "FINE"
        assert await poison.status() is RunStatus.QUARANTINED


@pytest.mark.parametrize("child_first", [False, True])
async def test_redriving_a_run_whose_child_failed_continues_the_child_too(
        db_url: str, child_first: bool) -> None:
    app = Garrison(db_url, poll_interval_s=0.01)
    broken = {"carrier": True, "customs": True}

    @app.step()
    async def call(service: str) -> str:
        if broken[service]:
            raise RuntimeError(f"{service} API down")
        return f"{service} ok"

    @app.workflow(name="customs")
    async def customs(ctx: Context) -> str:
        return await call("customs")

    @app.workflow(name="shipping")
    async def shipping(ctx: Context) -> list[str]:
        child = await ctx.start_child(customs, run_id="order/customs")
        return [await call("carrier"), await child.result()]

    @app.workflow(name="fulfil")
    async def fulfil(ctx: Context) -> list[str]:
        return await (await ctx.start_child(shipping, run_id="order/shipping")).result()

    async with app:
        handle = await app.start(fulfil, run_id="order")
        with pytest.raises(WorkflowFailed):
            await handle.result(timeout=10)
        for run_id in ("order", "order/shipping", "order/customs"):
            assert await app.handle(run_id).status() is RunStatus.QUARANTINED
        broken.update(carrier=False, customs=False)  # the fix is deployed
        if child_first:
            assert await (await app.redrive("order/shipping")).result(timeout=10) == [
                "carrier ok", "customs ok"]
        await app.redrive("order")
        assert await handle.result(timeout=10) == ["carrier ok", "customs ok"]
