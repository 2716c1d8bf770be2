"""Review: parking, wake-ups, cancellation, children, and the ownership of branch tasks."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from garrison import (
    Context,
    EngineHooks,
    Garrison,
    ResultTimeoutError,
    RunStatus,
    StepRecord,
    WorkflowCancelled,
    WorkflowFailed,
)
from garrison.store._sqlite import SQLiteStore, _GroupCommit
from garrison.testing import FakeClock
from tests.unit._support import Crash, ParkWatch


class _HeldCommit(_GroupCommit):
    """Group commit that can hold back one write, as a slow fsync would."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.hold_next = False
        self.held: list[tuple[Any, asyncio.Future[Any]]] = []

    def submit(self, op: Callable[..., Any], **kwargs: Any) -> asyncio.Future[Any]:
        if not self.hold_next:
            return super().submit(op, **kwargs)
        self.hold_next = False
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.held.append((op, future))
        return future

    def release(self) -> None:
        self._ops.extend(self.held)
        self.held.clear()
        self.flush()


class SlowParkStore(SQLiteStore):
    """The park write is queued but not yet committed until the test says so."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.parking = asyncio.Event()

    async def open(self) -> None:
        await super().open()
        assert self._conn is not None
        self._writer = _HeldCommit(self._conn, self.path)

    @property
    def held_writer(self) -> _HeldCommit:
        assert isinstance(self._writer, _HeldCommit)
        return self._writer

    async def park_run(self, run_id: str, wake_at: float | None, events: Sequence[str], *,
                       now: float | None = None) -> None:
        self.held_writer.hold_next = True
        self.parking.set()
        await super().park_run(run_id, wake_at, events, now=now)


async def test_cancel_while_the_run_is_parking_still_cancels_it(db_url: str) -> None:
    store = SlowParkStore(db_url)
    app = Garrison(store=store)

    @app.workflow(name="w")
    async def w(ctx: Context) -> Any:
        return await ctx.wait_for("approval")

    async with app:
        handle = await app.start(w, run_id="w")
        await store.parking.wait()
        await handle.cancel()  # request committed; the live execution is cancelled
        store.held_writer.release()  # the queued park write commits
        with contextlib.suppress(ResultTimeoutError, WorkflowCancelled):
            await handle.result(timeout=2)
        record = await handle.record()
    # got WAITING, cancel_requested=True, wake_at=None: nothing will ever wake it
    assert record.status is RunStatus.CANCELLED


class SendDuringWaitSetup(SQLiteStore):
    """Delivers `stop` right after the waiter's first look at its mailbox found nothing."""

    app: Garrison
    sent = False

    async def consume_event(self, run_id: str, name: str, step: StepRecord) -> StepRecord | None:
        taken = await super().consume_event(run_id, name, step)
        if taken is None and name == "stop" and not self.sent:
            self.sent = True
            # A client's concurrent app.send (from outside the workflow: a clean context).
            send = self.app.send(run_id, "stop", True)
            await asyncio.get_running_loop().create_task(send, context=contextvars.Context())
        return taken


async def test_event_sent_while_a_wait_is_being_set_up_wakes_it(db_url: str) -> None:
    store = SendDuringWaitSetup(db_url)
    app = Garrison(store=store)
    store.app = app
    gate = asyncio.Event()
    stopped = asyncio.Event()

    @app.step()
    async def agent_turn() -> None:
        await gate.wait()  # a long model call

    @app.step()
    async def note_stop() -> None:
        stopped.set()

    @app.workflow(name="w")
    async def w(ctx: Context) -> None:
        async def watch_for_stop() -> None:
            await ctx.wait_for("stop")
            await note_stop()

        watcher = asyncio.create_task(watch_for_stop())
        await agent_turn()
        await watcher

    async with app:
        await app.start(w, run_id="w")
        try:
            async with asyncio.timeout(2):
                await stopped.wait()
        finally:
            gate.set()


def family(db_url: str, watch: ParkWatch | None = None, clock: FakeClock | None = None,
           hooks: Sequence[EngineHooks] = ()) -> tuple[Garrison, Any, Any]:
    app = Garrison(db_url, clock=clock, hooks=[*([watch] if watch else []), *hooks])

    @app.workflow(name="child")
    async def child(ctx: Context, x: int) -> int:
        if x == 0:
            await ctx.wait_for("go")
        return x * 2

    @app.workflow(name="parent")
    async def parent(ctx: Context, x: int) -> int:
        handle = await ctx.start_child(child, x)
        return int(await handle.result())

    return app, parent, child


async def test_start_child_with_an_existing_run_id_does_not_hang_the_parent(db_url: str) -> None:
    app, _, child = family(db_url)

    @app.workflow(name="adopter")
    async def adopter(ctx: Context) -> int:
        handle = await ctx.start_child(child, 0, run_id="shared")
        return int(await handle.result())

    async with app:
        await app.start(child, 0, run_id="shared")
        parent = await app.start(adopter, run_id="p")
        await asyncio.sleep(0.2)
        await app.send("shared", "go")
        assert await app.handle("shared").result(timeout=2) == 0
        with contextlib.suppress(ResultTimeoutError, WorkflowFailed):
            await parent.result(timeout=2)
        # either a clear error at start_child or the child's result; got: WAITING forever
        assert (await parent.status()).is_terminal


async def test_child_result_can_be_awaited_twice(db_url: str) -> None:
    app, _, child = family(db_url)

    @app.workflow(name="twice")
    async def twice(ctx: Context) -> list[int]:
        handle = await ctx.start_child(child, 2)
        return [await handle.result(), await handle.result()]

    async with app:
        assert await (await app.start(twice, run_id="p")).result(timeout=3) == [4, 4]


