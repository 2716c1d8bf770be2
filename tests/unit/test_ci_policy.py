"""Under CI=true a skipped PostgreSQL or crash test fails the run (tests/conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]

SKIPPING = '''
import pytest

def test_postgres_backend_unreachable():
    pytest.skip("no server")

@pytest.mark.crash
def test_killing_workers():
    pytest.skip("no tool")

def test_ordinary_skip():
    pytest.skip("fine anywhere")
'''


def run(tmp_path: Path, ci: bool) -> subprocess.CompletedProcess[str]:
    (tmp_path / "conftest.py").write_text(
        "from tests.conftest import pytest_runtest_makereport  # noqa: F401\n"
        "def pytest_configure(config):\n"
        "    config.addinivalue_line('markers', 'crash: kills processes')\n"
    )
    (tmp_path / "test_policy.py").write_text(SKIPPING)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = str(ROOT)
    if ci:
        env["CI"] = "true"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(tmp_path)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)


def test_skipped_postgres_and_crash_tests_fail_under_ci(tmp_path: Path) -> None:
    done = run(tmp_path, ci=True)
    assert done.returncode == 1, done.stdout
    assert "2 failed, 1 skipped" in done.stdout
    assert "must run in CI" in done.stdout


def test_the_same_skips_are_plain_skips_outside_ci(tmp_path: Path) -> None:
    done = run(tmp_path, ci=False)
    assert done.returncode == 0, done.stdout
    assert "3 skipped" in done.stdout
