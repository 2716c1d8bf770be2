"""The embedded SQLite store's failures: each one a Garrison error with a message that helps.

Behaviour shared by every backend lives in `tests/integration/store/`; this file holds
what only SQLite has: its URL, its file, its worker lock and its disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import sqlite3
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from garrison.errors import (
    ConfigurationError,
    SchemaVersionError,
    StoreError,
    StoreLockedError,
)
from garrison.store import (
    RunRecord,
    RunStatus,
    SQLiteStore,
    StepKind,
    StepRecord,
    StepStatus,
    parse_sqlite_url,
)
from garrison.store._schema import SCHEMA_VERSION


def make_run(run_id: str = "r1") -> RunRecord:
    return RunRecord(
        run_id=run_id, workflow_name="checkout", workflow_version="v1",
        status=RunStatus.RUNNING, inputs="[]", created_at=1_000.0, updated_at=1_000.0,
    )


def make_step(position: str, output: str = '"ok"') -> StepRecord:
    return StepRecord(
        run_id="r1", position=position, kind=StepKind.STEP, name="charge_card",
        status=StepStatus.COMPLETED, started_at=1_000.0, output=output, completed_at=1_001.0,
    )


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "g.db"


@pytest.fixture
def url(db_path: Path) -> str:
    return f"sqlite:///{db_path}"


@pytest.fixture
async def store(url: str) -> AsyncIterator[SQLiteStore]:
    store = SQLiteStore(url)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def _create_database(url: str) -> None:
    """A Garrison database holding run r1 and its first journal entry, then closed."""
    store = SQLiteStore(url)
    await store.open()
    await store.create_run(make_run())
    await store.append_steps([make_step("1")])
    await store.close()


def names_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _execute(path: Path, *statements: str) -> None:
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        for statement in statements:
            conn.execute(statement)


# -- URL -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///rel.db", "rel.db"),
        ("sqlite:///data/rel.db", "data/rel.db"),
        ("sqlite:////abs/g.db", "/abs/g.db"),
        ("sqlite:///:memory:", ":memory:"),
    ],
    ids=["relative", "relative-folder", "absolute", "memory"],
)
def test_url_path_is_relative_after_three_slashes_and_absolute_after_four(
    url: str, path: str,
) -> None:
    assert parse_sqlite_url(url) == (path, {"synchronous": "FULL"})


def test_url_options_are_parsed_and_synchronous_is_case_insensitive() -> None:
    path, options = parse_sqlite_url("sqlite:///g.db?synchronous=normal&busy_timeout_ms=250")

    assert path == "g.db"
    assert options == {"synchronous": "NORMAL", "busy_timeout_ms": "250"}


def test_url_with_unknown_option_names_it_and_the_known_ones() -> None:
    url = "sqlite:///g.db?synchronous=FULL&cache_size=9"

    with pytest.raises(ConfigurationError, match=r"unknown option\(s\) \['cache_size'\]") as e:
        parse_sqlite_url(url)

    assert "known: synchronous=FULL|NORMAL, busy_timeout_ms=N" in str(e.value)
    assert e.value.url == url  # type: ignore[attr-defined]


def test_url_with_a_host_says_to_write_three_slashes() -> None:
    with pytest.raises(ConfigurationError, match="has no host") as e:
        parse_sqlite_url("sqlite://data/g.db")

    assert "'sqlite:///data/g.db'" in str(e.value)


def test_url_with_bad_synchronous_value_names_value_and_choices() -> None:
    with pytest.raises(ConfigurationError, match=r"synchronous='SOMETIMES' is not one of") as e:
        parse_sqlite_url("sqlite:///g.db?synchronous=sometimes")

    assert "'FULL', 'NORMAL'" in str(e.value)


def test_url_without_a_path_gives_an_example() -> None:
    with pytest.raises(ConfigurationError, match=re.escape("no file path; write e.g. 'sqlite:///")):
        parse_sqlite_url("sqlite:///")


def test_url_with_another_scheme_is_refused() -> None:
    with pytest.raises(ConfigurationError, match=re.escape("expected 'sqlite:///path/to/file.db'")):
        parse_sqlite_url("mysql:///g.db")


def test_url_with_non_integer_busy_timeout_names_the_value() -> None:
    with pytest.raises(ConfigurationError, match=r"busy_timeout_ms='soon' must be a whole"):
        SQLiteStore("sqlite:///g.db?busy_timeout_ms=soon")


# -- opening the file ---------------------------------------------------------------


async def test_open_in_missing_folder_names_the_folder_and_creates_nothing(
    tmp_path: Path,
) -> None:
    missing = tmp_path / "no" / "such"
    store = SQLiteStore(f"sqlite:///{missing}/g.db")

    with pytest.raises(ConfigurationError, match=re.escape(f"folder '{missing}' does not exist")):
        await store.open()

    assert names_in(tmp_path) == []


async def test_open_with_create_false_refuses_a_missing_file(db_path: Path, url: str) -> None:
    store = SQLiteStore(url, create=False)

    with pytest.raises(ConfigurationError, match="no such database; check the URL"):
        await store.open()

    assert names_in(db_path.parent) == []


async def test_open_with_create_false_opens_an_existing_database(url: str) -> None:
    await _create_database(url)
    store = SQLiteStore(url, create=False)
    await store.open()
    try:
        assert await store.get_run("r1") == make_run()
    finally:
        await store.close()


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[None]:
    """Make `path` unwritable for this process, or skip saying why it cannot be done here.

    As root, permission bits do not stop writes, so root uses the immutable attribute.
    """
    if os.geteuid() == 0:
        made = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
        if made.returncode != 0:
            pytest.skip(
                "running as root, where chmod does not stop writes, and `chattr +i` failed "
                f"on {path} ({made.stderr.strip()}): needs CAP_LINUX_IMMUTABLE and a "
                "filesystem with the immutable attribute (ext4, xfs, btrfs)"
            )
        undo = ["chattr", "-i", str(path)]
    else:
        path.chmod(0o444)
        undo = ["chmod", "0644", str(path)]
    try:
        with pytest.raises(PermissionError):  # the probe: writes really are refused
            path.open("r+b").close()
        yield
    finally:
        subprocess.run(undo, check=True)


async def test_write_to_read_only_database_is_a_store_error_that_says_so(
    db_path: Path, url: str,
) -> None:
    await _create_database(url)
    with read_only(db_path):
        store = SQLiteStore(url)
        try:
            await store.open()
            with pytest.raises(StoreError, match=r"readonly database \(the database file or its "
                               r"folder is read-only: check permissions"):
                await store.create_run(make_run("r2"))
            assert await store.get_run("r1") == make_run()
            assert await store.get_run("r2") is None
        finally:
            await store.close()


@pytest.fixture
def not_a_database(db_path: Path) -> Path:
    db_path.write_bytes(b"%PDF-1.7 this is a report, not a database\n" * 200)
    return db_path


async def test_open_of_a_file_that_is_not_a_database_is_a_store_error(
    not_a_database: Path, url: str,
) -> None:
    store = SQLiteStore(url)

    with pytest.raises(StoreError, match="is not a Garrison SQLite database"):
        await store.open()


def open_handles(path: Path) -> int:
    """How many of this process's file descriptors point at `path`."""
    fds = Path("/proc/self/fd")
    if not fds.is_dir():
        pytest.skip("needs /proc/self/fd (Linux) to see which files the process holds")
    count = 0
    for fd in fds.iterdir():
        with contextlib.suppress(OSError):  # the fd of the listing itself is gone by now
            count += os.readlink(fd) == str(path)
    return count


