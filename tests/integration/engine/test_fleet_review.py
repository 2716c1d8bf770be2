"""Review of the fleet code (leases, fencing, claims, queues): races and failure cases
in which a documented promise breaks.

Each test names what breaks and where (file:line as of commit cad3229). The tests
drive Garrison apps in-process through the public API; where a race needs a precise
interleaving, a second plain PostgreSQL connection holds a row lock (standing for
another process's transaction in flight) or a store method is wrapped to fail once
(standing for a database blip), so that the interleaving happens every time.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

from garrison import Context, Garrison, RunHandle, RunStatus
from garrison.errors import WorkflowCancelled
from garrison.testing import FakeClock
from tests.pg import drop_schemas, fresh_postgres_url


@pytest.fixture(autouse=True)
def _drop_test_schemas() -> Iterator[None]:
    """The PostgreSQL schemas a test made with `fresh_postgres_url()` go at its end."""
    yield
    drop_schemas()


async def until(predicate: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    """Poll `predicate` until it holds (fails the test after `timeout` seconds)."""
    async with asyncio.timeout(timeout):
        while not await predicate():  # noqa: ASYNC110  # the store is what changes
            await asyncio.sleep(0.01)


async def status_of(app: Garrison, run_id: str) -> RunStatus:
    return await app.handle(run_id).status()


async def _is(value: Awaitable[Any], expected: Any) -> bool:
    return bool(await value == expected)


async def outcome_of(handle: RunHandle[Any], timeout: float) -> Any:
    """The run's result, or the exception `result()` raised (a timeout: still not ended)."""
    try:
        return await handle.result(timeout=timeout)
    except Exception as exc:  # the test reports it
        return exc


class Gauge:
    """Step bodies executing at once, and the peak."""

    def __init__(self) -> None:
        self.active = 0
        self.peak = 0

    async def hold(self, seconds: float) -> None:
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            await asyncio.sleep(seconds)
        finally:
            self.active -= 1


# -- queue limits ------------------------------------------------------------------------


async def test_worker_concurrency_holds_for_runs_woken_from_a_park(
    db_url: str, clock: FakeClock,
) -> None:
    """`worker_concurrency=1` ("at most this many of its runs executing in one worker")
    is exceeded as soon as parked runs of the queue come due together.

    Only `claim_queued` is bounded by the queue's worker share (`_worker.py:274-283`);
    the due claim that resumes parked runs is bounded by the worker's total room only
    (`_worker.py:262-271`, `claim_due(limit=room)`), so every due run of the queue is
    claimed and launched at once. Fix: claim due runs per queue with
    `min(room, worker_concurrency - live_in(queue))`, or skip (hand back / leave) the
    due runs of a full queue in `_adopt`.
    """
    gauge = Gauge()
    app = Garrison(db_url, clock=clock)
    app.queue("q", worker_concurrency=1)

    @app.step(name="work")
    async def work(i: int) -> int:
        await gauge.hold(0.2)
        return i

    @app.workflow(name="job")
    async def job(ctx: Context, i: int) -> int:
        await ctx.sleep(60)  # parked: leaves the worker's share free for the next run
        return await work(i)

    async with app:
        handles = [await app.start(job, i, queue="q") for i in range(4)]

        async def all_parked() -> bool:
            return all([await h.status() is RunStatus.WAITING for h in handles])

        await until(all_parked)
        clock.advance(61)  # the four timers come due together
        assert [await h.result(timeout=10) for h in handles] == [0, 1, 2, 3]
    assert gauge.peak == 1, f"{gauge.peak} runs of a worker_concurrency=1 queue ran at once"


