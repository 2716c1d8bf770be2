"""Suite-wide policy: under CI=true a skipped PostgreSQL or crash test is a failure.

A backend suite that silently skips in CI proves nothing; the developers' guide makes
it an error, so a missing server or tool shows up red instead of green.
"""

from __future__ import annotations

import os
from collections.abc import Generator

import pytest


def _required_in_ci(item: pytest.Item) -> bool:
    return "postgres" in item.nodeid or item.get_closest_marker("crash") is not None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    if (
        os.environ.get("CI") == "true"
        and report.skipped
        and not hasattr(report, "wasxfail")
        and _required_in_ci(item)
    ):
        report.outcome = "failed"
        report.longrepr = (
            f"{item.nodeid} was skipped under CI=true ({report.longrepr!r}); "
            "PostgreSQL and crash suites must run in CI"
        )
