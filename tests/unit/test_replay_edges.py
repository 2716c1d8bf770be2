"""Review: replay must see what the live run saw; completed steps never run again."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from typing import Any

import pytest

from garrison import Context, EngineHooks, Garrison, RunStatus, StepInfo
from garrison.testing import FakeClock
from tests.unit._support import ParkWatch


async def test_step_after_a_timed_out_step_is_still_journaled(db_url: str) -> None:
    app = Garrison(db_url)
    effects: Counter[str] = Counter()

    @app.step()
    async def slow() -> None:
        await asyncio.sleep(30)

    @app.step()
    async def charge() -> str:
        effects["charge"] += 1
        return "receipt"

    @app.workflow(name="w")
    async def w(ctx: Context) -> str:
        try:
            async with asyncio.timeout(0.01):
                await slow()
        except TimeoutError:
            pass
        return await charge()

    async with app:
        assert await (await app.start(w, run_id="w")).result(timeout=5) == "receipt"
        names = [e.name for e in await app.store.load_journal("w")]
    assert names == ["charge"]  # got []: charge ran as a plain call, never journaled


class PaymentDeclined(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(f"card declined with code {code}")
        self.code = code


async def test_caught_step_error_has_the_same_attributes_on_replay(
    db_url: str, clock: FakeClock
) -> None:
    watch = ParkWatch()
    app = Garrison(db_url, clock=clock, hooks=[watch])

    @app.step()
    async def pay() -> None:
        raise PaymentDeclined(51)

    @app.workflow(name="w")
    async def w(ctx: Context) -> Any:
        try:
            await pay()
        except PaymentDeclined as exc:
            code = exc.code
        await ctx.sleep(10)  # park: the rest runs in a replay
        return code

    async with app:
        handle = await app.start(w, run_id="w")
        await watch.parked("w")
        clock.advance(10)
        assert await handle.result(timeout=5) == 51  # got 'card declined with code 51'


class SpawningHook(EngineHooks):
    """An observability hook that exports asynchronously (a task per finished step)."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[None]] = set()

    def step_completed(self, step: StepInfo, duration_s: float) -> None:
        task = asyncio.get_running_loop().create_task(asyncio.sleep(0))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


async def test_a_hook_that_creates_a_task_does_not_shift_positions(
    db_url: str, clock: FakeClock
) -> None:
    watch = ParkWatch()
    effects: Counter[str] = Counter()
    app = Garrison(db_url, clock=clock, hooks=[watch, SpawningHook()])

    @app.step()
    async def work(i: int) -> int:
        effects[f"work{i}"] += 1
        return i

    @app.workflow(name="w")
    async def w(ctx: Context) -> list[int]:
        a = await work(1)
        b = await work(2)
        await ctx.sleep(10)  # park: the rest runs in a replay
        return [a, b]

    async with app:
        handle = await app.start(w, run_id="w")
        await watch.parked("w")
        clock.advance(10)
        with contextlib.suppress(Exception):
            await handle.result(timeout=5)
        status = await handle.status()
    # got work2 == 2: on replay work(2) sits at position 2, where live it was at 3 (the
    # hook's task took 2), so it ran again; then the run failed with NonDeterminismError
    assert effects == Counter({"work1": 1, "work2": 1})
    assert status is RunStatus.COMPLETED


async def test_task_group_replay_does_not_consume_an_event_the_live_run_left(
    db_url: str,
) -> None:
    watch = ParkWatch()
    app = Garrison(db_url, hooks=[watch])

    @app.step()
    async def boom() -> None:
        raise ValueError("no")

    @app.workflow(name="w")
    async def w(ctx: Context) -> Any:
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(boom())
                group.create_task(ctx.wait_for("x"))
        except* ValueError:
            pass
        return await ctx.wait_for("x")

    async with app:
        handle = await app.start(w, run_id="w")
        await watch.parked("w")
        await app.send("w", "x", "yes")
        with contextlib.suppress(Exception):
            assert await handle.result(timeout=3) == "yes"
        events = await app.store.list_events("w")
    # got: 'x' consumed at position "2.1" (the cancelled sibling), and the run waits forever
    assert [e.consumed_position for e in events] == ["3"]


async def test_no_step_runs_live_after_nondeterminism_is_detected(db_url: str) -> None:
    effects: Counter[str] = Counter()
    watch = ParkWatch()

    def build(version_two: bool) -> tuple[Garrison, Any]:
        app = Garrison(db_url, hooks=[watch])

        @app.step()
        async def reserve() -> None:
            effects["reserve"] += 1

        @app.step()
        async def charge_card() -> None:
            effects["charge_card"] += 1

        @app.step()
        async def refund() -> None:
            effects["refund"] += 1

        @app.workflow(name="w")
        async def w(ctx: Context) -> None:
            if not version_two:
                await reserve()
                await ctx.wait_for("go")
                return
            try:  # noqa: SIM105  # the shape of user code under review
                await charge_card()  # journal holds 'reserve' here
            except Exception:
                pass  # a generic handler, as agent code often has
            await ctx.wait_for("go")  # matches the journal again
            await refund()  # a new position: runs live although the run is doomed

        return app, w

    app, w = build(False)
    async with app:
        await app.start(w, run_id="w")
        await watch.parked("w")
    app2, _ = build(True)
    async with app2:
        await app2.send("w", "go")
        with pytest.raises(Exception, match=r"NonDeterminism|journal has"):
            await app2.handle("w").result(timeout=5)
    assert effects["refund"] == 0
