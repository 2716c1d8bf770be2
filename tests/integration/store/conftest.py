"""The `store` fixture: every test in this folder runs once per backend in `BACKENDS`.

A backend is one entry in `_DATABASES`: a factory that returns the URL of a fresh, empty
database for one test. Adding PostgreSQL is one line there; the store itself comes from
`garrison.store.open_store(url)`, so nothing else changes. A factory whose server is
unreachable calls `pytest.skip(...)`; `tests/conftest.py` turns that skip into a failure
under `CI=true`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from garrison.store import Store, open_store
from tests.pg import drop_schemas, fresh_postgres_url


def _sqlite_database(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/g.db"


def _postgres_database(tmp_path: Path) -> str:
    return fresh_postgres_url()


_DATABASES: dict[str, Callable[[Path], str]] = {
    "sqlite": _sqlite_database,
    "postgres": _postgres_database,
}

BACKENDS = list(_DATABASES)


@pytest.fixture(scope="session", autouse=True)
def _drop_test_schemas() -> object:
    yield
    drop_schemas()


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of a fresh, empty database of the backend under test."""
    database: Callable[[Path], str] = _DATABASES[request.param]
    return database(tmp_path)


@asynccontextmanager
async def _opened(url: str) -> AsyncIterator[Store]:
    store = open_store(url)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    """An open store on a fresh database, closed after the test."""
    async with _opened(store_url) as opened:
        yield opened


@pytest.fixture
async def other_store(store_url: str, store: Store) -> AsyncIterator[Store]:
    """A second store object on the same database: its own connection, as another process has."""
    async with _opened(store_url) as opened:
        yield opened
