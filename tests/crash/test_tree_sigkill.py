"""SIGKILL the process hosting a supervision tree; a new process resumes the tree with
its restart count (the next crash escalates), and no child generation runs twice."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from garrison.store import RunStatus, open_store

pytestmark = pytest.mark.crash  # a skip of these is a failure under CI=true

WORKLOAD = Path(__file__).with_name("_tree_workload.py")


def run(url: str, *flags: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    return subprocess.run([sys.executable, str(WORKLOAD), "--url", url, *flags],
                          capture_output=True, text=True, timeout=60, env=env)


def test_a_tree_survives_a_sigkill_with_its_restart_count(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/g.db"

    killed = run(url, "--crash-and-die")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]

    resumed = run(url, "--crash-again")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert resumed.stdout.strip().splitlines()[-1] == "escalated"

    async def statuses() -> dict[str, RunStatus]:
        store = open_store(url)
        await store.open()
        try:
            return {r.run_id: r.status for r in await store.list_runs(limit=100)}
        finally:
            await store.close()

    runs = asyncio.run(statuses())
    assert runs == {"t": RunStatus.FAILED, "t/a#1": RunStatus.QUARANTINED,
                    "t/a#2": RunStatus.QUARANTINED, "t/b#1": RunStatus.CANCELLED}
