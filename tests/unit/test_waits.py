"""Durable timers and waits: parked in the store, no coroutine held, fired after restarts."""

from __future__ import annotations

from typing import Any

import pytest

from garrison import Context, Garrison, RunNotFoundError, RunStatus, WorkflowError
from garrison.testing import FakeClock

from ._support import ParkWatch


def timer_app(url: str, clock: FakeClock, marks: list[str],
              watch: ParkWatch | None = None) -> tuple[Garrison, Any]:
    app = Garrison(url, clock=clock, hooks=[watch] if watch else [])

    @app.step()
    async def mark(label: str) -> str:
        marks.append(label)
        return label

    @app.workflow(name="nap")
    async def nap(ctx: Context) -> str:
        await mark("before")
        await ctx.sleep(3600)
        return await mark("after")

    return app, nap


async def test_sleeping_run_is_parked_with_no_coroutine_and_fires_on_time(
    db_url: str, clock: FakeClock
) -> None:
    marks: list[str] = []
    watch = ParkWatch()
    app, nap = timer_app(db_url, clock, marks, watch)
    async with app:
        handle = await app.start(nap, run_id="n")
        await watch.parked("n")
        record = await handle.record()
        assert record.status is RunStatus.WAITING
        assert record.wake_at == pytest.approx(clock.time() + 3600)
        clock.advance(3599)
        assert await handle.status() is RunStatus.WAITING
        clock.advance(1)
        assert await handle.result(timeout=5) == "after"
    assert marks == ["before", "after"]


async def test_timer_that_came_due_while_down_fires_at_once_on_start(
    db_url: str, clock: FakeClock
) -> None:
    marks: list[str] = []
    watch = ParkWatch()
    app, nap = timer_app(db_url, clock, marks, watch)
    async with app:
        await app.start(nap, run_id="n")
        await watch.parked("n")
    clock.advance(7200)  # the process is down while the timer comes due
    app2, _ = timer_app(db_url, clock, marks)
    async with app2:
        assert await app2.handle("n").result(timeout=5) == "after"
    assert marks == ["before", "after"]


def mailbox_app(url: str, clock: FakeClock | None = None,
                watch: ParkWatch | None = None) -> tuple[Garrison, Any]:
    app = Garrison(url, clock=clock, hooks=[watch] if watch else [])

    @app.workflow(name="inbox")
    async def inbox(ctx: Context, count: int) -> list[Any]:
        return [await ctx.wait_for("msg") for _ in range(count)]

    @app.workflow(name="approval")
    async def approval(ctx: Context) -> Any:
        return await ctx.wait_for("approval", timeout=60, default="timed out")

    return app, inbox


async def test_events_sent_before_the_wait_are_kept_and_consumed_in_order(db_url: str) -> None:
    app, inbox = mailbox_app(db_url)
    async with app:
        handle = await app.start(inbox, 3, run_id="i")
        for value in ["a", "b", {"c": 3}]:
            await app.send("i", "msg", value)
        assert await handle.result(timeout=5) == ["a", "b", {"c": 3}]


async def test_event_wakes_a_parked_run(db_url: str) -> None:
    watch = ParkWatch()
    app, inbox = mailbox_app(db_url, watch=watch)
    async with app:
        handle = await app.start(inbox, 1, run_id="i")
        await watch.parked("i")
        assert await handle.status() is RunStatus.WAITING
        await app.send("i", "msg", 42)
        assert await handle.result(timeout=5) == [42]


async def test_wait_survives_restart_and_event_sent_while_down(db_url: str) -> None:
    watch = ParkWatch()
    app, inbox = mailbox_app(db_url, watch=watch)
    async with app:
        await app.start(inbox, 2, run_id="i")
        await app.send("i", "msg", 1)
        await watch.parked("i")
    client = Garrison(db_url, worker=False)
    async with client:
        await client.send("i", "msg", 2)  # nobody executes runs in this process
        assert await client.handle("i").status() is RunStatus.WAITING
    app2, _ = mailbox_app(db_url)
    async with app2:
        assert await app2.handle("i").result(timeout=5) == [1, 2]


async def test_wait_timeout_returns_default_after_restart(db_url: str, clock: FakeClock) -> None:
    watch = ParkWatch()
    app, _ = mailbox_app(db_url, clock, watch)
    async with app:
        handle = await app.start("approval", run_id="a")
        await watch.parked("a")
    clock.advance(61)
    app2, _ = mailbox_app(db_url, clock)
    async with app2:
        assert await app2.handle(handle.run_id).result(timeout=5) == "timed out"


async def test_event_before_timeout_wins(db_url: str, clock: FakeClock) -> None:
    app, _ = mailbox_app(db_url, clock)
    async with app:
        handle = await app.start("approval", run_id="a")
        clock.advance(30)
        await app.send("a", "approval", True)
        assert await handle.result(timeout=5) is True


async def test_sending_to_unknown_run_is_a_clear_error(db_url: str) -> None:
    app, _ = mailbox_app(db_url)
    async with app:
        with pytest.raises(RunNotFoundError, match="no such run"):
            await app.send("nope", "msg", 1)


async def test_sending_to_a_finished_run_is_a_clear_error(db_url: str) -> None:
    app, inbox = mailbox_app(db_url)
    async with app:
        handle = await app.start(inbox, 0, run_id="done")
        await handle.result(timeout=5)
        with pytest.raises(WorkflowError, match="already ended COMPLETED"):
            await app.send("done", "msg", 1)


async def test_fan_out_of_timers_and_steps_parks_once_everything_waits(
    db_url: str, clock: FakeClock
) -> None:
    watch = ParkWatch()
    app = Garrison(db_url, clock=clock, hooks=[watch])
    ran: list[int] = []

    @app.step()
    async def work(i: int) -> int:
        ran.append(i)
        return i

    @app.workflow(name="mixed")
    async def mixed(ctx: Context) -> list[int]:
        import asyncio

        async def branch(i: int) -> int:
            await work(i)
            await ctx.sleep(10 * (i + 1))
            return await work(i + 100)

        return list(await asyncio.gather(*(branch(i) for i in range(3))))

    async with app:
        handle = await app.start(mixed, run_id="m")
        await watch.parked("m")
        assert (await handle.record()).wake_at == pytest.approx(clock.time() + 10)
        clock.advance(30)
        assert await handle.result(timeout=5) == [100, 101, 102]
    assert sorted(ran) == [0, 1, 2, 100, 101, 102]
