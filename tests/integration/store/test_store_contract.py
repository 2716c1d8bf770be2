"""The `Store` contract: what every backend promises the engine, checked over `store`.

Tests that read backend-only counters take the `sqlite_store` fixture, which skips other
backends with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from garrison.errors import RunNotFoundError, StoreError, WorkflowConflictError, WorkflowError
from garrison.store import (
    EventRecord,
    RunRecord,
    RunStatus,
    SQLiteStore,
    StepKind,
    StepRecord,
    StepStatus,
    Store,
    open_store,
    position_key,
)

FAR_FUTURE = 4_000_000_000.0
TERMINAL = [RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED]


def make_run(
    run_id: str = "r1",
    *,
    status: RunStatus = RunStatus.PENDING,
    workflow_name: str = "checkout",
    created_at: float = 1_000.0,
    inputs: str = "[]",
    parent_run_id: str | None = None,
    wake_at: float | None = None,
    owner: str | None = None,
    workflow_version: str = "v1",
) -> RunRecord:
    return RunRecord(
        run_id=run_id, workflow_name=workflow_name, workflow_version=workflow_version,
        status=status,
        inputs=inputs, created_at=created_at, updated_at=created_at,
        parent_run_id=parent_run_id, parent_position="1" if parent_run_id else None,
        wake_at=wake_at, owner=owner,
    )


def make_step(
    run_id: str = "r1",
    position: str = "1",
    *,
    status: StepStatus = StepStatus.COMPLETED,
    kind: StepKind = StepKind.STEP,
    name: str = "charge_card",
    output: str | None = '"ok"',
    error: str | None = None,
    fire_at: float | None = None,
) -> StepRecord:
    done = status is not StepStatus.PENDING
    return StepRecord(
        run_id=run_id, position=position, kind=kind, name=name, status=status,
        started_at=1_000.0, inputs="[]", output=output if done else None,
        error=error, completed_at=1_001.0 if done else None, fire_at=fire_at,
    )


async def journal(store: Store, run_id: str) -> list[StepRecord]:
    return sorted(await store.load_journal(run_id), key=lambda s: position_key(s.position))


async def stored(store: Store, run_id: str) -> RunRecord:
    run = await store.get_run(run_id)
    assert run is not None, f"run {run_id!r} is missing from the store"
    return run


@pytest.fixture
def sqlite_store(store: Store) -> SQLiteStore:
    if not isinstance(store, SQLiteStore):
        pytest.skip("SQLite-only: reads SQLiteStore.stats, the group-commit counters")
    return store


# -- create_run / get_run ----------------------------------------------------------


async def test_create_run_stores_new_run_and_reports_created(store: Store) -> None:
    run = make_run()

    assert await store.create_run(run) == (run, True)
    assert await store.get_run("r1") == run


async def test_create_run_with_existing_id_returns_stored_run_and_never_overwrites(
    store: Store,
) -> None:
    first = make_run(inputs='["first"]')
    await store.create_run(first)

    again = await store.create_run(make_run(inputs='["second"]', workflow_name="refund"))

    assert again == (first, False)
    assert await store.get_run("r1") == first


async def test_get_run_returns_none_for_unknown_run(store: Store) -> None:
    await store.create_run(make_run("r1"))

    assert await store.get_run("nope") is None


async def test_every_run_field_survives_the_store(store: Store) -> None:
    run = RunRecord(
        run_id="r1", workflow_name="checkout", workflow_version="v7", status=RunStatus.WAITING,
        inputs='[{"sku":"a"}]', created_at=1_000.25, updated_at=1_001.5, tenant_id="acme",
        result='"r"', error='{"type":"x"}', parent_run_id="p", parent_position="4.2",
        queue="slow", completed_at=1_002.0, wake_at=1_003.0, deadline_at=1_004.0,
        trace_context="00-abc-01", cancel_requested=True, owner="w1",
    )
    await store.create_run(run)

    assert await store.get_run("r1") == run


async def test_written_runs_and_journal_survive_close_and_reopen(store_url: str) -> None:
    first = open_store(store_url)
    await first.open()
    await first.create_run(make_run())
    await first.append_steps([make_step()])
    await first.close()

    second = open_store(store_url)
    await second.open()
    try:
        assert await second.get_run("r1") == make_run()
        assert await journal(second, "r1") == [make_step()]
    finally:
        await second.close()


# -- create_child_run --------------------------------------------------------------


async def test_create_child_run_writes_child_run_and_parent_journal_entry(store: Store) -> None:
    await store.create_run(make_run("parent", status=RunStatus.RUNNING))
    child = make_run("child", parent_run_id="parent")
    entry = make_step("parent", "1", kind=StepKind.CHILD, name="ship", output='"child"')

    assert await store.create_child_run(child, entry) == (child, True)

    assert await store.get_run("child") == child
    assert await journal(store, "parent") == [entry]


async def test_create_child_run_again_returns_existing_child_and_keeps_one_entry(
    store: Store,
) -> None:
    await store.create_run(make_run("parent", status=RunStatus.RUNNING))
    child = make_run("child", parent_run_id="parent")
    entry = make_step("parent", "1", kind=StepKind.CHILD, name="ship", output='"child"')
    await store.create_child_run(child, entry)

    again = await store.create_child_run(
        make_run("child", parent_run_id="parent", inputs='["other"]'), entry)

    assert again == (child, False)
    assert await journal(store, "parent") == [entry]


async def test_create_child_run_refuses_a_run_id_owned_by_another_parent(store: Store) -> None:
    await store.create_run(make_run("parent", status=RunStatus.RUNNING))
    await store.create_run(make_run("other", status=RunStatus.RUNNING))
    await store.create_run(make_run("child", parent_run_id="other"))
    entry = make_step("parent", "1", kind=StepKind.CHILD, name="ship", output='"child"')

    with pytest.raises(WorkflowConflictError, match="already belongs to another run"):
        await store.create_child_run(make_run("child", parent_run_id="parent"), entry)

    assert await journal(store, "parent") == []


async def test_create_child_run_whose_journal_entry_fails_writes_no_child_run(
    store: Store,
) -> None:
    await store.create_run(make_run("parent", status=RunStatus.RUNNING))
    # A NULL name breaks the journal's NOT NULL constraint in every backend: the entry
    # cannot be written, so the child run written just before it must roll back too.
    broken = make_step("parent", "1", kind=StepKind.CHILD, name=None)  # type: ignore[arg-type]

    with pytest.raises(Exception):  # noqa: B017  # the type is pinned by the test below
        await store.create_child_run(make_run("child", parent_run_id="parent"), broken)

    assert await store.get_run("child") is None
    assert await store.load_journal("parent") == []


async def test_rejected_write_raises_store_error(store: Store) -> None:
    await store.create_run(make_run("parent", status=RunStatus.RUNNING))
    broken = make_step("parent", "1", kind=StepKind.CHILD, name=None)  # type: ignore[arg-type]

    with pytest.raises(StoreError, match="constraint"):
        await store.create_child_run(make_run("child", parent_run_id="parent"), broken)


# A lone surrogate is what `os.fsdecode` makes of a non-UTF-8 file name; no database
# can store it as UTF-8 text. The guard turns a hung write into a failure, not a wait.
UNENCODABLE = '"report-\udcff.pdf"'
HANG_GUARD_S = 2.0


async def test_write_of_text_the_database_cannot_encode_raises_store_error(
    store: Store,
) -> None:
    await store.create_run(make_run())

    async with asyncio.timeout(HANG_GUARD_S):
        with pytest.raises(StoreError):
            await store.append_steps([make_step(output=UNENCODABLE)])

    assert await store.load_journal("r1") == []


async def test_store_keeps_writing_after_a_write_of_unencodable_text(store: Store) -> None:
    await store.create_run(make_run())
    with contextlib.suppress(StoreError, TimeoutError):
        async with asyncio.timeout(HANG_GUARD_S):
            await store.append_steps([make_step(position="1", output=UNENCODABLE)])

    await store.append_steps([make_step(position="2")])

    assert await journal(store, "r1") == [make_step(position="2")]


# -- list_runs ---------------------------------------------------------------------


@pytest.fixture
async def five_runs(store: Store) -> Store:
    runs = [
        make_run("a", created_at=1.0, status=RunStatus.COMPLETED, workflow_name="checkout"),
        make_run("b", created_at=2.0, status=RunStatus.RUNNING, workflow_name="refund"),
        make_run("c", created_at=3.0, status=RunStatus.WAITING, parent_run_id="a"),
        make_run("d", created_at=4.0, status=RunStatus.FAILED, parent_run_id="a"),
        make_run("e", created_at=5.0, status=RunStatus.PENDING, workflow_name="refund"),
    ]
    for run in runs:
        await store.create_run(run)
    return store


async def test_list_runs_returns_every_run_newest_first(five_runs: Store) -> None:
    runs = await five_runs.list_runs()

    assert [r.run_id for r in runs] == ["e", "d", "c", "b", "a"]


async def test_list_runs_filters_by_any_of_the_statuses(five_runs: Store) -> None:
    runs = await five_runs.list_runs(statuses=[RunStatus.FAILED, RunStatus.RUNNING])

    assert [r.run_id for r in runs] == ["d", "b"]


async def test_list_runs_filters_by_workflow_name(five_runs: Store) -> None:
    runs = await five_runs.list_runs(workflow_name="refund")

    assert [r.run_id for r in runs] == ["e", "b"]


async def test_list_runs_filters_by_parent_run_id(five_runs: Store) -> None:
    runs = await five_runs.list_runs(parent_run_id="a")

    assert [r.run_id for r in runs] == ["d", "c"]


async def test_list_runs_combines_filters_with_and(five_runs: Store) -> None:
    runs = await five_runs.list_runs(statuses=[RunStatus.PENDING], workflow_name="checkout")

    assert runs == []


async def test_list_runs_limit_keeps_the_newest(five_runs: Store) -> None:
    runs = await five_runs.list_runs(limit=2)

    assert [r.run_id for r in runs] == ["e", "d"]


# -- append_steps / load_journal ---------------------------------------------------


async def test_append_steps_writes_every_entry_and_load_journal_returns_them(
    store: Store,
) -> None:
    await store.create_run(make_run())
    steps = [make_step(position=p, output=f'"{p}"') for p in ("1", "2", "2.1", "10")]

    await store.append_steps(steps)

    assert await journal(store, "r1") == steps


async def test_load_journal_returns_only_that_runs_entries(store: Store) -> None:
    await store.create_run(make_run("r1"))
    await store.create_run(make_run("r2"))
    await store.append_steps([make_step("r1", "1"), make_step("r2", "1"), make_step("r2", "2")])

    assert await journal(store, "r1") == [make_step("r1", "1")]
    assert await store.load_journal("unknown") == []


@pytest.mark.parametrize("outcome", [StepStatus.COMPLETED, StepStatus.FAILED])
async def test_finished_entry_replaces_pending_entry(store: Store, outcome: StepStatus) -> None:
    await store.create_run(make_run())
    pending = make_step(status=StepStatus.PENDING, kind=StepKind.SLEEP, fire_at=2_000.0)
    await store.append_steps([pending])
    finished = make_step(
        status=outcome, kind=StepKind.SLEEP, fire_at=2_000.0, output='"done"',
        error='{"type":"builtins:ValueError"}' if outcome is StepStatus.FAILED else None,
    )

    await store.append_steps([finished])

    assert await journal(store, "r1") == [finished]


@pytest.mark.parametrize(
    "later",
    [
        make_step(status=StepStatus.COMPLETED, output='"second"'),
        make_step(status=StepStatus.FAILED, output=None, error='{"type":"x"}'),
        make_step(status=StepStatus.PENDING),
    ],
    ids=["completed", "failed", "pending"],
)
async def test_completed_entry_is_never_overwritten(store: Store, later: StepRecord) -> None:
    await store.create_run(make_run())
    first = make_step(output='"first"')
    await store.append_steps([first])

    await store.append_steps([later])

    assert await journal(store, "r1") == [first]


# -- set_run_status ----------------------------------------------------------------


async def test_set_run_status_moves_run_records_owner_and_clears_wake_up(store: Store) -> None:
    await store.create_run(make_run(status=RunStatus.WAITING, wake_at=2_000.0))

    await store.set_run_status("r1", RunStatus.RUNNING, owner="worker-1")

    run = await stored(store, "r1")
    assert (run.status, run.owner, run.wake_at) == (RunStatus.RUNNING, "worker-1", None)


async def test_set_run_status_without_owner_keeps_the_owner(store: Store) -> None:
    await store.create_run(make_run(status=RunStatus.RUNNING, owner="worker-1"))

    await store.set_run_status("r1", RunStatus.PENDING)

    run = await stored(store, "r1")
    assert (run.status, run.owner) == (RunStatus.PENDING, "worker-1")


@pytest.mark.parametrize("terminal", TERMINAL)
async def test_set_run_status_never_changes_a_terminal_run(
    store: Store, terminal: RunStatus,
) -> None:
    await store.create_run(make_run(status=RunStatus.RUNNING))
    await store.finish_run("r1", terminal, result='"r"', error=None, completed_at=1_500.0)
    before = await stored(store, "r1")

    await store.set_run_status("r1", RunStatus.RUNNING, owner="worker-2")

    assert await stored(store, "r1") == before


# -- park_run ----------------------------------------------------------------------


async def test_park_run_marks_run_waiting_until_wake_at(store: Store) -> None:
    await store.create_run(make_run(status=RunStatus.RUNNING))

    await store.park_run("r1", 2_000.0, [])

    run = await stored(store, "r1")
    assert (run.status, run.wake_at) == (RunStatus.WAITING, 2_000.0)


async def test_park_run_wakes_at_once_when_an_awaited_event_is_already_queued(
    store: Store,
) -> None:
    await store.create_run(make_run(status=RunStatus.RUNNING))
    await store.send_event("r1", "approved", '"yes"', sent_at=1_100.0)

    await store.park_run("r1", FAR_FUTURE, ["shipped", "approved"])

    run = await stored(store, "r1")
    assert run.status is RunStatus.WAITING
    assert run.wake_at is not None and run.wake_at <= time.time()
    assert [r.run_id for r in await store.due_runs(time.time())] == ["r1"]


async def test_park_run_wakes_at_the_callers_clock_not_the_wall_clock(store: Store) -> None:
    await store.create_run(make_run(status=RunStatus.RUNNING))
    await store.send_event("r1", "approved", '"yes"', sent_at=1_100.0)

    await store.park_run("r1", FAR_FUTURE, ["approved"], now=1_200.0)

    assert (await stored(store, "r1")).wake_at == 1_200.0
    assert [r.run_id for r in await store.due_runs(1_200.0)] == ["r1"]


async def test_request_cancel_wakes_at_the_callers_clock(store: Store) -> None:
    await store.create_run(make_run(status=RunStatus.WAITING, wake_at=FAR_FUTURE))

    await store.request_cancel("r1", now=1_300.0)

    assert [r.run_id for r in await store.due_runs(1_300.0)] == ["r1"]


async def test_park_run_keeps_wake_at_when_only_other_events_are_queued(store: Store) -> None:
    await store.create_run(make_run(status=RunStatus.RUNNING))
    await store.send_event("r1", "cancelled_by_user", '"no"', sent_at=1_100.0)

    await store.park_run("r1", FAR_FUTURE, ["approved"])

    assert (await stored(store, "r1")).wake_at == FAR_FUTURE


async def test_park_run_ignores_an_already_consumed_event(store: Store) -> None:
    await store.create_run(make_run(status=RunStatus.RUNNING))
    await store.send_event("r1", "approved", '"yes"', sent_at=1_100.0)
    await store.consume_event("r1", "approved", make_step(kind=StepKind.WAIT, name="approved"))

    await store.park_run("r1", FAR_FUTURE, ["approved"])

    assert (await stored(store, "r1")).wake_at == FAR_FUTURE


# -- finish_run --------------------------------------------------------------------


async def test_finish_run_ends_run_once_and_a_second_finish_changes_nothing(
    store: Store,
) -> None:
    await store.create_run(make_run(status=RunStatus.WAITING, wake_at=2_000.0))

    first = await store.finish_run(
        "r1", RunStatus.COMPLETED, result='"paid"', error=None, completed_at=1_500.0
    )
    ended = await stored(store, "r1")
    second = await store.finish_run(
        "r1", RunStatus.FAILED, result=None, error='{"type":"x"}', completed_at=1_600.0
    )

    assert (first, second) == (True, False)
    assert (ended.status, ended.result, ended.completed_at, ended.wake_at) == (
        RunStatus.COMPLETED, '"paid"', 1_500.0, None,
    )
    assert await stored(store, "r1") == ended


async def test_finish_run_notify_lands_in_parent_mailbox_and_wakes_waiting_parent(
    store: Store,
) -> None:
    await store.create_run(make_run("parent", status=RunStatus.WAITING))
    await store.create_run(make_run("child", status=RunStatus.RUNNING, parent_run_id="parent"))
    notify = EventRecord(
        run_id="parent", seq=0, name="child:1", payload='"shipped"', sent_at=1_500.0
    )

    await store.finish_run(
        "child", RunStatus.COMPLETED, result='"shipped"', error=None, completed_at=1_500.0,
        notify=notify,
    )

    events = await store.list_events("parent")
    assert [(e.name, e.payload, e.consumed_position) for e in events] == [
        ("child:1", '"shipped"', None)
    ]
    assert [r.run_id for r in await store.due_runs(1_000.0)] == ["parent"]  # due at once


async def test_second_finish_run_does_not_notify_the_parent_again(store: Store) -> None:
    await store.create_run(make_run("parent", status=RunStatus.WAITING))
    await store.create_run(make_run("child", status=RunStatus.RUNNING, parent_run_id="parent"))
    notify = EventRecord(run_id="parent", seq=0, name="child:1", payload='"x"', sent_at=1.0)
    for _ in range(2):
        await store.finish_run(
            "child", RunStatus.COMPLETED, result='"x"', error=None, completed_at=1.0,
            notify=notify,
        )

    assert len(await store.list_events("parent")) == 1


# -- send_event / consume_event / list_events --------------------------------------


async def test_send_event_to_unknown_run_raises_run_not_found(store: Store) -> None:
    with pytest.raises(RunNotFoundError, match="'ghost'") as caught:
        await store.send_event("ghost", "approved", '"yes"', sent_at=1.0)

    assert caught.value.run_id == "ghost"  # type: ignore[attr-defined]


@pytest.mark.parametrize("terminal", TERMINAL)
async def test_send_event_to_finished_run_raises_workflow_error(
    store: Store, terminal: RunStatus,
) -> None:
    await store.create_run(make_run(status=RunStatus.RUNNING))
    await store.finish_run("r1", terminal, result=None, error=None, completed_at=1.0)

    with pytest.raises(WorkflowError, match=f"already ended {terminal.value}"):
        await store.send_event("r1", "approved", '"yes"', sent_at=2.0)

    assert await store.list_events("r1") == []


async def test_send_event_returns_increasing_seq_and_list_events_keeps_send_order(
    store: Store,
) -> None:
    await store.create_run(make_run(status=RunStatus.RUNNING))

    seqs = [
        await store.send_event("r1", name, payload, sent_at=at)
        for name, payload, at in [("a", '"1"', 1.0), ("b", '"2"', 2.0), ("a", '"3"', 3.0)]
    ]

    assert seqs == sorted(seqs) and len(set(seqs)) == 3
    events = await store.list_events("r1")
    assert [(e.seq, e.name, e.payload, e.sent_at) for e in events] == [
        (seqs[0], "a", '"1"', 1.0), (seqs[1], "b", '"2"', 2.0), (seqs[2], "a", '"3"', 3.0),
    ]


async def test_send_event_makes_a_parked_run_due_whatever_the_senders_clock(
    store: Store,
) -> None:
    await store.create_run(make_run(status=RunStatus.RUNNING))
    await store.park_run("r1", 5_000.0, ["approved"])

    await store.send_event("r1", "approved", '"yes"', sent_at=9_999_999.0)  # a clock ahead

    assert [r.run_id for r in await store.due_runs(1_000.0)] == ["r1"]


async def test_send_event_to_running_run_sets_no_wake_up(store: Store) -> None:
    await store.create_run(make_run(status=RunStatus.RUNNING))

    await store.send_event("r1", "approved", '"yes"', sent_at=1_200.0)

    run = await stored(store, "r1")
    assert (run.status, run.wake_at) == (RunStatus.RUNNING, None)


async def test_consume_event_returns_none_and_writes_nothing_when_mailbox_is_empty(
    store: Store,
) -> None:
    await store.create_run(make_run(status=RunStatus.RUNNING))
    await store.send_event("r1", "other", '"x"', sent_at=1.0)

    taken = await store.consume_event(
        "r1", "approved", make_step(kind=StepKind.WAIT, name="approved")
    )

    assert taken is None
    assert await store.load_journal("r1") == []


async def test_consume_event_takes_events_of_a_name_in_send_order(store: Store) -> None:
    await store.create_run(make_run(status=RunStatus.RUNNING))
    for name, payload in [("a", '"a1"'), ("b", '"b1"'), ("a", '"a2"')]:
        await store.send_event("r1", name, payload, sent_at=1.0)

    taken = []
    for position, name in [("1", "a"), ("2", "a"), ("3", "a"), ("4", "b")]:
        step = make_step(position=position, kind=StepKind.WAIT, name=name, output=None)
        entry = await store.consume_event("r1", name, step)
        taken.append(entry.output if entry else None)

    assert taken == ['"a1"', '"a2"', None, '"b1"']


async def test_consume_event_journals_payload_as_output_and_marks_event_consumed(
    store: Store,
) -> None:
    await store.create_run(make_run(status=RunStatus.RUNNING))
    await store.send_event("r1", "approved", '{"by":"ana"}', sent_at=1.0)
    wait = make_step(position="3", kind=StepKind.WAIT, name="approved", output=None)

    entry = await store.consume_event("r1", "approved", wait)

    assert entry is not None
    assert (entry.position, entry.status, entry.output) == (
        "3", StepStatus.COMPLETED, '{"by":"ana"}'
    )
    assert await journal(store, "r1") == [entry]
    assert [e.consumed_position for e in await store.list_events("r1")] == ["3"]


# -- request_cancel ----------------------------------------------------------------


async def test_request_cancel_flags_and_wakes_a_waiting_run(store: Store) -> None:
    await store.create_run(make_run(status=RunStatus.WAITING, wake_at=FAR_FUTURE))

    returned = await store.request_cancel("r1")

    run = await stored(store, "r1")
    assert returned == run
    assert run.cancel_requested and run.status is RunStatus.WAITING
    assert run.wake_at is not None and run.wake_at <= time.time()
    assert [r.run_id for r in await store.due_runs(time.time())] == ["r1"]


async def test_request_cancel_flags_a_running_run_without_a_wake_up(store: Store) -> None:
    await store.create_run(make_run(status=RunStatus.RUNNING))

    await store.request_cancel("r1")

    run = await stored(store, "r1")
    assert (run.cancel_requested, run.status, run.wake_at) == (True, RunStatus.RUNNING, None)


async def test_request_cancel_of_unknown_run_raises_run_not_found(store: Store) -> None:
    with pytest.raises(RunNotFoundError, match="'ghost'"):
        await store.request_cancel("ghost")


# -- due_runs / recoverable_runs ---------------------------------------------------


async def test_due_runs_returns_only_waiting_runs_whose_wake_at_has_come(store: Store) -> None:
    for run in [
        make_run("past", status=RunStatus.WAITING, wake_at=900.0),
        make_run("now", status=RunStatus.WAITING, wake_at=1_000.0),
        make_run("later", status=RunStatus.WAITING, wake_at=1_000.5),
        make_run("no-timer", status=RunStatus.WAITING),
        make_run("pending", status=RunStatus.PENDING, wake_at=900.0),
        make_run("running", status=RunStatus.RUNNING, wake_at=900.0),
        make_run("done", status=RunStatus.COMPLETED, wake_at=900.0),
    ]:
        await store.create_run(run)

    due = await store.due_runs(1_000.0)

    assert sorted(r.run_id for r in due) == ["now", "past"]


async def test_due_runs_limit_bounds_the_answer(store: Store) -> None:
    for i in range(3):
        await store.create_run(make_run(f"r{i}", status=RunStatus.WAITING, wake_at=float(i)))

    assert len(await store.due_runs(10.0, limit=2)) == 2


async def test_recoverable_runs_are_the_pending_and_running_runs(store: Store) -> None:
    for status in RunStatus:
        await store.create_run(make_run(status.value, status=status))

    runs = await store.recoverable_runs()

    assert sorted(r.run_id for r in runs) == ["PENDING", "RUNNING"]


# -- changes -----------------------------------------------------------------------


async def test_changes_reports_a_write_made_through_another_connection(
    store: Store, other_store: Store,
) -> None:
    await store.changes()  # the first call only takes the baseline
    await other_store.create_run(make_run("theirs"))

    # PostgreSQL delivers the news asynchronously (LISTEN/NOTIFY): allow it a moment.
    async with asyncio.timeout(5):
        while not (changes := await store.changes()):  # noqa: ASYNC110  # the API under test
            await asyncio.sleep(0.01)
    # PostgreSQL says which queue got a run; SQLite only that something changed.
    assert changes.everything or changes.queues == {"default"}
    assert await store.get_run("theirs") == make_run("theirs")


async def test_changes_is_quiet_when_nothing_happened(store: Store) -> None:
    await store.create_run(make_run("mine"))
    await asyncio.sleep(0.05)  # let any notification of our own write arrive
    await store.changes()
    assert not await store.changes()


# -- group commit ------------------------------------------------------------------


async def test_concurrent_append_steps_share_transactions(store: Store) -> None:
    stats = getattr(store, "stats", None)
    assert stats is not None, "every backend exposes its group-commit counters as .stats"
    await store.create_run(make_run())
    before = dict(getattr(store, "stats"))  # noqa: B009  # not on the Store protocol
    calls = 50

    await asyncio.gather(*(store.append_steps([make_step(position=str(i))]) for i in range(calls)))

    after = getattr(store, "stats")  # noqa: B009
    assert after["writes"] - before["writes"] == calls
    assert after["batches"] - before["batches"] < calls
    assert len(await store.load_journal("r1")) == calls


async def test_due_runs_can_be_limited_to_registered_workflow_versions(store: Store) -> None:
    await store.create_run(make_run(run_id="old", status=RunStatus.WAITING, wake_at=1_000.0,
                                    workflow_version="1"))
    await store.create_run(make_run(run_id="new", status=RunStatus.WAITING, wake_at=1_001.0,
                                    workflow_version="2"))
    only_v2 = await store.due_runs(2_000.0, limit=1, workflows=[("checkout", "2")])
    assert [r.run_id for r in only_v2] == ["new"]
    assert await store.due_runs(2_000.0, workflows=[]) == []
    assert [r.run_id for r in await store.due_runs(2_000.0)] == ["old", "new"]
