"""`app.replay` and `app.fork` on every backend (`db_url`: SQLite and PostgreSQL).

Each test builds the code it needs with `build(url, variant)` (`_fork_apps`): the same
workflow name with the code of one version, and a counter of the step bodies that ran.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from garrison import (
    ConfigurationError,
    Context,
    Garrison,
    NonDeterminismError,
    RunNotFoundError,
    RunStatus,
    WorkflowFailed,
)
from garrison.store import StepStatus
from tests.integration.engine._fork_apps import build
from tests.integration.engine._fork_apps import wait_status as _status


async def _completed(url: str, workflow: str, *args: Any) -> str:
    app, _ = build(url)
    async with app:
        handle = await app.start(workflow, *args)
        await handle.result(timeout=10)
    return handle.run_id


# -- replay --------------------------------------------------------------------------


async def test_replay_of_a_completed_run_with_the_same_code_runs_no_step(db_url: str) -> None:
    run_id = await _completed(db_url, "order", "a", 250)
    app, calls = build(db_url)
    async with app:
        report = await app.replay(run_id)

    assert report.finished and report.entries == 2 and report.stopped_at == ()
    assert (report.run_status, report.workflow_version) == (RunStatus.COMPLETED, "1")
    assert calls == Counter()


@pytest.mark.parametrize(("variant", "position", "words"), [
    ("renamed", "1", ["journal has step 'reserve'", "code called step 'hold'"]),
    ("added", "3", ["code called step 'ship'", "ended COMPLETED without it"]),
    ("removed", "2", ["journal has step 'charge'", "never reached"]),
    ("result", None, ["COMPLETED with", "the code returns"]),
])
async def test_replay_detects_a_changed_workflow(db_url: str, variant: str,
                                                 position: str | None,
                                                 words: list[str]) -> None:
    run_id = await _completed(db_url, "order", "a", 250)
    app, calls = build(db_url, variant, worker=False)
    async with app:
        with pytest.raises(NonDeterminismError) as caught:
            await app.replay(run_id)

    error = caught.value
    assert error.position == position  # type: ignore[attr-defined]
    assert error.run_id == run_id  # type: ignore[attr-defined]
    for word in words:
        assert word in str(error), str(error)
    assert calls == Counter()


@pytest.mark.parametrize("variant", ["wait", "sleep"])
async def test_replay_of_a_parked_run_is_consistent_so_far(db_url: str, variant: str) -> None:
    owner, _ = build(db_url, variant)
    async with owner:
        handle = await owner.start("approval", "a")
        await _status(owner, handle.run_id, RunStatus.WAITING)
        # Another app (no worker) replays a run this worker parked, while it is open.
        client, calls = build(db_url, variant, worker=False)
        async with client:
            report = await client.replay(handle.run_id)
        also = await owner.replay(handle.run_id)  # and the owner's own app may too

    assert not report.finished and report.stopped_at == ("2",) and report.entries == 2
    assert report.run_status is RunStatus.WAITING and also == report
    assert calls == Counter()


async def test_replay_of_a_parked_run_with_a_changed_step_diverges(db_url: str) -> None:
    owner, _ = build(db_url, "wait")
    async with owner:
        handle = await owner.start("approval", "a")
        await _status(owner, handle.run_id, RunStatus.WAITING)
    app, _ = build(db_url, "wait", worker=False)
    app.registry.workflows.clear()

    @app.workflow(name="approval")
    async def approval(ctx: Context, sku: str) -> str:
        await ctx.sleep(1)  # the journal has a step here
        return "x"

    async with app:
        with pytest.raises(NonDeterminismError, match="position 1: journal has step"):
            await app.replay(handle.run_id)


def _rows(url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, sorted: the store's whole content."""
    if url.startswith("sqlite"):
        conn = sqlite3.connect(url.removeprefix("sqlite:///"))
        try:
            tables = [r[0] for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
            return {t: sorted(conn.execute(f"SELECT * FROM {t}").fetchall(), key=repr)
                    for t in tables}
        finally:
            conn.close()
    import psycopg

    from garrison.store._postgres import parse_postgres_url

    libpq, schema, _ = parse_postgres_url(url)
    with psycopg.connect(libpq) as pg:
        tables = [r[0] for r in pg.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s "
            "ORDER BY table_name", (schema,))]
        return {t: sorted(pg.execute(f"SELECT * FROM {schema}.{t}").fetchall(), key=repr)
                for t in tables}


