"""Run streams end to end (`garrison.publish`, `app.stream`), on SQLite and PostgreSQL.

Readers here take a long `poll_s` when the run executes in their own process: they must
be woken by the publish and by the run's end, not by their poll.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from garrison import (
    Context,
    Garrison,
    NotInWorkflowError,
    RunNotFoundError,
    RunStatus,
    StreamRecord,
    WorkflowFailed,
    publish,
)
from garrison.engine._codec import decode
from garrison.resilience import Retry
from tests.unit._support import ParkWatch

NO_POLL_S = 30.0  # longer than any test: only a wake-up gets such a reader going


def seen(records: list[StreamRecord]) -> list[tuple[str, Any]]:
    return [(r.kind, decode(r.data)) for r in records]


async def read_all(app: Garrison, run_id: str, *, after: int = 0,
                   poll_s: float = NO_POLL_S) -> list[StreamRecord]:
    async with asyncio.timeout(10):
        return [record async for record in app.stream(run_id, after=after, poll_s=poll_s)]


def build_chat(url: str, gate: asyncio.Event) -> tuple[Garrison, Any]:
    app = Garrison(url)

    @app.step(name="model")
    async def model(prompt: str) -> str:
        await gate.wait()
        for token in ("Hel", "lo", "!"):
            await publish("token", token)
        return "Hello!"

    @app.step(name="tool")
    async def tool(query: str) -> dict[str, Any]:
        await publish("tool_call", {"query": query})
        result = {"status": "shipped"}
        await publish("tool_result", result)
        return result

    @app.workflow(name="chat")
    async def chat(ctx: Context, prompt: str) -> str:
        answer = await model(prompt)
        await tool("order 7")
        return answer

    return app, chat


EXPECTED = [("token", "Hel"), ("token", "lo"), ("token", "!"),
            ("tool_call", {"query": "order 7"}), ("tool_result", {"status": "shipped"})]


async def test_a_reader_started_before_the_events_gets_them_all_and_ends_with_the_run(
    db_url: str,
) -> None:
    gate = asyncio.Event()
    app, chat = build_chat(db_url, gate)
    async with app:
        handle = await app.start(chat, "where is my order?", run_id="r1")
        async with asyncio.TaskGroup() as tasks:
            reader = tasks.create_task(read_all(app, "r1"))
            await asyncio.sleep(0)  # the reader is waiting on an empty stream
            gate.set()
        records = reader.result()
        assert await handle.result(timeout=5) == "Hello!"

        assert seen(records) == EXPECTED
        assert [r.key for r in records] == ["1/0", "1/1", "1/2", "2/0", "2/1"]
        offsets = [r.offset for r in records]
        assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)
        assert {r.run_id for r in records} == {"r1"}


async def test_a_reader_resuming_after_an_offset_gets_exactly_the_rest(db_url: str) -> None:
    gate = asyncio.Event()
    gate.set()
    app, chat = build_chat(db_url, gate)
    async with app:
        await (await app.start(chat, "hi", run_id="r1")).result(timeout=5)
        everything = await read_all(app, "r1")

        for cut in range(len(everything)):
            rest = await read_all(app, "r1", after=everything[cut].offset)
            assert rest == everything[cut + 1:]
        assert seen(await read_all(app, "r1", after=0)) == EXPECTED


async def test_a_step_that_fails_after_publishing_and_runs_again_adds_no_duplicates(
    db_url: str,
) -> None:
    attempts: list[int] = []
    returned: list[int | None] = []
    app = Garrison(db_url)

    @app.step(name="flaky", retry=Retry(max_attempts=3, base=0.0))
    async def flaky() -> str:
        attempts.append(len(attempts) + 1)
        returned.append(await publish("token", "a"))
        returned.append(await publish("token", "b"))
        returned.append(await publish("note", "once", key="my-id"))
        if len(attempts) < 3:
            raise ConnectionError("provider dropped the stream")
        returned.append(await publish("token", "c"))
        return "abc"

    @app.workflow(name="stream_retry")
    async def stream_retry(ctx: Context) -> str:
        return await flaky()

    async with app:
        assert await (await app.start(stream_retry, run_id="r1")).result(timeout=10) == "abc"
        records = await read_all(app, "r1")

    assert attempts == [1, 2, 3]
    assert [(r.key, decode(r.data)) for r in records] == [
        ("1/0", "a"), ("1/1", "b"), ("my-id", "once"), ("1/3", "c")]
    # Only the first attempt's publishes (and the new one) wrote; the repeats were no-ops.
    assert [o is not None for o in returned] == [True] * 3 + [False] * 6 + [True]


def build_narrator(url: str, returned: list[int | None],
                   hooks: tuple[ParkWatch, ...] = ()) -> tuple[Garrison, Any]:
    app = Garrison(url, hooks=hooks)

    @app.step(name="lookup")
    async def lookup() -> int:
        return 7

    @app.workflow(name="narrator")
    async def narrator(ctx: Context) -> str:
        returned.append(await publish("status", "started"))
        returned.append(await publish("status", "still starting"))
        found = await lookup()
        returned.append(await publish("status", f"found {found}"))
        answer = await ctx.wait_for("go")
        returned.append(await publish("status", f"told {answer}"))
        return str(answer)

    return app, narrator


async def test_workflow_code_publishes_and_a_replay_after_restart_adds_nothing(
    db_url: str,
) -> None:
    returned: list[int | None] = []
    watch = ParkWatch()
    app, narrator = build_narrator(db_url, returned, (watch,))
    async with app:
        await app.start(narrator, run_id="r1")
        await watch.parked("r1")
        assert await app.handle("r1").status() is RunStatus.WAITING
    assert [o is not None for o in returned] == [True, True, True]

    returned.clear()
    app2, _ = build_narrator(db_url, returned)  # a new process on the same database
    async with app2:
        await app2.send("r1", "go", "yes")
        assert await app2.handle("r1").result(timeout=10) == "yes"
        records = await read_all(app2, "r1")

    # The body ran again from the top: its first three publishes were no-ops.
    assert [o is not None for o in returned] == [False, False, False, True]
    assert [(r.key, decode(r.data)) for r in records] == [
        ("w:0/0", "started"), ("w:0/1", "still starting"), ("w:1/0", "found 7"),
        ("w:2/0", "told yes")]


async def test_a_reader_in_a_client_app_sees_the_events_by_polling(db_url: str) -> None:
    gate = asyncio.Event()
    app, chat = build_chat(db_url, gate)
    client = Garrison(db_url, worker=False)
    async with app, client:
        handle = await app.start(chat, "hi", run_id="r1")
        async with asyncio.TaskGroup() as tasks:
            reader = tasks.create_task(read_all(client, "r1", poll_s=0.01))
            await asyncio.sleep(0.05)  # the client has polled an empty stream
            gate.set()
        assert await handle.result(timeout=5) == "Hello!"

    assert seen(reader.result()) == EXPECTED


async def test_a_reader_of_a_run_that_fails_ends_with_what_it_published(db_url: str) -> None:
    app = Garrison(db_url)

    @app.step(name="broken")
    async def broken() -> None:
        await publish("token", "partial")
        raise ValueError("bad answer")

    @app.workflow(name="fails")
    async def fails(ctx: Context) -> None:
        await broken()

    async with app:
        await app.start(fails, run_id="r1")
        records = await read_all(app, "r1")
        assert await app.handle("r1").status() is RunStatus.QUARANTINED

    assert seen(records) == [("token", "partial")]


async def test_streaming_an_unknown_run_says_how_to_find_the_runs(db_url: str) -> None:
    async with Garrison(db_url) as app:
        with pytest.raises(RunNotFoundError, match=r"no run 'nope'.*garrison runs list"):
            await read_all(app, "nope")


async def test_publish_outside_a_run_is_refused_with_where_to_call_it() -> None:
    with pytest.raises(NotInWorkflowError, match="from a step's body"):
        await publish("token", "x")


async def test_publish_in_a_synchronous_step_says_to_make_it_async(db_url: str) -> None:
    app = Garrison(db_url)

    @app.step(name="sync_step")
    def sync_step() -> None:
        publish("token", "x")

    @app.workflow(name="sync_publisher")
    async def sync_publisher(ctx: Context) -> None:
        await sync_step()

    async with app:
        await app.start(sync_publisher, run_id="r1")
        with pytest.raises(WorkflowFailed, match="make the step an `async def`"):
            await app.handle("r1").result(timeout=5)
        assert await read_all(app, "r1") == []