async def test_failed_open_closes_the_file_at_once(not_a_database: Path, url: str) -> None:
    store = SQLiteStore(url)
    with pytest.raises(StoreError):
        await store.open()

    assert open_handles(not_a_database) == 0


async def test_open_of_database_from_newer_garrison_is_a_schema_version_error(
    db_path: Path, url: str,
) -> None:
    await _create_database(url)
    newer = SCHEMA_VERSION + 1
    _execute(db_path, f"UPDATE garrison_meta SET value = '{newer}' WHERE key = 'schema_version'")
    store = SQLiteStore(url)

    with pytest.raises(SchemaVersionError, match="written by a newer Garrison") as e:
        await store.open()

    assert (e.value.found, e.value.supported) == (newer, SCHEMA_VERSION)  # type: ignore[attr-defined]
    assert f"schema version {newer}" in str(e.value) and "upgrade Garrison" in str(e.value)


async def test_open_of_a_database_with_foreign_tables_is_refused_untouched(
    db_path: Path, url: str,
) -> None:
    _execute(db_path, "CREATE TABLE invoices (id INTEGER PRIMARY KEY)")
    store = SQLiteStore(url)

    with pytest.raises(StoreError, match="holds other tables and no Garrison schema"):
        await store.open()

    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        tables = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    assert tables == [("invoices",)]