def _files(url: str) -> dict[str, bytes]:
    if not url.startswith("sqlite"):
        return {}
    db = Path(url.removeprefix("sqlite:///"))
    return {p.name: p.read_bytes() for p in db.parent.glob(db.name + "*")
            if not p.name.endswith(("-shm", ".worker.lock"))}


async def test_replay_leaves_the_store_unchanged(db_url: str) -> None:
    completed = await _completed(db_url, "order", "a", 250)
    owner, _ = build(db_url, "wait")
    async with owner:
        parked = (await owner.start("approval", "b")).run_id
        await _status(owner, parked, RunStatus.WAITING)
    rows, files = _rows(db_url), _files(db_url)

    app, _ = build(db_url, worker=False)
    async with app:
        await app.replay(completed)
        await app.replay(parked)
    changed, _ = build(db_url, "added", worker=False)
    async with changed:
        with pytest.raises(NonDeterminismError):
            await changed.replay(completed)

    assert _rows(db_url) == rows
    assert _files(db_url) == files  # SQLite: byte for byte


async def test_replay_of_code_that_cancels_a_child_writes_nothing(db_url: str) -> None:
    owner, _ = build(db_url)
    async with owner:
        parent = (await owner.start("gated", "a")).run_id
        await _status(owner, parent, RunStatus.WAITING)
        child = (await owner.store.list_runs(parent_run_id=parent))[0].run_id
        await _status(owner, child, RunStatus.WAITING)
    rows = _rows(db_url)

    changed, _ = build(db_url, "cancels", worker=False)
    async with changed:
        report = await changed.replay(parent)

    assert not report.finished  # consistent so far: it stops at the wait on the child
    assert _rows(db_url) == rows  # the child was not asked to cancel


async def test_a_live_run_cancelling_its_child_from_workflow_code_cancels_it(
        db_url: str) -> None:
    app, _ = build(db_url, "cancels")
    async with app:
        parent = await app.start("gated", "a")
        with pytest.raises(WorkflowFailed, match=r"child run .* was cancelled"):
            await parent.result(timeout=10)  # the child's end, seen by the parent
        child = (await app.store.list_runs(parent_run_id=parent.run_id))[0]

    assert child.status is RunStatus.CANCELLED


async def test_replay_of_a_run_another_worker_is_executing_stops_at_its_step(
        db_url: str) -> None:
    owner = Garrison(db_url, poll_interval_s=0.005)
    entered, release = asyncio.Event(), asyncio.Event()

    @owner.step(name="reserve")
    async def slow(sku: str) -> str:
        entered.set()
        await release.wait()
        return sku

    @owner.workflow(name="approval")
    async def approval(ctx: Context, sku: str) -> str:
        await slow(sku)
        return "done"

    async with owner:
        handle = await owner.start(approval, "a")
        await entered.wait()  # RUNNING, owned by this worker, step 1 in flight
        client, calls = build(db_url, "wait", worker=False)
        async with client:
            report = await client.replay(handle.run_id)
        release.set()
        assert await handle.result(timeout=10) == "done"

    assert not report.finished and report.stopped_at == ("1",) and report.entries == 0
    assert calls == Counter()


async def test_replay_errors_name_what_is_wrong(db_url: str) -> None:
    run_id = await _completed(db_url, "order", "a", 250)
    other = Garrison(db_url, worker=False)
    async with other:
        with pytest.raises(RunNotFoundError):
            await other.replay("no-such-run")
        with pytest.raises(ConfigurationError, match=r"'order' is not registered.*--app"):
            await other.replay(run_id)
        with pytest.raises(ConfigurationError, match=r"'order' is not registered.*--app"):
            await other.fork(run_id, at_step=1)
    app, _ = build(db_url, worker=False)
    async with app:
        with pytest.raises(ConfigurationError, match="version '9' is not registered"):
            await app.replay(run_id, version="9")
        with pytest.raises(ConfigurationError, match="at_step=-1"):
            await app.fork(run_id, at_step=-1)
        with pytest.raises(RunNotFoundError):
            await app.fork("no-such-run", at_step=1)
        with pytest.raises(ConfigurationError, match="args="):
            await app.fork(run_id, at_step=1, args="abc")


