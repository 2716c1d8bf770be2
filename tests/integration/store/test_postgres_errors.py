"""PostgreSQL-only failures: each is a clear error before any run is touched."""

from __future__ import annotations

import asyncio
import socket

import psycopg
import pytest

from garrison.errors import ConfigurationError, SchemaVersionError, StoreError
from garrison.store import open_store
from garrison.store._postgres import PostgresStore
from garrison.store._schema import SCHEMA_VERSION
from tests.pg import PG_URL, fresh_postgres_url


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_postgres_missing_database_names_the_fix() -> None:
    fresh_postgres_url()  # skips (a failure under CI) when no server is reachable
    store = open_store("postgresql://postgres@127.0.0.1:5432/no_such_db_garrison")
    with pytest.raises(ConfigurationError, match=r"does not exist.*createdb"):
        await store.open()


async def test_postgres_unreachable_server_is_a_store_error() -> None:
    store = open_store(f"postgresql://postgres@127.0.0.1:{free_port()}/test")
    with pytest.raises(StoreError, match=r"cannot connect.*is PostgreSQL running"):
        await store.open()


async def test_postgres_password_never_appears_in_errors() -> None:
    store = open_store(f"postgresql://postgres:s3cret@127.0.0.1:{free_port()}/test")
    with pytest.raises(StoreError) as info:
        await store.open()
    assert "s3cret" not in str(info.value)


def test_postgres_bad_options_are_configuration_errors() -> None:
    with pytest.raises(ConfigurationError, match="schema='Bad-Name'"):
        PostgresStore("postgresql://postgres@127.0.0.1/test?schema=Bad-Name")
    with pytest.raises(ConfigurationError, match="pool_size='1'"):
        PostgresStore("postgresql://postgres@127.0.0.1/test?pool_size=1")
    with pytest.raises(ConfigurationError, match="no database name"):
        PostgresStore("postgresql://postgres@127.0.0.1")


async def test_postgres_schema_from_a_newer_garrison_is_refused() -> None:
    url = fresh_postgres_url()
    store = open_store(url)
    await store.open()
    await store.close()
    schema = url.rsplit("schema=", 1)[1]
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f"UPDATE {schema}.garrison_meta SET value = %s "
                     "WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    with pytest.raises(SchemaVersionError, match="newer Garrison"):
        await open_store(url).open()


async def test_postgres_cancelled_close_strands_no_queued_write() -> None:
    store = PostgresStore(fresh_postgres_url())
    await store.open()

    async def slow(conn: object) -> None:
        await conn.execute("SELECT pg_sleep(0.5)")  # type: ignore[attr-defined]

    async def quick(conn: object) -> None:
        await conn.execute("SELECT 1")  # type: ignore[attr-defined]

    in_flight = asyncio.ensure_future(store._write(slow))
    await asyncio.sleep(0.05)
    queued = asyncio.ensure_future(store._write(quick))
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(store.close(), 0.05)  # the closer gives up, the writer not
    async with asyncio.timeout(5):  # every caller is answered: none hangs
        await asyncio.gather(in_flight, queued, return_exceptions=True)
    await store.close()
