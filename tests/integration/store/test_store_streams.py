"""Run streams in the store: append-only per run, idempotent per key, read by offset.

Every test runs on each backend (the `store` fixture); the takeover test needs two
workers on one database, which only PostgreSQL admits.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator

import pytest

from garrison.errors import ConfigurationError, LeaseLostError
from garrison.store import QueueLimits, RunStatus, Store, StreamRecord, open_store
from garrison.store._postgres import parse_postgres_url
from garrison.store._schema import SCHEMA_VERSION, migrations
from garrison.store._sqlite import parse_sqlite_url
from tests.integration.store.test_store_contract import make_run
from tests.pg import fresh_postgres_url

ALL = QueueLimits("default")


def events(*keys: str, kind: str = "token") -> list[tuple[str, str, str]]:
    return [(key, kind, f'"{key}"') for key in keys]


def offsets_of(records: list[StreamRecord]) -> list[int]:
    return [r.offset for r in records]


async def test_appended_events_are_read_back_in_order(store: Store) -> None:
    await store.create_run(make_run("r1"))

    offsets = await store.append_stream(
        "r1", [("1/0", "token", '"Hel"'), ("1/1", "token", '"lo"'), ("1/2", "done", "null")],
        at=1_000.5)

    assert all(o is not None for o in offsets) and offsets == sorted(offsets)
    records = await store.read_stream("r1")
    assert records == [
        StreamRecord(offsets[0] or 0, "r1", "1/0", "token", '"Hel"', 1_000.5),
        StreamRecord(offsets[1] or 0, "r1", "1/1", "token", '"lo"', 1_000.5),
        StreamRecord(offsets[2] or 0, "r1", "1/2", "done", "null", 1_000.5),
    ]


async def test_an_existing_key_is_left_as_it_is_and_its_slot_is_none(store: Store) -> None:
    await store.create_run(make_run("r1"))
    [first] = await store.append_stream("r1", [("1/0", "token", '"kept"')], at=1.0)

    again = await store.append_stream(
        "r1", [("1/0", "token", '"replaced?"'), ("1/1", "token", '"new"'),
               ("1/1", "token", '"twice in one call"')], at=2.0)

    assert again[0] is None and again[2] is None
    assert again[1] is not None and first is not None and again[1] > first
    records = await store.read_stream("r1")
    assert [(r.key, r.data, r.at) for r in records] == [("1/0", '"kept"', 1.0),
                                                         ("1/1", '"new"', 2.0)]


async def test_the_same_key_in_two_runs_is_two_events(store: Store) -> None:
    for run_id in ("a", "b"):
        await store.create_run(make_run(run_id))
        assert (await store.append_stream(run_id, events("1/0"), at=1.0))[0] is not None

    assert [r.key for r in await store.read_stream("a")] == ["1/0"]
    assert [r.key for r in await store.read_stream("b")] == ["1/0"]


async def test_after_and_limit_page_through_a_stream(store: Store) -> None:
    await store.create_run(make_run("r1"))
    keys = [f"1/{i}" for i in range(10)]
    written = await store.append_stream("r1", events(*keys), at=1.0)

    pages: list[StreamRecord] = []
    after = 0
    while page := await store.read_stream("r1", after=after, limit=3):
        assert len(page) <= 3
        pages += page
        after = page[-1].offset

    assert [r.key for r in pages] == keys
    assert offsets_of(pages) == written
    middle = written[4]
    assert middle is not None
    assert [r.key for r in await store.read_stream("r1", after=middle)] == keys[5:]
    assert await store.read_stream("r1", after=pages[-1].offset) == []


async def test_key_prefix_filters_and_its_wildcards_are_plain_characters(store: Store) -> None:
    await store.create_run(make_run("r1"))
    await store.append_stream("r1", events("3/0", "3/1", "30/0", "a%/0", "ab/0", "a_/0",
                                           "A%/0", "é/0"), at=1.0)

    assert [r.key for r in await store.read_stream("r1", key_prefix="3/")] == ["3/0", "3/1"]
    assert [r.key for r in await store.read_stream("r1", key_prefix="a%")] == ["a%/0"]
    assert [r.key for r in await store.read_stream("r1", key_prefix="a_")] == ["a_/0"]
    assert [r.key for r in await store.read_stream("r1", key_prefix="é")] == ["é/0"]
    assert len(await store.read_stream("r1", key_prefix="")) == 8
    first = (await store.read_stream("r1", key_prefix="3/", limit=1))[0]
    assert [r.key for r in await store.read_stream("r1", key_prefix="3/",
                                                   after=first.offset)] == ["3/1"]


async def test_interleaved_runs_keep_their_own_ordered_streams(store: Store) -> None:
    runs = [f"r{i}" for i in range(6)]
    for run_id in runs:
        await store.create_run(make_run(run_id))

    async def publish(run_id: str) -> list[int | None]:
        written: list[int | None] = []
        for i in range(15):  # one run's appends are sequential, as the engine's are
            written += await store.append_stream(run_id, events(f"1/{i}"), at=float(i))
        return written

    results = await asyncio.gather(*(publish(r) for r in runs))

    everything: set[int] = set()
    for run_id, written in zip(runs, results, strict=True):
        records = await store.read_stream(run_id)
        assert [r.key for r in records] == [f"1/{i}" for i in range(15)]
        assert offsets_of(records) == written
        assert offsets_of(records) == sorted(offsets_of(records))
        everything |= set(offsets_of(records))
    assert len(everything) == 6 * 15  # offsets are global: never shared between runs


async def test_an_unknown_run_has_an_empty_stream(store: Store) -> None:
    assert await store.read_stream("nobody") == []


async def test_bad_read_arguments_are_refused_with_the_fix(store: Store) -> None:
    with pytest.raises(ConfigurationError, match="limit is a whole number >= 1"):
        await store.read_stream("r1", limit=0)
    with pytest.raises(ConfigurationError, match="after is an offset"):
        await store.read_stream("r1", after=-1)


async def test_an_append_is_announced_in_changes(store: Store) -> None:
    await store.create_run(make_run("r1"))
    await store.changes()

    await store.append_stream("r1", events("1/0"), at=1.0)

    # PostgreSQL delivers its notification asynchronously: allow it a moment.
    async with asyncio.timeout(5):
        while "r1" not in (changes := await store.changes()).streams:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    assert changes


# -- fencing -----------------------------------------------------------------------


async def test_a_worker_appends_only_to_runs_it_holds(store: Store) -> None:
    await store.register_worker("w1")
    await store.create_run(make_run("mine"))
    await store.claim_queued(ALL, 1, workflows=None)
    await store.create_run(make_run("theirs", created_at=2_000.0))  # nobody's

    outcomes = await asyncio.gather(
        store.append_stream("mine", events("1/0"), at=1.0),
        store.append_stream("theirs", events("1/0"), at=1.0),
        return_exceptions=True,
    )

    assert isinstance(outcomes[0], list) and outcomes[0][0] is not None
    assert isinstance(outcomes[1], LeaseLostError)
    assert "no longer holds run theirs" in str(outcomes[1])
    assert [r.key for r in await store.read_stream("mine")] == ["1/0"]
    assert await store.read_stream("theirs") == []


@pytest.fixture
async def two_workers() -> AsyncIterator[tuple[Store, Store]]:
    url = fresh_postgres_url()
    first, second = open_store(url), open_store(url)
    await first.open()
    await second.open()
    await first.register_worker("w1", lease_ttl_s=0.3)
    await second.register_worker("w2", lease_ttl_s=0.3)
    try:
        yield first, second
    finally:
        await first.close()
        await second.close()


async def test_postgres_a_worker_whose_run_was_taken_over_cannot_append(
    two_workers: tuple[Store, Store],
) -> None:
    first, second = two_workers
    await first.create_run(make_run("r1"))
    await first.claim_queued(ALL, 1, workflows=None)
    await first.append_stream("r1", events("1/0"), at=1.0)
    await asyncio.sleep(0.4)  # first's lease runs out (no heartbeat)
    [theirs] = await second.claim_due(now=0.0, queues=None, workflows=None, limit=10)
    assert theirs.owner == "w2"

    with pytest.raises(LeaseLostError, match="now w2's"):
        await first.append_stream("r1", events("1/1"), at=2.0)

    assert (await second.append_stream("r1", events("1/0", "1/1"), at=3.0))[0] is None
    assert [(r.key, r.at) for r in await second.read_stream("r1")] == [("1/0", 1.0),
                                                                       ("1/1", 3.0)]


# -- schema ----------------------------------------------------------------------------


async def _create_v3_database(url: str) -> None:
    """A database as Garrison 0.1 with schema 3 left it, holding one run."""
    insert_run = ("INSERT INTO runs (run_id, workflow_name, workflow_version, status, inputs, "
                  "created_at, updated_at) VALUES ('old', 'checkout', 'v1', 'COMPLETED', '[]', "
                  "1.0, 1.0)")
    if url.startswith("sqlite"):
        path, _ = parse_sqlite_url(url)
        ddl = migrations("sqlite")
        conn = sqlite3.connect(path)
        try:
            for version in (1, 2, 3):
                conn.executescript(ddl[version])
            conn.execute("INSERT INTO garrison_meta (key, value) VALUES ('schema_version', '3')")
            conn.execute(insert_run)
            conn.commit()
        finally:
            conn.close()
        return
    import psycopg

    libpq, schema, _ = parse_postgres_url(url)
    ddl = migrations("postgres")
    async with await psycopg.AsyncConnection.connect(libpq) as conn:
        await conn.execute(f"CREATE SCHEMA {schema}")
        await conn.execute(f"SET search_path = {schema}")
        for version in (1, 2, 3):
            await conn.execute(ddl[version])
        await conn.execute("INSERT INTO garrison_meta (key, value) VALUES ('schema_version', '3')")
        await conn.execute(insert_run)
        await conn.commit()


async def test_a_schema_3_database_migrates_to_streams_on_open(store_url: str) -> None:
    assert SCHEMA_VERSION >= 4
    await _create_v3_database(store_url)

    store = open_store(store_url)
    await store.open()
    try:
        old = await store.get_run("old")
        assert old is not None and old.status is RunStatus.COMPLETED
        assert await store.read_stream("old") == []
        [offset] = await store.append_stream("old", events("1/0"), at=1.0)
        assert offset is not None
        assert [r.key for r in await store.read_stream("old")] == ["1/0"]
    finally:
        await store.close()
    reopened = open_store(store_url)  # migrated once: opening again changes nothing
    await reopened.open()
    try:
        assert [r.key for r in await reopened.read_stream("old")] == ["1/0"]
    finally:
        await reopened.close()