async def test_a_partitioned_queue_serves_a_new_key_behind_a_thousand_busy_ones(
    db_url: str,
) -> None:
    """With `partition_concurrency=1` and more than 1,000 keys that each have an active
    run (RUNNING, or WAITING: a conversation waiting for a reply) and a queued one, a new
    key's run is never started, although its key has nothing active: every claim
    returns nothing until one of the 1,000 oldest keys frees its slot.

    `_pick_partitioned` (`_claims.py:152-184`) reads the 1,000 (`_CANDIDATES`) first
    pending runs by turn and age, and only then drops those whose key is at its limit;
    the new key's run, the newest, is not among the candidates. Fix: exclude keys at
    their `partition_concurrency` in the SQL (a NOT IN / anti-join on the active counts)
    before the LIMIT.
    """
    from garrison.store import QueueLimits, RunRecord, open_store

    store = open_store(db_url)
    await store.open()
    limits = QueueLimits("support", partition=True, partition_concurrency=1)

    def run(run_id: str, key: str, at: float, status: RunStatus) -> RunRecord:
        return RunRecord(run_id=run_id, workflow_name="reply", workflow_version="1",
                         status=status, inputs="[]", created_at=at, updated_at=at,
                         queue="support", partition_key=key,
                         started_at=at if status is RunStatus.WAITING else None)

    try:
        await store.register_worker("w1")
        runs = [run(f"active-{k:04}", f"c{k:04}", 1.0 + k, RunStatus.WAITING)
                for k in range(1000)]
        runs += [run(f"queued-{k:04}", f"c{k:04}", 5_000.0 + k, RunStatus.PENDING)
                 for k in range(1000)]
        runs.append(run("new-conversation", "fresh", 9_000.0, RunStatus.PENDING))
        for at in range(0, len(runs), 250):
            await asyncio.gather(*(store.create_run(r) for r in runs[at:at + 250]))

        taken = await store.claim_queued(limits, 10, workflows=None)
    finally:
        await store.close()
    assert [r.run_id for r in taken] == ["new-conversation"]


# -- cancellation and events ----------------------------------------------------------------


async def test_a_cancel_that_lands_before_a_run_parks_is_not_lost(tmp_path: Any) -> None:
    """A cancel requested (by another process) while a run executes a step, seen by the
    worker only after the run parked, is lost: the run stays WAITING with
    `cancel_requested = 1` and no wake-up, forever.

    `request_cancel` wakes only a run that is WAITING at that moment
    (`_sqlite.py:640-644`, `_postgres.py:801-805`: `wake_at = CASE WHEN status =
    'WAITING' ...`); `park_run` then parks the run with `wake_at` NULL without looking at
    `cancel_requested` (`_sqlite.py:604-609`, `_postgres.py:758-763`); the worker's
    look at the changes finds no live run to cancel (`_worker.py:343-351`, it lists
    PENDING and RUNNING runs only) and `claim_due` never takes a WAITING run without a
    due `wake_at` (`_claims.py:63-67`). A worker polls every `poll_interval_s` (0.05 s by
    default), so any run parking within that window after a foreign cancel loses it; a
    long poll interval makes the window certain here. On PostgreSQL the same happens
    when the `c:` notification is handled after the park's commit. Fix: `park_run` sets
    `wake_at = now` when `cancel_requested = 1` (in its UPDATE), as it does for events.
    """
    url = f"sqlite:///{tmp_path}/g.db"
    in_step = asyncio.Event()
    proceed = asyncio.Event()
    worker = Garrison(url, poll_interval_s=30)

    @worker.step(name="first")
    async def first() -> None:
        in_step.set()
        await proceed.wait()

    @worker.workflow(name="job")
    async def job(ctx: Context) -> str:
        await first()
        return str(await ctx.wait_for("go"))

    client = Garrison(url, worker=False)  # another process: an API server, the CLI
    async with worker, client:
        handle = await worker.start(job)
        await in_step.wait()
        await client.cancel(handle.run_id)  # committed while the run is RUNNING
        proceed.set()  # the run goes on to its wait and parks (or sees the cancel first)
        outcome = await outcome_of(handle, 3)
        run = await handle.record()
    assert run.cancel_requested
    assert isinstance(outcome, WorkflowCancelled), (
        f"the cancelled run is {run.status.value} with wake_at={run.wake_at}: {outcome!r}")


class RowLock:
    """A plain PostgreSQL session holding a row lock on a run: another process's
    transaction in flight. `waiters()` counts the sessions it blocks."""

    def __init__(self, url: str) -> None:
        from garrison.store._postgres import parse_postgres_url

        self._libpq, self._schema, _ = parse_postgres_url(url)
        self._conn: Any = None
        self._probe: Any = None

    async def lock(self, run_id: str, mode: str = "FOR UPDATE") -> None:
        import psycopg

        options = f"-c search_path={self._schema}"
        self._conn = await psycopg.AsyncConnection.connect(self._libpq, options=options)
        self._probe = await psycopg.AsyncConnection.connect(self._libpq, autocommit=True)
        await self._conn.execute(f"SELECT 1 FROM runs WHERE run_id = %s {mode}", (run_id,))

    async def lock_queue(self, queue: str) -> None:
        """Hold a queue's claim lock (as a claim in another worker's batch does)."""
        import psycopg

        self._conn = await psycopg.AsyncConnection.connect(self._libpq)
        self._probe = await psycopg.AsyncConnection.connect(self._libpq, autocommit=True)
        await self._conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))",
                                 (f"garrison-queue:{self._schema}:{queue}",))

    async def waiters(self) -> int:
        row = await (await self._probe.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))",
            (self._conn.info.backend_pid,))).fetchone()
        return int(row[0])

    async def waiting_on_waiters(self) -> int:
        """Sessions blocked by a session this one blocks."""
        row = await (await self._probe.execute(
            "SELECT count(*) FROM pg_stat_activity a, pg_stat_activity b "
            "WHERE %s = ANY(pg_blocking_pids(b.pid)) AND b.pid = ANY(pg_blocking_pids(a.pid))",
            (self._conn.info.backend_pid,))).fetchone()
        return int(row[0])

    async def release(self) -> None:
        if self._conn is not None:
            await self._conn.rollback()
            await self._conn.close()
            await self._probe.close()
            self._conn = None