async def test_replay_picks_the_newest_version_when_the_runs_is_not_registered(
        db_url: str) -> None:
    run_id = await _completed(db_url, "order", "a", 250)
    app = Garrison(db_url, worker=False, version="2")
    calls: Counter[str] = Counter()

    @app.step(name="reserve")
    async def reserve(sku: str) -> str:
        calls["reserve"] += 1
        return ""

    @app.step(name="charge")
    async def charge(cents: int) -> int:
        calls["charge"] += 1
        return 0

    @app.workflow(name="order")
    async def order(ctx: Context, sku: str, cents: int) -> dict[str, Any]:
        return {"r": await reserve(sku), "c": await charge(cents)}

    async with app:
        report = await app.replay(run_id)
    assert (report.workflow_version, report.run_version) == ("2", "1") and calls == Counter()


# -- fork ----------------------------------------------------------------------------


async def test_fork_reuses_the_journal_up_to_the_step_and_runs_the_rest_live(
        db_url: str) -> None:
    run_id = await _completed(db_url, "order", "a", 250)
    app, calls = build(db_url)
    async with app:
        fork = await app.fork(run_id, at_step=1, args=["b", 999])
        result = await fork.result(timeout=10)
        record = await fork.record()
        journal = await app.store.load_journal(fork.run_id)
        again = await app.replay(fork.run_id)

    assert result == {"r": "res-a", "c": 999}  # step 1 from the journal, step 2 live
    assert calls == Counter(charge=1)
    assert (record.forked_from, record.forked_at) == (run_id, 1)
    assert record.inputs == '{"args":["b",999],"kwargs":{}}'
    assert sorted(e.position for e in journal) == ["1", "2"]
    assert again.finished


async def test_fork_at_step_zero_is_a_fresh_run_with_the_same_inputs(db_url: str) -> None:
    run_id = await _completed(db_url, "order", "a", 250)
    app, calls = build(db_url)
    async with app:
        fork = await app.fork(run_id, at_step=0, run_id="fresh")
        result = await fork.result(timeout=10)

    assert fork.run_id == "fresh" and result == {"r": "res-a", "c": 250}
    assert calls == Counter(reserve=1, charge=1)


async def test_fork_past_the_end_reproduces_the_run_without_running_a_step(
        db_url: str) -> None:
    run_id = await _completed(db_url, "order", "a", 250)
    app, calls = build(db_url)
    async with app:
        fork = await app.fork(run_id, at_step=99, args={"args": ["z"], "kwargs": {"cents": 1}})
        assert await fork.result(timeout=10) == {"r": "res-a", "c": 250}
    assert calls == Counter()


async def test_fork_of_a_fan_out_keeps_the_branches_at_or_before_the_step(
        db_url: str) -> None:
    run_id = await _completed(db_url, "fanout", 1)
    app, calls = build(db_url)
    async with app:
        fork = await app.fork(run_id, at_step=2, args=[5])
        result = await fork.result(timeout=10)

    # Branches 1 and 2 (entries 1.1, 2.1) are reused: 10 + 20; branch 3 runs live: 70.
    assert result == 10 + 20 + 70 + 5
    assert calls == Counter(part=1, charge=1)


async def test_fork_made_without_a_worker_is_resumed_from_its_journal_by_one(
        db_url: str) -> None:
    run_id = await _completed(db_url, "order", "a", 250)
    client, _ = build(db_url, worker=False)
    async with client:
        fork = await client.fork(run_id, at_step=1, args=["b", 7])
        assert await fork.status() is RunStatus.PENDING
    worker, calls = build(db_url)
    async with worker:
        assert await worker.handle(fork.run_id).result(timeout=10) == {"r": "res-a", "c": 7}
    assert calls == Counter(charge=1)


