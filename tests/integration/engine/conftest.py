"""Engine behaviour on every backend: `db_url` is parametrized over SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from garrison.testing import FakeClock
from tests.pg import drop_schemas, fresh_postgres_url


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/garrison.db"
    else:
        yield fresh_postgres_url()
        drop_schemas()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()
