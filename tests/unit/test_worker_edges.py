"""Review: the worker's recovery, retries and launches."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence

import pytest

from garrison import (
    Context,
    Garrison,
    RunRecord,
    RunStatus,
    StepRecord,
    StoreError,
    WorkflowCancelled,
)
from garrison.store._sqlite import SQLiteStore


class FailFirstCommitOf(SQLiteStore):
    """The disk hiccups once: the first commit of step `name` fails."""

    def __init__(self, url: str, name: str) -> None:
        super().__init__(url)
        self.name = name
        self.failed = False

    async def append_steps(self, steps: Sequence[StepRecord]) -> None:
        if not self.failed and any(s.name == self.name for s in steps):
            self.failed = True
            raise StoreError("SQLite store: commit failed: disk I/O error (simulated)")
        await super().append_steps(steps)


async def test_store_error_in_one_branch_does_not_run_a_sibling_step_twice(db_url: str) -> None:
    app = Garrison(store=FailFirstCommitOf(db_url, "flaky"))
    gate = asyncio.Event()
    effects: Counter[str] = Counter()

    @app.step()
    async def flaky() -> int:
        return 1

    @app.step()
    async def slow() -> None:
        await gate.wait()

    @app.step()
    async def charge() -> None:
        effects["charge"] += 1

    @app.workflow(name="w")
    async def w(ctx: Context) -> None:
        async def other() -> None:
            await slow()
            await charge()

        await asyncio.gather(flaky(), other())

    async with app:
        handle = await app.start(w, run_id="w")
        await asyncio.sleep(1.0)  # retry_later's 0.5 s backoff passes; a second execution runs
        gate.set()
        await handle.result(timeout=5)
        await asyncio.sleep(0.2)
    assert effects["charge"] == 1  # got 2, with no crash anywhere


async def test_orphaned_running_runs_do_not_starve_recovery(db_url: str) -> None:
    app = Garrison(db_url, version="2")

    @app.workflow(name="w")
    async def w(ctx: Context) -> str:
        return "ok"

    store = SQLiteStore(db_url)
    await store.open()

    def run(run_id: str, version: str, created_at: float) -> RunRecord:
        return RunRecord(run_id=run_id, workflow_name="w", workflow_version=version,
                         status=RunStatus.RUNNING, inputs='{"args":[],"kwargs":{}}',
                         created_at=created_at, updated_at=created_at)

    await asyncio.gather(*(store.create_run(run(f"old-{i}", "1", 1.0 + i))
                           for i in range(10_000)))
    await store.create_run(run("new", "2", 50_000.0))  # crashed mid-run under version 2
    await store.close()

    async with app:
        assert await app.handle("new").result(timeout=3) == "ok"


async def test_store_error_raised_by_a_step_fails_the_run_instead_of_retrying_forever(
    db_url: str,
) -> None:
    app = Garrison(db_url)

    @app.step()
    async def notify_other_run() -> None:
        # e.g. a tool step that calls app.send() on a store that is locked right now
        raise StoreError("SQLite store other.db: write failed: database is locked")

    @app.workflow(name="w")
    async def w(ctx: Context) -> None:
        await notify_other_run()

    async with app:
        handle = await app.start(w, run_id="w")
        with pytest.raises(Exception, match="database is locked"):
            await handle.result(timeout=3)  # got ResultTimeoutError: RUNNING, retried forever
        assert await handle.status() is RunStatus.QUARANTINED


async def test_a_cancel_from_another_process_reaches_a_live_run_behind_a_backlog(
        db_url: str) -> None:
    """SQLite tells a worker only that another process wrote ("everything"): it looked
    for cancel requests among the first 10,000 unfinished runs, oldest first, so with a
    larger backlog the live run's cancel was never seen and it ran to its end."""
    app = Garrison(db_url)
    app.queue("backlog", concurrency=1)
    ticking = asyncio.Event()

    @app.workflow(name="job")
    async def job(ctx: Context) -> None:
        await ctx.sleep(3600)

    @app.step()
    async def tick(i: int) -> int:
        ticking.set()
        await asyncio.sleep(0.05)
        return i

    @app.workflow(name="long")
    async def long(ctx: Context) -> int:
        return sum([await tick(i) for i in range(400)])  # ~20 s unless cancelled

    client = Garrison(db_url, worker=False)  # another process's app: its own connection
    client.queue("backlog", concurrency=1)
    async with app:
        for chunk in range(0, 10_050, 1_000):
            await asyncio.gather(*(app.start(job, run_id=f"b{i:05d}", queue="backlog")
                                   for i in range(chunk, min(chunk + 1_000, 10_050))))
        handle = await app.start(long, run_id="live")
        await ticking.wait()
        async with client:
            await client.cancel("live")
        with pytest.raises(WorkflowCancelled):
            await handle.result(timeout=10)
