"""The store side of `app.fork`: a run created with its journal in place, in one
transaction, and the fork's origin kept with the run (schema 5)."""

from __future__ import annotations

import dataclasses
import sqlite3

import pytest

from garrison.store import RunStatus, StepKind, StepStatus, Store, open_store, position_key
from garrison.store._postgres import parse_postgres_url
from garrison.store._schema import SCHEMA_VERSION, migrations
from garrison.store._sqlite import parse_sqlite_url
from tests.integration.store.test_store_contract import make_run, make_step


async def test_create_run_with_journal_writes_the_run_and_every_entry(store: Store) -> None:
    run = dataclasses.replace(make_run("fork"), forked_from="origin", forked_at=2)
    steps = [make_step("fork", "1"), make_step("fork", "2.1", name="reserve"),
             make_step("fork", "2.2", status=StepStatus.FAILED, output=None,
                       error='{"type":"builtins.ValueError","message":"no"}')]

    stored, created = await store.create_run_with_journal(run, steps)

    assert created and stored == run
    assert await store.get_run("fork") == run
    journal = sorted(await store.load_journal("fork"), key=lambda s: position_key(s.position))
    assert journal == steps


async def test_create_run_with_journal_of_an_existing_id_writes_no_entry(store: Store) -> None:
    await store.create_run(make_run("fork"))
    other = dataclasses.replace(make_run("fork", workflow_name="refund"), forked_from="x",
                                forked_at=1)

    stored, created = await store.create_run_with_journal(other, [make_step("fork", "1")])

    assert not created and stored.workflow_name == "checkout" and stored.forked_from is None
    assert await store.load_journal("fork") == []


async def test_create_run_with_journal_whose_entry_fails_writes_no_run(store: Store) -> None:
    broken = make_step("fork", "1", kind=StepKind.STEP, name=None)  # type: ignore[arg-type]

    with pytest.raises(Exception):  # noqa: B017  # NOT NULL: each backend's own error type
        await store.create_run_with_journal(make_run("fork"), [broken])

    assert await store.get_run("fork") is None
    assert await store.load_journal("fork") == []


async def test_create_run_with_no_entries_is_a_plain_create(store: Store) -> None:
    stored, created = await store.create_run_with_journal(make_run("fork"), [])

    assert created and stored.status is RunStatus.PENDING
    assert await store.load_journal("fork") == []


async def create_old_database(url: str, version: int) -> None:
    """A database at schema `version`, holding one COMPLETED run "old"."""
    insert_run = ("INSERT INTO runs (run_id, workflow_name, workflow_version, status, inputs, "
                  "created_at, updated_at) VALUES ('old', 'checkout', 'v1', 'COMPLETED', '[]', "
                  "1.0, 1.0)")
    if url.startswith("sqlite"):
        path, _ = parse_sqlite_url(url)
        ddl = migrations("sqlite")
        conn = sqlite3.connect(path)
        try:
            for each in range(1, version + 1):
                conn.executescript(ddl[each])
            conn.execute("INSERT INTO garrison_meta (key, value) VALUES ('schema_version', ?)",
                         (str(version),))
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
        for each in range(1, version + 1):
            await conn.execute(ddl[each])
        await conn.execute("INSERT INTO garrison_meta (key, value) VALUES ('schema_version', %s)",
                           (str(version),))
        await conn.execute(insert_run)
        await conn.commit()


async def test_a_schema_4_database_migrates_to_forks_on_open(store_url: str) -> None:
    assert SCHEMA_VERSION >= 5
    await create_old_database(store_url, 4)

    store = open_store(store_url)
    await store.open()
    try:
        old = await store.get_run("old")
        assert old is not None and old.forked_from is None and old.forked_at is None
        fork = dataclasses.replace(make_run("fork"), forked_from="old", forked_at=3)
        await store.create_run_with_journal(fork, [make_step("fork", "1")])
    finally:
        await store.close()
    reopened = open_store(store_url)  # migrated once: opening again changes nothing
    await reopened.open()
    try:
        again = await reopened.get_run("fork")
        assert again is not None and (again.forked_from, again.forked_at) == ("old", 3)
    finally:
        await reopened.close()
