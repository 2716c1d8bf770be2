from __future__ import annotations

from pathlib import Path

import pytest

from garrison.testing import FakeClock


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/garrison.db"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()