async def test_postgres_an_event_sent_while_the_run_parks_wakes_it() -> None:
    """An event whose transaction is in flight while its run parks (on another worker)
    is never delivered: the run stays WAITING, `wake_at` NULL, the event unconsumed.

    `_insert_event` (`_postgres.py:954-967`) wakes the run with `UPDATE runs SET wake_at
    ... WHERE run_id = %s AND status = 'WAITING'`: the run is still RUNNING when that
    statement runs, so it matches nothing and locks nothing. The park (`_postgres.py:
    745-764`) then looks for unconsumed events with a snapshot that cannot see the
    uncommitted event, parks with no wake-up and commits; the event commits after. The
    `e:` notification reaches the worker, but the run is not live and `claim_due`
    (`_claims.py:63-67`) only takes a due `wake_at`. The window is the sender's whole
    group-commit batch (here held open by a second write in the same batch waiting on a
    lock, as any slow batch would). The same `_insert_event` reports a child's end to
    its parent (`finish_run(notify=...)`), so a parent parking on one worker while its
    child ends on another can wait forever too. Fix: lock the run's row before inserting
    the event (`SELECT status FROM runs WHERE run_id = %s FOR SHARE` in `send_event`
    and in `_insert_event`), so that the park's fence lock orders the two.
    """
    url = fresh_postgres_url()
    in_step = asyncio.Event()
    proceed = asyncio.Event()
    worker = Garrison(url)

    @worker.step(name="first")
    async def first() -> None:
        in_step.set()
        await proceed.wait()

    @worker.workflow(name="job")
    async def job(ctx: Context) -> str:
        await first()
        return str(await ctx.wait_for("go"))

    client = Garrison(url, worker=False)
    client.queue("elsewhere")  # served by no worker: its run only takes part in a batch
    blocker = RowLock(url)
    async with worker, client:
        handle = await worker.start(job)
        other = await client.start(job, queue="elsewhere")
        await in_step.wait()
        await blocker.lock(other.run_id)
        try:
            # One client batch: the event for the run, then a write that waits on a lock.
            sending = asyncio.gather(client.send(handle.run_id, "go", 1),
                                     client.cancel(other.run_id))
            await until(lambda: _is(blocker.waiters(), 1))
            proceed.set()  # the run reaches its wait and parks meanwhile: its park now
            await asyncio.sleep(0.3)  # waits for the event's batch (the run's row lock)
        finally:
            await blocker.release()
        await sending  # the event is committed now, and notified
        outcome = await outcome_of(handle, 3)
        run = await handle.record()
        events = await worker.store.list_events(handle.run_id)
    assert outcome == "1", (
        f"run {run.status.value}, wake_at={run.wake_at}, mailbox={events}: {outcome!r}")


# -- runs stuck with a live lease ----------------------------------------------------------


