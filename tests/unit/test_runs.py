"""Starting, finding, cancelling runs; children; fan-out; errors as data."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import threading
from typing import Any

import pytest

from garrison import (
    ConfigurationError,
    Context,
    Garrison,
    NotInWorkflowError,
    ResultTimeoutError,
    RunNotFoundError,
    RunStatus,
    SerializationError,
    WorkflowCancelled,
    WorkflowConflictError,
    WorkflowFailed,
    current_step,
)
from garrison.store import StepKind

from ._support import ParkWatch


@dataclasses.dataclass(frozen=True)
class Receipt:
    order_id: str
    cents: int
    at: dt.datetime


async def test_start_is_idempotent_on_run_id_and_never_runs_twice(db_url: str) -> None:
    app = Garrison(db_url)
    runs: list[str] = []

    @app.step()
    async def charge(order_id: str, cents: int) -> Receipt:
        runs.append(order_id)
        return Receipt(order_id, cents, dt.datetime(2026, 1, 1, tzinfo=dt.UTC))

    @app.workflow()
    async def refund(ctx: Context, order_id: str, cents: int) -> Receipt:
        return await charge(order_id, cents)

    async with app:
        first = await app.start(refund, "o-42", 500, run_id="refund-o-42")
        receipt = await first.result(timeout=5)
        second = await app.start(refund, "o-42", 500, run_id="refund-o-42")
        assert await second.result(timeout=5) == receipt
    assert isinstance(receipt, Receipt) and receipt.cents == 500
    assert runs == ["o-42"]


async def test_reusing_a_run_id_for_another_workflow_is_a_clear_error(db_url: str) -> None:
    app = Garrison(db_url)

    @app.workflow(name="a")
    async def a(ctx: Context) -> int:
        return 1

    @app.workflow(name="b")
    async def b(ctx: Context) -> int:
        return 2

    async with app:
        await app.start(a, run_id="x")
        with pytest.raises(WorkflowConflictError, match="already belongs to a run of workflow 'a'"):
            await app.start(b, run_id="x")


async def test_failed_run_carries_error_type_message_and_traceback(db_url: str) -> None:
    app = Garrison(db_url)

    @app.workflow(name="boom")
    async def boom(ctx: Context) -> None:
        raise ValueError("bad cents: -5")

    async with app:
        handle = await app.start(boom)
        with pytest.raises(WorkflowFailed) as info:
            await handle.result(timeout=5)
        assert await handle.status() is RunStatus.QUARANTINED
    assert info.value.error_type == "builtins:ValueError"
    assert info.value.error_message == "bad cents: -5"
    assert "raise ValueError" in info.value.traceback


async def test_unknown_run_id_is_a_clear_error(db_url: str) -> None:
    async with Garrison(db_url) as app:
        with pytest.raises(RunNotFoundError, match="no run 'ghost'"):
            await app.handle("ghost").status()


async def test_result_timeout_leaves_the_run_going(db_url: str) -> None:
    app = Garrison(db_url)

    @app.workflow(name="waits")
    async def waits(ctx: Context) -> Any:
        return await ctx.wait_for("go")

    async with app:
        handle = await app.start(waits)
        with pytest.raises(ResultTimeoutError):
            await handle.result(timeout=0.05)
        await app.send(handle.run_id, "go", "went")
        assert await handle.result(timeout=5) == "went"


async def test_unserializable_step_result_fails_at_the_call_site_naming_type_and_step(
    db_url: str,
) -> None:
    app = Garrison(db_url)
    seen: list[str] = []

    @app.step()
    async def opens() -> Any:
        return threading.Lock()

    @app.workflow(name="w")
    async def w(ctx: Context) -> str:
        try:
            await opens()
        except SerializationError as exc:
            seen.append(str(exc))
        return "handled"

    async with app:
        assert await (await app.start(w)).result(timeout=5) == "handled"
    assert "step 1 'opens'" in seen[0] and "lock" in seen[0]


async def test_sync_steps_run_in_threads_with_their_idempotency_key(db_url: str) -> None:
    app = Garrison(db_url)
    main_thread = threading.get_ident()

    @app.step()
    def blocking(x: int) -> tuple[str, bool]:
        return current_step().idempotency_key, threading.get_ident() != main_thread

    @app.workflow(name="w")
    async def w(ctx: Context) -> Any:
        return await blocking(1)

    async with app:
        handle = await app.start(w, run_id="t")
        assert await handle.result(timeout=5) == ["t:1", True]


async def test_fan_out_positions_do_not_depend_on_completion_order(db_url: str) -> None:
    app = Garrison(db_url)

    @app.step()
    async def slow(i: int, delay: float) -> int:
        await asyncio.sleep(delay)
        return i

    @app.workflow(name="fan")
    async def fan(ctx: Context) -> list[int]:
        async def branch(i: int, delay: float) -> int:
            a = await slow(i, delay)
            b = await slow(i + 10, 0)
            return a + b

        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(branch(i, d)) for i, d in enumerate([0.03, 0.0, 0.015])]
        return [t.result() for t in tasks]

    async with app:
        result = await (await app.start(fan, run_id="f")).result(timeout=5)
        journal = await app.store.load_journal("f")
    assert result == [10, 12, 14]
    by_position = {e.position: e.inputs for e in journal if e.kind is StepKind.STEP}
    assert by_position == {
        "1.1": '{"args":[0,0.03],"kwargs":{}}',
        "1.2": '{"args":[10,0],"kwargs":{}}',
        "2.1": '{"args":[1,0.0],"kwargs":{}}',
        "2.2": '{"args":[11,0],"kwargs":{}}',
        "3.1": '{"args":[2,0.015],"kwargs":{}}',
        "3.2": '{"args":[12,0],"kwargs":{}}',
    }


def family(url: str, watch: ParkWatch | None = None) -> tuple[Garrison, Any, Any]:
    app = Garrison(url, hooks=[watch] if watch else [])

    @app.step()
    async def double(x: int) -> int:
        return x * 2

    @app.workflow(name="child")
    async def child(ctx: Context, x: int) -> int:
        if x < 0:
            raise ValueError(f"negative: {x}")
        if x == 0:
            await ctx.wait_for("never")
        return await double(x)

    @app.workflow(name="parent")
    async def parent(ctx: Context, xs: list[int]) -> list[int]:
        handles = [await ctx.start_child(child, x) for x in xs]
        return [await h.result() for h in handles]

    return app, parent, child


async def test_children_results_are_awaited_durably(db_url: str) -> None:
    app, parent, _ = family(db_url)
    async with app:
        assert await (await app.start(parent, [1, 2, 3], run_id="p")).result(timeout=5) == [2, 4, 6]
        children = await app.store.list_runs(parent_run_id="p")
    assert sorted(c.run_id for c in children) == ["p/1", "p/2", "p/3"]
    assert all(c.status is RunStatus.COMPLETED for c in children)


async def test_child_failure_surfaces_in_parent_as_workflow_failed(db_url: str) -> None:
    app, parent, _ = family(db_url)
    async with app:
        handle = await app.start(parent, [1, -1], run_id="p")
        with pytest.raises(WorkflowFailed, match=r"child run p/2 failed: builtins:ValueError"):
            await handle.result(timeout=5)


async def test_cancel_is_recorded_and_propagates_to_children(db_url: str) -> None:
    watch = ParkWatch()
    app, parent, _ = family(db_url, watch)
    async with app:
        handle = await app.start(parent, [0, 0], run_id="p")
        await watch.parked("p", "p/1", "p/2")
        await handle.cancel()
        for run_id in ("p", "p/1", "p/2"):  # children end as soon as a worker sees the flag
            with pytest.raises(WorkflowCancelled):
                await app.handle(run_id).result(timeout=5)
        statuses = {r.run_id: r.status for r in await app.store.list_runs()}
    assert statuses == {"p": RunStatus.CANCELLED, "p/1": RunStatus.CANCELLED,
                        "p/2": RunStatus.CANCELLED}


async def test_cancelling_a_parent_cancels_its_child_running_a_step_here(db_url: str) -> None:
    app = Garrison(db_url)
    entered = asyncio.Event()

    @app.step()
    async def slow(tag: str) -> str:
        if tag == "child":
            entered.set()
        await asyncio.sleep(30)
        return tag

    @app.workflow(name="child")
    async def child(ctx: Context) -> str:
        return await slow("child")

    @app.workflow(name="parent")
    async def parent(ctx: Context) -> str:
        await ctx.start_child(child, run_id="c")
        return await slow("parent")

    async with app:
        handle = await app.start(parent, run_id="p")
        await asyncio.wait_for(entered.wait(), 10)
        await handle.cancel()
        for run_id in ("p", "c"):  # the child is live in this worker, inside its step
            with pytest.raises(WorkflowCancelled):
                await app.handle(run_id).result(timeout=10)
        assert "p" not in app.worker.live  # type: ignore[union-attr]


async def test_cancel_of_a_live_run_raises_cancelled_error_inside_it(db_url: str) -> None:
    app = Garrison(db_url)
    entered = asyncio.Event()
    cleaned: list[bool] = []

    @app.step()
    async def long_call() -> None:
        entered.set()
        await asyncio.sleep(30)

    @app.workflow(name="w")
    async def w(ctx: Context) -> None:
        try:
            await long_call()
        finally:
            cleaned.append(True)

    async with app:
        handle = await app.start(w)
        await entered.wait()
        await handle.cancel()
        with pytest.raises(WorkflowCancelled):
            await handle.result(timeout=5)
    assert cleaned == [True]


async def test_calling_a_workflow_directly_outside_a_workflow_says_how_to_start_it(
    db_url: str,
) -> None:
    app = Garrison(db_url)

    @app.workflow(name="w")
    async def w(ctx: Context) -> None:
        return None

    with pytest.raises(NotInWorkflowError, match=r"app.start\(w"):
        await w()


async def test_ctx_operations_inside_a_step_are_refused(db_url: str) -> None:
    app = Garrison(db_url)

    @app.step()
    async def sneaky(ctx: Context) -> None:
        await ctx.sleep(1)

    @app.workflow(name="w")
    async def w(ctx: Context) -> None:
        await sneaky(ctx)

    async with app:
        with pytest.raises(WorkflowFailed):
            await (await app.start(w)).result(timeout=5)


async def test_unregistered_version_is_reported_orphaned_not_failed(db_url: str) -> None:
    watch = ParkWatch()
    app = Garrison(db_url, hooks=[watch])

    @app.workflow(name="w", version="1")
    async def w1(ctx: Context) -> Any:
        return await ctx.wait_for("go")

    async with app:
        await app.start(w1, run_id="old")
        await watch.parked("old")
    app2 = Garrison(db_url)

    @app2.workflow(name="w", version="2")
    async def w2(ctx: Context) -> Any:
        return "v2"

    async with app2:
        await app2.send("old", "go", 1)
        await asyncio.sleep(0.2)  # give the worker a few polls to (wrongly) run it
        assert [r.run_id for r in app2.orphaned_runs] == ["old"]
        assert await app2.handle("old").status() is RunStatus.WAITING


def test_bad_store_urls_are_clear_errors(tmp_path: Any) -> None:
    with pytest.raises(ConfigurationError, match="unknown scheme 'mysql'"):
        Garrison("mysql://x")
    with pytest.raises(ConfigurationError, match="three slashes"):
        Garrison("sqlite://garrison.db")