async def test_child_result_timeout_is_honoured_inside_a_workflow(
    db_url: str, clock: FakeClock
) -> None:
    watch = ParkWatch()
    app, _, child = family(db_url, watch, clock)

    @app.workflow(name="impatient")
    async def impatient(ctx: Context) -> str:
        handle = await ctx.start_child(child, 0)  # waits for 'go' forever
        try:
            await handle.result(timeout=60)
        except ResultTimeoutError:
            return "timed out"
        return "done"

    async with app:
        handle = await app.start(impatient, run_id="p")
        await watch.parked("p")
        clock.advance(120)
        assert await handle.result(timeout=3) == "timed out"


class CrashAfterParentCancelled(EngineHooks):
    """The process dies right after the parent's CANCELLED commit (before the cascade)."""

    def run_finished(self, run_id: str, status: RunStatus) -> None:
        if run_id == "p" and status is RunStatus.CANCELLED:
            raise Crash("killed after the parent's cancel committed")


async def test_cancel_reaches_children_even_if_the_process_dies_after_the_parent_commit(
    db_url: str,
) -> None:
    watch = ParkWatch()
    app, parent, _ = family(db_url, watch, hooks=[CrashAfterParentCancelled()])
    async with app:
        await app.start(parent, 0, run_id="p")
        await watch.parked("p", "p/1")
        with contextlib.suppress(Crash):
            await app.cancel("p")
        await asyncio.sleep(0.2)
    app2, _, _ = family(db_url)
    async with app2:
        await asyncio.sleep(0.2)
        assert await app2.handle("p").status() is RunStatus.CANCELLED
        assert await app2.handle("p/1").status() is RunStatus.CANCELLED  # got WAITING


async def test_no_step_runs_after_the_run_has_failed(db_url: str) -> None:
    app = Garrison(db_url)
    gate = asyncio.Event()
    marks: list[str] = []

    @app.step()
    async def fail() -> None:
        raise ValueError("no")

    @app.step()
    async def slow() -> None:
        await gate.wait()

    @app.step()
    async def charge() -> None:
        marks.append("charge")

    @app.workflow(name="w")
    async def w(ctx: Context) -> None:
        async def other() -> None:
            await slow()
            await charge()

        await asyncio.gather(fail(), other())

    async with app:
        handle = await app.start(w, run_id="w")
        with pytest.raises(WorkflowFailed):
            await handle.result(timeout=3)
        gate.set()
        await asyncio.sleep(0.2)
        names = [e.name for e in await app.store.load_journal("w")]
    assert marks == []  # got ['charge']: a side effect after the run FAILED
    assert "charge" not in names  # and the journal of a terminal run grew


async def test_a_parked_run_holds_no_coroutine(db_url: str) -> None:
    watch = ParkWatch()
    app = Garrison(db_url, hooks=[watch])

    async def branch(ctx: Context, name: str) -> Any:
        return await ctx.wait_for(name)

    @app.workflow(name="race")
    async def race(ctx: Context) -> Any:
        tasks = {asyncio.create_task(branch(ctx, "a")), asyncio.create_task(branch(ctx, "b"))}
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        return done.pop().result()

    async with app:
        await app.start(race, run_id="r")
        await watch.parked("r")
        await asyncio.sleep(0.1)
        leftovers = [t for t in asyncio.all_tasks()
                     if getattr(t.get_coro(), "__qualname__", "").endswith("branch")]
        assert leftovers == []  # got 2 pending branch tasks of the parked run
        await app.send("r", "a", 1)
        assert await app.handle("r").result(timeout=3) == 1


class FinishCounter(EngineHooks):
    def __init__(self) -> None:
        self.finished: list[str] = []

    def run_finished(self, run_id: str, status: RunStatus) -> None:
        self.finished.append(run_id)


async def test_finishing_run_with_a_waiting_branch_is_not_cancelled_mid_finish(
    db_url: str,
) -> None:
    counter = FinishCounter()
    app = Garrison(db_url, hooks=[counter])

    @app.step()
    async def work() -> int:
        await asyncio.sleep(0.01)  # any real I/O: the other branch is waiting by now
        return 1

    kept: list[asyncio.Task[Any]] = []

    @app.workflow(name="w")
    async def w(ctx: Context) -> Any:
        # e.g. a gather whose other branch raised, or a race that did not cancel its loser
        kept.append(asyncio.create_task(ctx.wait_for("never")))
        await work()
        return {"done_at": ctx.now().isoformat()}

    async with app:
        handle = await app.start(w, run_id="w")
        timed_out = False
        try:
            await handle.result(timeout=1)
        except ResultTimeoutError:
            timed_out = True  # the result waiter is never resolved; only the 5 s poll sees it
        status = await handle.status()
    assert status is RunStatus.COMPLETED
    assert counter.finished == ["w"]  # got []: run_finished never called
    assert not timed_out




async def test_app_send_from_a_workflow_is_refused_not_repeated_on_replay(
    db_url: str, clock: FakeClock
) -> None:
    app = Garrison(db_url, clock=clock)

    @app.workflow(name="receiver")
    async def receiver(ctx: Context) -> Any:
        return await ctx.wait_for("never")

    @app.workflow(name="sender")
    async def sender(ctx: Context) -> None:
        await app.send("recv", "msg", 1)
        await ctx.sleep(10)

    async with app:
        await app.start(receiver, run_id="recv")
        handle = await app.start(sender, run_id="s")
        with pytest.raises(WorkflowFailed, match=r"app\.send\(\) inside a workflow"):
            await handle.result(timeout=3)
        events = await app.store.list_events("recv")
    assert events == []  # refused before anything was sent, so no replay can repeat it