async def test_postgres_a_retry_whose_claim_skips_a_locked_row_is_retried_again() -> None:
    """A run whose write failed once (a database blip) is never resumed if, when its
    retry comes, any other transaction holds its row: it stays RUNNING, owned by this
    worker, its lease renewed by the heartbeat forever, and nothing executes it.

    `_retry_due` (`_worker.py:328-339`) deletes the retry when `claim_run` returns None,
    reading None as "it ended, or another worker holds it". But `claim_one`
    (`_claims.py:91-103`) selects with `FOR UPDATE SKIP LOCKED`, so a row merely locked
    by someone else (a client's `app.cancel`/`app.send` batch, a parent's cancel
    flagging its children, an operator's UPDATE) also yields None. The run is still in
    the store's lease book, so `renew_leases` keeps its lease alive and no other worker
    may claim it either. Fix: `claim_one` should wait for the row (`FOR UPDATE`, it
    targets one run), or `_retry_due` should call `retry_later` again while
    `store.holds(run_id)`.
    """
    url = fresh_postgres_url()
    app = Garrison(url)  # lease_ttl_s=10: the first renewal comes after the retry
    blocker = RowLock(url)
    retried = asyncio.Event()

    @app.step(name="work")
    async def work() -> str:
        return "done"

    @app.workflow(name="job")
    async def job(ctx: Context) -> str:
        return await work()

    async with app:
        store: Any = app.store
        finish, claim_run = store.finish_run, store.claim_run

        async def finish_once(run_id: str, *args: Any, **kwargs: Any) -> Any:
            from garrison.errors import StoreError

            store.finish_run = finish  # fails once: a blip
            await blocker.lock(run_id, "FOR NO KEY UPDATE")  # someone writes the row
            raise StoreError("PostgreSQL store: commit failed (a blip)")

        async def claim_and_tell(run_id: str, **kwargs: Any) -> Any:
            retried.set()  # the retry's claim starts (and waits for the row)
            return await claim_run(run_id, **kwargs)

        store.finish_run, store.claim_run = finish_once, claim_and_tell
        try:
            handle = await app.start(job)
            await asyncio.wait_for(retried.wait(), 5)  # the retry came while the row was locked
        finally:
            await blocker.release()
        outcome = await outcome_of(handle, 3)
        run = await handle.record()
    assert outcome == "done", (
        f"run {run.status.value}, owner {run.owner}, lease_until {run.lease_until} "
        f"(renewed): {outcome!r}")