async def test_use_before_open_is_a_store_error_that_says_to_open(url: str) -> None:
    store = SQLiteStore(url)

    with pytest.raises(StoreError, match="not open"):
        await store.create_run(make_run())


# -- the one-worker lock ------------------------------------------------------------


async def test_second_worker_on_the_same_file_is_refused_naming_the_holder_pid(
    url: str,
) -> None:
    first, second = SQLiteStore(url), SQLiteStore(url)
    await first.open()
    await second.open()
    try:
        await first.register_worker("w1")

        with pytest.raises(StoreLockedError, match=f"pid {os.getpid()}") as e:
            await second.register_worker("w2")

        assert e.value.pid == str(os.getpid())  # type: ignore[attr-defined]
        assert "takes one worker process" in str(e.value)
    finally:
        await second.close()
        await first.close()


async def test_worker_lock_is_released_when_the_store_closes(url: str) -> None:
    first, second = SQLiteStore(url), SQLiteStore(url)
    await first.open()
    await first.register_worker("w1")
    await first.close()
    await second.open()
    try:
        await second.register_worker("w2")  # raises StoreLockedError if still held
    finally:
        await second.close()


# -- group commit -------------------------------------------------------------------

_NULL_NAME = dataclasses.replace(make_step("2"), name=None)  # type: ignore[arg-type]
_LONE_SURROGATE = make_step("2", output='"report-\udcff.pdf"')


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(_NULL_NAME, id="constraint-violation"),
        pytest.param(_LONE_SURROGATE, id="unencodable-text"),
    ],
)
async def test_failing_write_fails_only_its_caller_in_a_batch(
    store: SQLiteStore, bad: StepRecord,
) -> None:
    await store.create_run(make_run())

    async with asyncio.timeout(2.0):  # a hung batch fails the test instead of blocking it
        good, failed = await asyncio.gather(
            store.append_steps([make_step("1")]),
            store.append_steps([bad]),
            return_exceptions=True,
        )

    assert good is None
    assert isinstance(failed, StoreError), failed
    assert await store.load_journal("r1") == [make_step("1")]


# -- disk full ----------------------------------------------------------------------


async def test_disk_full_fails_the_whole_batch_and_half_writes_nothing(
    store: SQLiteStore, url: str,
) -> None:
    await store.create_run(make_run())
    await store.append_steps([make_step("1")])
    # Test seam: `_conn` is the store's one connection. Capping the file at its current
    # size makes the next write that needs a new page fail with SQLITE_FULL, as a full
    # disk would, without mount rights for a tiny filesystem.
    conn = store._conn
    assert conn is not None
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")
    big = [make_step(str(i), output='"' + "x" * 20_000 + '"') for i in range(2, 6)]

    # One event-loop pass: a small write that fits, then two that need new pages.
    outcomes = await asyncio.gather(
        store.create_run(make_run("r2")),
        store.append_steps(big[:2]),
        store.append_steps(big[2:]),
        return_exceptions=True,
    )

    assert all(isinstance(o, StoreError) for o in outcomes), outcomes
    assert "database or disk is full" in str(outcomes[0])
    assert "this batch was rolled back whole" in str(outcomes[0])
    reader = SQLiteStore(url)
    await reader.open()
    try:
        assert await reader.get_run("r1") == make_run()
        assert await reader.get_run("r2") is None
        assert await reader.load_journal("r1") == [make_step("1")]
    finally:
        await reader.close()


async def test_store_writes_again_once_space_is_back(store: SQLiteStore) -> None:
    await store.create_run(make_run())
    conn = store._conn  # test seam, as above
    assert conn is not None
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")
    big = make_step("2", output='"' + "x" * 20_000 + '"')
    with pytest.raises(StoreError, match="disk is full"):
        await store.append_steps([big])

    conn.execute(f"PRAGMA max_page_count = {pages * 100}")
    await store.append_steps([big])

    assert await store.load_journal("r1") == [big]
