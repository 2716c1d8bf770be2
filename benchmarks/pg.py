"""PostgreSQL plumbing for the benchmarks: a fresh schema (or database) per measurement.

Every measurement on PostgreSQL gets its own schema, named `bench_<what>_<random>`, and
drops it afterwards (`DROP SCHEMA ... CASCADE`); DBOS, whose system database URL names a
database rather than a schema, gets a fresh database instead (dropped likewise). The
server is `GARRISON_BENCH_PG` or postgresql://postgres@127.0.0.1:5432/test.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import statistics
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

__all__ = ["DEFAULT_PG", "drop_schema", "fresh_database", "fresh_schema", "raw_commit",
           "schema_url", "search_path_url"]

DEFAULT_PG = os.environ.get("GARRISON_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")
_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def _psycopg() -> Any:
    import psycopg

    return psycopg


def _checked(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(f"{name!r} is not a plain lower-case SQL identifier")
    return name


def schema_url(base: str, schema: str) -> str:
    """Garrison's store URL for `schema` in the database of `base`."""
    sep = "&" if "?" in base else "?"
    return f"{base}{sep}schema={_checked(schema)}"


def search_path_url(base: str, schema: str) -> str:
    """A libpq URL whose connections use `schema` (for peers that take a plain URL)."""
    sep = "&" if "?" in base else "?"
    return f"{base}{sep}options={quote(f'-csearch_path={_checked(schema)}')}"


def _with_database(base: str, database: str) -> str:
    parts = urlsplit(base)
    return urlunsplit((parts.scheme, parts.netloc, f"/{database}", "", ""))


def _admin(base: str) -> Any:
    return _psycopg().connect(base, autocommit=True, connect_timeout=10)


def create_schema(base: str, schema: str) -> None:
    with _admin(base) as conn:
        conn.execute(f"CREATE SCHEMA {_checked(schema)}")


def drop_schema(base: str, schema: str) -> None:
    with _admin(base) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {_checked(schema)} CASCADE")


def new_name(what: str) -> str:
    return f"bench_{what}_{secrets.token_hex(4)}"


@contextlib.contextmanager
def fresh_schema(base: str, what: str, *, create: bool = False) -> Iterator[str]:
    """A new schema name (created if `create`, else left to the engine); dropped after."""
    schema = new_name(what)
    if create:
        create_schema(base, schema)
    try:
        yield schema
    finally:
        drop_schema(base, schema)


@contextlib.contextmanager
def fresh_database(base: str, what: str) -> Iterator[str]:
    """A new, empty database on `base`'s server; yields its URL, drops it after."""
    name = new_name(what)
    with _admin(base) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield _with_database(base, name)
    finally:
        with _admin(base) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def raw_commit(base: str, commits: int = 500, repeats: int = 5) -> dict[str, Any]:
    """One small row per commit over one connection, `synchronous_commit` as the server
    has it: the physical limit of a durable step on this server.

    Returns ms per commit of an autocommit INSERT (one round trip, the commit included),
    one sample per repetition of `commits` commits, and the median of every single
    commit; plus the same for BEGIN; INSERT; COMMIT (three round trips), as a
    transaction that also locks a row needs."""
    with fresh_schema(base, "commit", create=True) as schema, _admin(base) as conn:
        conn.execute(f"CREATE TABLE {schema}.t (k BIGSERIAL PRIMARY KEY, v TEXT)")
        insert = f"INSERT INTO {schema}.t (v) VALUES (%s)"
        setting = conn.execute("SHOW synchronous_commit").fetchone()[0]
        samples: list[float] = []
        singles: list[float] = []
        explicit: list[float] = []
        for rep in range(repeats):
            started = time.perf_counter()
            for i in range(commits):
                one = time.perf_counter()
                conn.execute(insert, (f"{rep}-{i}",))
                singles.append(time.perf_counter() - one)
            samples.append(round((time.perf_counter() - started) * 1000 / commits, 4))
        for i in range(commits):
            one = time.perf_counter()
            with conn.transaction():
                conn.execute(insert, (f"tx-{i}",))
            explicit.append(time.perf_counter() - one)
    return {
        "unit": "ms/commit",
        "samples": samples,
        "median_single_ms": round(statistics.median(singles) * 1000, 4),
        "begin_insert_commit_median_ms": round(statistics.median(explicit) * 1000, 4),
        "synchronous_commit": setting,
    }
