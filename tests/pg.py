"""PostgreSQL for tests: a fresh schema per test in the server CI and developers have.

`GARRISON_TEST_PG_URL` (default `postgresql://postgres@127.0.0.1:5432/test`) names the
database. An unreachable server skips the test, and `tests/conftest.py` turns that skip
into a failure under `CI=true`.
"""

from __future__ import annotations

import os
import secrets

import pytest

PG_URL = os.environ.get("GARRISON_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
_created: list[str] = []
_reachable: bool | None = None


def _check() -> None:
    global _reachable
    if _reachable is None:
        try:
            import psycopg

            with psycopg.connect(PG_URL, connect_timeout=3):
                _reachable = True
        except Exception as exc:  # any failure means: no server for these tests
            _reachable = False
            pytest.skip(f"PostgreSQL at {PG_URL} is unreachable: {exc}")
    if not _reachable:
        pytest.skip(f"PostgreSQL at {PG_URL} is unreachable")


def fresh_postgres_url() -> str:
    """The URL of a new, empty schema; dropped at the end of the session."""
    _check()
    schema = f"t_{secrets.token_hex(6)}"
    _created.append(schema)
    sep = "&" if "?" in PG_URL else "?"
    return f"{PG_URL}{sep}schema={schema}"


def drop_schemas() -> None:
    if not _created:
        return
    import psycopg

    with psycopg.connect(PG_URL, autocommit=True) as conn:
        for schema in _created:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    _created.clear()