async def test_fork_of_a_parked_run_drops_the_pending_wait(db_url: str) -> None:
    owner, _ = build(db_url, "wait")
    async with owner:
        parked = (await owner.start("approval", "a")).run_id
        await _status(owner, parked, RunStatus.WAITING)
        journal = await owner.store.load_journal(parked)
        assert {e.position: e.status for e in journal}["2"] is StepStatus.PENDING
        fork = await owner.fork(parked, at_step=2)
        await _status(owner, fork.run_id, RunStatus.WAITING)
        await owner.send(fork.run_id, "approved", "yes")
        assert await fork.result(timeout=10) == "yes"
        assert await owner.handle(parked).status() is RunStatus.WAITING


async def test_a_fork_waiting_on_a_reused_child_still_running_is_woken_by_its_end(
        db_url: str) -> None:
    app, _ = build(db_url)
    async with app:
        parent = (await app.start("gated", "a")).run_id
        child = f"{parent}/1"  # started at position 1, reused by a fork at step >= 1
        await _status(app, child, RunStatus.WAITING)
        await _status(app, parent, RunStatus.WAITING)
        fork = await app.fork(parent, at_step=1)
        again = await app.fork(fork.run_id, at_step=1)  # a fork of the fork reuses it too
        fresh = await app.fork(parent, at_step=0)  # starts a child of its own
        for run_id in (fork.run_id, again.run_id, fresh.run_id, f"{fresh.run_id}/1"):
            await _status(app, run_id, RunStatus.WAITING)
        await app.send(child, "go", "yes")
        results = [await h.result(timeout=10)
                   for h in (fork, again, app.handle(parent))]
        await app.send(f"{fresh.run_id}/1", "go", "own")
        assert await fresh.result(timeout=10) == "own-a"
        forks = await app.store.list_runs(parent_run_id=fork.run_id, limit=10)
        told = {run_id: [e.name for e in await app.store.list_events(run_id)]
                for run_id in (parent, fork.run_id, again.run_id, fresh.run_id)}

    assert results == ["yes-a"] * 3  # each woken by the one child's end
    assert forks == []  # the forks started no child: they waited on the original one
    ended = f"garrison.child:{child}"
    assert told == {parent: [ended], fork.run_id: [ended], again.run_id: [ended],
                    fresh.run_id: [f"garrison.child:{fresh.run_id}/1"]}


async def test_a_live_fork_waiting_on_a_reused_child_is_told_at_once(db_url: str) -> None:
    # Claims are a minute apart: only the child's end itself can reach the live fork.
    release = asyncio.Event()
    app, calls = build(db_url, claim_interval_s=60, release=release)
    async with app:
        parent = await app.start("gated_busy", "a")
        child = f"{parent.run_id}/1"
        await _status(app, child, RunStatus.WAITING)
        fork = await app.fork(parent.run_id, at_step=1)  # reuses the child, runs `busy`
        await _status(app, fork.run_id, RunStatus.RUNNING)
        await app.send(child, "go", "yes")
        async with asyncio.timeout(10):
            while calls["note"] < 2:  # noqa: ASYNC110  # parent and fork, both still in `busy`
                await asyncio.sleep(0.01)
        release.set()
        results = [await parent.result(timeout=10), await fork.result(timeout=10)]
    assert results == ["yes-a", "yes-a"]


# -- replay into children ------------------------------------------------------------


async def test_replay_with_children_replays_the_tree_and_names_a_diverging_child(
        db_url: str) -> None:
    parent = await _completed(db_url, "orders", ["a", "b"])
    app, calls = build(db_url, "same")
    async with app:
        alone = await app.replay(parent)
        tree = await app.replay(parent, children=True)
    assert alone.children == () and alone.finished
    assert [r.workflow_name for r in tree.walk()] == ["orders", "order", "order"]
    assert all(r.finished and r.run_status is RunStatus.COMPLETED for r in tree.walk())
    assert [r.entries for r in tree.children] == [2, 2]
    assert not calls  # no step body ran, in the parent or a child

    changed, _ = build(db_url, "renamed")  # the children's code changed, not the parent's
    async with changed:
        assert (await changed.replay(parent)).finished
        with pytest.raises(NonDeterminismError) as caught:
            await changed.replay(parent, children=True)
    assert caught.value.run_id in {r.run_id for r in tree.children}  # type: ignore[attr-defined]
    assert caught.value.position == "1"  # type: ignore[attr-defined]