async def test_a_failed_write_while_parking_is_retried_not_left_running(
    db_url: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A journal write that fails while a run parks (a journaled value taken just before
    everything waits, e.g. `ctx.now()`) kills the run's task instead of scheduling a
    retry: the run stays RUNNING and held by this worker, its lease renewed forever, and
    it never resumes (an event sent later does not wake it either).

    `_park` flushes the buffered values (`_execution.py:224-227`) through `_append`,
    which after its retries raises `_StoreFailure`, a BaseException
    (`_execution.py:343`, `:310-315`). `drive` catches `_StoreFailure` only around the
    body (`_execution.py:171-174`), not around `_park`/`_finish`, and `_execute` catches
    `StoreError` only (`_worker.py:209-210`): `store_failed` is never called, nothing
    schedules a retry, and the store's lease book still holds the run, so
    `renew_leases` keeps its lease and no claim takes it. Fix: catch `_StoreFailure` in
    `drive` around `_park()`/`_finish()` too (and call `worker.store_failed`).
    """
    import garrison.engine._execution as execution_module
    from garrison.errors import StoreError
    from garrison.store import StepKind

    monkeypatch.setattr(execution_module, "_APPEND_RETRIES_S", (0.01,))  # quick give-up
    in_step = asyncio.Event()
    app = Garrison(db_url)

    @app.step(name="first")
    async def first(run_id: str) -> None:
        in_step.set()

        async def wait_journaled() -> bool:
            journal = await app.store.load_journal(run_id)
            return any(s.kind is StepKind.WAIT for s in journal)

        await until(wait_journaled)  # the branch's wait is journaled and blocks

    @app.workflow(name="job")
    async def job(ctx: Context) -> str:
        waiting = asyncio.ensure_future(ctx.wait_for("go"))
        await first(ctx.run_id)
        ctx.now()  # buffered: written with the next journaled operation, or at the park
        return str(await waiting)

    async with app:
        store: Any = app.store
        append = store.append_steps
        failing = True

        async def append_steps(steps: Any) -> None:
            if failing and any(s.kind is StepKind.NOW for s in steps):
                raise StoreError("store: commit failed (the database is restarting)")
            await append(steps)

        store.append_steps = append_steps
        handle = await app.start(job)
        await in_step.wait()

        async def outage_over() -> bool:
            return not app.worker.live  # type: ignore[union-attr]

        await until(outage_over)  # the park's write failed (twice) and the run let go
        failing = False  # the store heals
        await app.send(handle.run_id, "go", 1)
        outcome = await outcome_of(handle, 3)
        run = await handle.record()
    assert outcome == "1", (
        f"run {run.status.value}, owner {run.owner}, lease_until {run.lease_until}: "
        f"{outcome!r}")


# -- a cancel racing a claim -------------------------------------------------------------


def cancel_during_due_claim(app: Garrison, run_id: str, due_at: float, *,
                            request_first: bool) -> asyncio.Future[BaseException | None]:
    """Call `app.cancel(run_id)` while the worker's due claim of it is in flight, so that
    the cancel request and the claim share one batch: after the claim
    (`request_first=False`) or before it. Returns what `app.cancel` raised (or None)."""
    store: Any = app.store
    claim_due = store.claim_due
    outcome: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()
    tasks: list[asyncio.Task[None]] = []

    async def cancel() -> None:
        try:
            await app.cancel(run_id)
        except Exception as exc:  # what reaches the caller
            outcome.set_result(exc)
        else:
            outcome.set_result(None)

    async def claim_due_with_cancel(**kwargs: Any) -> Any:
        if kwargs["now"] >= due_at and store.claim_due is claim_due_with_cancel:
            store.claim_due = claim_due
            tasks.append(asyncio.ensure_future(cancel()))
            if request_first:
                await asyncio.sleep(0)  # app.cancel submits its request first
        return await claim_due(**kwargs)

    store.claim_due = claim_due_with_cancel
    return outcome


async def test_a_cancel_right_after_a_claim_ends_the_run_and_frees_its_slot(
    db_url: str, clock: FakeClock,
) -> None:
    """`app.cancel` of a run the worker has just claimed, before the run's task took its
    first step, leaves the run RUNNING forever and its slot taken: the worker (here
    `concurrency=1`) never executes anything again.

    The worker's due claim (`_worker.py:265-271`) launches the run (`launch`,
    `_worker.py:183-193`: the execution enters `live`, its task is created); `app.cancel`
    finds it in `live` and calls `execution.cancel()` (`_app.py:406-409`), which cancels a
    task that has not started (`_execution.py:142-149`). A task cancelled before its
    first step never runs its coroutine, so neither `drive` (which would write CANCELLED)
    nor `_execute`'s `finally` (which removes the run from `live`, `_worker.py:211-213`)
    runs: the run stays in `live` (taking a slot of `_room()` and refusing any new
    `launch`), stays in the lease book (the heartbeat renews its lease) and stays RUNNING.
    The same happens with a `c:` notification handled right after a claim
    (`_worker.py:352-354`). Fix: remove from `live` in a task done-callback rather than
    in the coroutine's `finally`, and have `RunExecution.cancel()` on a task that has not
    started mark the run cancelled (so `_execute_body` returns CANCELLED) instead of
    cancelling the task.
    """
    app = Garrison(db_url, clock=clock, concurrency=1)

    @app.workflow(name="job")
    async def job(ctx: Context) -> str:
        await ctx.sleep(60)
        return "woke"

    @app.workflow(name="quick")
    async def quick(ctx: Context) -> str:
        return "quick"

    async with app:
        handle = await app.start(job)
        await until(lambda: _is(handle.status(), RunStatus.WAITING))
        cancelled = cancel_during_due_claim(app, handle.run_id, clock.time() + 60,
                                            request_first=False)
        clock.advance(61)  # the timer is due: the worker's loop claims and launches the run
        assert await cancelled is None
        ended = await outcome_of(handle, 3)
        later = await app.start(quick)
        after = await outcome_of(later, 2)
        stuck = {run_id: (e.task.cancelled() if e.task else None)
                 for run_id, e in app.worker.live.items()}  # type: ignore[union-attr]
    assert isinstance(ended, WorkflowCancelled) and after == "quick", (
        f"cancelled run: {ended!r}; next run: {after!r}; "
        f"live executions (task cancelled?): {stuck}")


# -- hand-back on close ---------------------------------------------------------------------


async def test_postgres_close_hands_back_a_run_whose_claim_was_in_flight() -> None:
    """A run claimed by a claim that was in flight when the worker stopped is not handed
    back: it stays RUNNING, owned by the stopped worker, for the whole lease (10 s)
    before any other worker may take it ("another worker claims them at once (no lease
    wait)", docs/deployment.md, Rolling deploys).

    `stop()` cancels the loop task (`_worker.py:106-110`) while it awaits
    `claim_queued`; cancelling the awaiting task cancels the write's future, but a batch
    already in flight still commits the claim (`_postgres.py:286-288` skips setting the
    result of a cancelled future). `_took` (`_leases.py:244-247`) never books the runs,
    so `store.held()` (`_worker.py:116`) does not list them and `release_runs` does not
    release them. Here the claim waits on the queue's claim lock (held by another
    worker's batch) while the worker stops. Fix: book claims in the store whatever the
    caller does (do `_took` inside the write, or shield the claim in the loop), and
    release what a cancelled claim took.
    """
    url = fresh_postgres_url()

    def build(**options: Any) -> Garrison:
        app = Garrison(url, **options)
        app.queue("q", concurrency=5)

        @app.workflow(name="job")
        async def job(ctx: Context) -> str:
            return "done"

        return app

    first, second, client = build(worker_id="A"), build(worker_id="B"), build(worker=False)
    blocker = RowLock(url)

    async def stopped() -> bool:  # stopping: claims nothing more, hand-back under way
        return first.worker is None or first.worker._stopping

    async with client:
        await first.open()
        closing = None
        try:
            await blocker.lock_queue("q")
            handle: RunHandle[Any] = await client.start(
                "job", queue="q")  # type: ignore[arg-type]
            await until(lambda: _is(blocker.waiters(), 1))  # A's claim waits for the lock
            closing = asyncio.ensure_future(first.close())
            await until(stopped)  # A's worker is stopping (its hand-back waits its turn)
        finally:
            await blocker.release()  # the in-flight claim commits now
            await (closing if closing is not None else first.close())
        async with second:
            outcome = await outcome_of(handle, 3)
            run = await handle.record()
    assert outcome == "done", (
        f"run {run.status.value}, owner {run.owner} (stopped), lease_until in "
        f"{run.lease_until - time.time():.1f} s: {outcome!r}")  # type: ignore[operator]


# -- LeaseLostError reaching the user --------------------------------------------------------


async def test_cancel_of_a_run_coming_due_does_not_raise_lease_lost(
    db_url: str, clock: FakeClock,
) -> None:
    """`app.cancel` of a parked run whose timer comes due at that moment raises
    `LeaseLostError` (an internal fencing error) to the caller.

    The worker's due claim and `app.cancel`'s `claim_run` both take the run: `claim_one`
    re-claims a run this worker already holds (`_claims.py:95-97`, `owner = ?`), and
    `app.cancel` checked `store.holds()` (`_app.py:410`) before the due claim was booked.
    Then both finish it as CANCELLED: the worker's `_cancel_claimed` (`_worker.py:237-241`)
    and `app.cancel` itself (`_app.py:412-414`). The first finish removes the run from the
    lease book (`_postgres.py:794`); the second is refused by `_fenced` as "not held"
    (`_postgres.py:548-550`) and the LeaseLostError propagates out of `app.cancel`. (On
    SQLite the two finishes share a batch and the second merely changes nothing.) Fix:
    `app.cancel` must not claim a run this worker holds or is claiming (`claim_one`
    without `owner = ?` for this use), and should read a LeaseLostError of its own finish
    as "another claim ends it".
    """
    app = Garrison(db_url, clock=clock)

    @app.workflow(name="job")
    async def job(ctx: Context) -> str:
        await ctx.sleep(60)
        return "woke"

    async with app:
        handle = await app.start(job)
        await until(lambda: _is(handle.status(), RunStatus.WAITING))
        cancelled = cancel_during_due_claim(app, handle.run_id, clock.time() + 60,
                                            request_first=True)
        clock.advance(61)  # the timer is due: the worker's loop claims the run
        raised = await cancelled
        ended = await outcome_of(handle, 5)
    assert raised is None, f"app.cancel raised {raised!r}"
    assert isinstance(ended, WorkflowCancelled), ended


# -- children ------------------------------------------------------------------------------


async def test_postgres_a_cancelled_parents_live_child_on_another_worker_is_cancelled() -> None:
    """A parent cancelled on worker A while its child executes on worker B: if A's
    follow-up after the CANCELLED commit does not happen (a database blip, or A dies right
    after the commit), the child is never cancelled; it runs to completion.

    The parent's CANCELLED commit flags the children in the same transaction
    (`CANCEL_CHILDREN`, `_postgres.py:788-789`) precisely so that "a crash right after it
    cannot leave them running" (docs/guarantees.md, Cancellation); but it notifies only
    `q:<queue>` (`_postgres.py:783-784`), never `c:<child>`. A live child is cancelled
    only by the `app.cancel(child)` calls that `finish_stored` makes afterwards
    (`_worker.py:460-463`, whose `c:` notification reaches B); when those do not happen,
    B never looks at the flag (`_worker.py:352-358`: the flag is read for live runs only
    on a `c:` notification or an "everything" look). Here A's listing of the children
    fails once after the commit (`store_failed` -> retry; the retry finds the parent
    ended and does nothing). Fix: `CANCEL_CHILDREN ... RETURNING run_id` and a
    `pg_notify('c:<child>')` per flagged child in the same transaction.
    """
    from garrison.errors import StoreError

    url = fresh_postgres_url()
    in_child = asyncio.Event()
    child_cancelled = asyncio.Event()
    release = asyncio.Event()
    blip = asyncio.Event()

    def build(**options: Any) -> Garrison:
        app = Garrison(url, **options)
        app.queue("parents")

        @app.step(name="block")
        async def block() -> None:
            in_child.set()
            try:
                await release.wait()
            except asyncio.CancelledError:
                child_cancelled.set()
                raise

        @app.workflow(name="child")
        async def child(ctx: Context) -> str:
            await block()
            return "child done"

        @app.workflow(name="parent")
        async def parent(ctx: Context) -> str:
            handle = await ctx.start_child(child)
            return str(await handle.result())

        return app

    a = build(worker_id="A", queues=["parents"])  # runs parents only
    b = build(worker_id="B", queues=["default"])  # runs the children
    client = build(worker=False)
    async with a, b, client:
        store: Any = a.store
        list_runs = store.list_runs

        async def list_runs_blip(**kwargs: Any) -> Any:
            if kwargs.get("parent_run_id") is not None and not blip.is_set():
                blip.set()  # right after the parent's CANCELLED commit
                raise StoreError("PostgreSQL store: read failed (a blip)")
            return await list_runs(**kwargs)

        store.list_runs = list_runs_blip
        parent: RunHandle[Any] = await client.start(
            "parent", queue="parents")  # type: ignore[arg-type]
        await in_child.wait()  # the child executes on B
        [child] = await client.store.list_runs(parent_run_id=parent.run_id)
        await client.cancel(parent.run_id)
        await asyncio.wait_for(blip.wait(), 5)
        await until(lambda: _is(parent.status(), RunStatus.CANCELLED))
        with contextlib.suppress(TimeoutError):  # a c: notification takes milliseconds
            await asyncio.wait_for(child_cancelled.wait(), 3)
        release.set()
        ended = await outcome_of(client.handle(child.run_id), 5)
        record = await client.handle(child.run_id).record()
    assert child_cancelled.is_set() and isinstance(ended, WorkflowCancelled), (
        f"child of a cancelled parent: cancel_requested={record.cancel_requested}, "
        f"ended {record.status.value} ({ended!r})")


# -- clocks ------------------------------------------------------------------------------


async def test_postgres_an_event_from_a_host_whose_clock_runs_ahead_wakes_the_run_now() -> None:
    """An event sent from a host whose clock runs ahead of the workers' wakes the parked
    run only when the workers' clocks catch up (here: in an hour).

    `app.send` passes the sender's clock as `sent_at` (`_app.py:396`), and
    `_insert_event` (`_postgres.py:962-966`) makes it the run's `wake_at`; `claim_due`
    compares `wake_at` with the claiming worker's clock (`_claims.py:64`,
    `_worker.py:265`). The same holds for `app.cancel` of a parked run
    (`request_cancel(now=...)`, `_app.py:403`, `_postgres.py:801-805`). docs/deployment.md
    says leases are compared on the database server's clock "so hosts whose clocks
    disagree still agree on expiry", but an event or a cancel is delayed by the skew.
    Fix: an arrival makes the run due at once whatever the clocks say (e.g. `wake_at =
    least(coalesce(wake_at, 0), 0)`, or the server's `now()` with workers claiming on the
    server clock too).
    """
    url = fresh_postgres_url()
    worker = Garrison(url)

    @worker.workflow(name="job")
    async def job(ctx: Context) -> str:
        return str(await ctx.wait_for("go"))

    # An API server on a host whose clock is an hour ahead (a FakeClock stands for it).
    client = Garrison(url, worker=False, clock=FakeClock(start=time.time() + 3600))
    async with worker, client:
        handle = await worker.start(job)
        await until(lambda: _is(handle.status(), RunStatus.WAITING))
        await client.send(handle.run_id, "go", 1)
        outcome = await outcome_of(handle, 3)
        run = await handle.record()
    assert outcome == "1", (
        f"run {run.status.value}, wake_at in {run.wake_at - time.time():.0f} s: "  # type: ignore[operator]
        f"{outcome!r}")


# -- deadlocks between two workers' batches ------------------------------------------------


async def test_postgres_two_workers_batches_do_not_deadlock() -> None:
    """Two workers' group-commit transactions deadlock when one holds a run's row lock
    and waits for a queue's claim lock while the other holds the queue's claim lock and
    waits for that row; PostgreSQL aborts one after `deadlock_timeout` (1 s) and every
    write of that batch fails with StoreError (here a user's `app.cancel`-style request
    and the claim; in general any journal write, `app.start` or `app.send` batched with
    them).

    A batch runs its writes in submission order in one transaction
    (`_postgres.py:334-373`): a fenced write locks its run's row (`_fenced`,
    `_append_one`), a claim on a limited queue takes a transaction-scoped advisory lock
    (`_claims.py:119-120`), `request_cancel` and `_insert_event` lock other runs' rows
    (`_postgres.py:801-806`, `:962-966`), `CANCEL_CHILDREN` locks children held by other
    workers. Nothing orders these locks across the batch (only `_write_steps_together`
    sorts its own row locks). Here worker A's batch is [journal write for its run R1,
    claim on queue q] and worker B's is [claim on q, cancel request for R3, cancel
    request for R1]; a third session holding R3 makes the interleaving certain. Fix:
    take a batch's claim locks before any row lock (run claims first, or in their own
    transaction), and lock the rows a batch touches in one sorted statement up front.
    """
    from garrison.store import QueueLimits, RunRecord, StepKind, StepRecord, StepStatus
    from garrison.store import open_store as open_any_store

    url = fresh_postgres_url()
    first, second = open_any_store(url), open_any_store(url)
    await first.open()
    await second.open()
    blocker = RowLock(url)
    limits = QueueLimits("q", concurrency=10)

    def run(run_id: str, queue: str = "default") -> RunRecord:
        return RunRecord(run_id=run_id, workflow_name="job", workflow_version="1",
                         status=RunStatus.PENDING, inputs="[]", created_at=1.0,
                         updated_at=1.0, queue=queue)

    try:
        await first.register_worker("A")
        await second.register_worker("B")
        for run_id in ("R1", "R3"):
            await first.create_run(run(run_id))
        await first.create_run(run("Q1", queue="q"))
        [r1] = await first.claim_queued(QueueLimits("default"), 1, workflows=None)
        assert r1.run_id == "R1"  # A holds R1
        step = StepRecord(run_id="R1", position="1", kind=StepKind.STEP, name="s",
                          status=StepStatus.COMPLETED, started_at=1.0, output="1",
                          completed_at=1.0)

        await blocker.lock("R3")
        b_batch = asyncio.gather(second.claim_queued(limits, 1, workflows=None),
                                 second.request_cancel("R3"), second.request_cancel("R1"),
                                 return_exceptions=True)
        await until(lambda: _is(blocker.waiters(), 1))  # B holds q's lock, waits for R3
        a_batch = asyncio.gather(first.append_steps([step]),
                                 first.claim_queued(limits, 1, workflows=None),
                                 return_exceptions=True)
        await until(lambda: _is(blocker.waiting_on_waiters(), 1))  # A: R1 held, waits for q
        await blocker.release()  # B goes on to R1: a cycle
        outcomes = [*await a_batch, *await b_batch]
    finally:
        await blocker.release()
        await first.close()
        await second.close()
    failed = [o for o in outcomes if isinstance(o, BaseException)]
    assert not failed, f"{len(failed)} writes failed: {failed[0]!r}"


async def test_result_of_a_run_another_worker_executes_is_read_soon_not_at_the_safety_net(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A process running a worker of its own (serving other queues) awaited
    `handle.result()` of a run executed elsewhere by the 5 s safety-net poll meant for
    its own runs (_handle.py): now only a run executing here waits on its future."""
    from garrison.engine import _handle

    monkeypatch.setattr(_handle, "_LOCAL_POLL_S", 60.0)  # were it used, the result waits
    url = fresh_postgres_url()

    def build(queues: list[str]) -> tuple[Garrison, Any]:
        app = Garrison(url, queues=queues, claim_interval_s=0.1)
        app.queue("api")
        app.queue("jobs")

        @app.workflow(name="job")
        async def job(ctx: Context, i: int) -> int:
            return i

        return app, job

    executor, _ = build(["jobs"])
    api, job = build(["api"])
    async with executor, api:
        for i in range(3):
            handle = await api.start(job, i, queue="jobs")
            assert await handle.result(timeout=10) == i
            assert handle.run_id not in api.worker.live  # type: ignore[union-attr]
