"""SIGKILL a worker while its run waits in a retry backoff: the count must survive."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from garrison.store import StepStatus, open_store

pytestmark = pytest.mark.crash  # a skip of these is a failure under CI=true

WORKLOAD = Path(__file__).with_name("_retry_workload.py")


def run(url: str, effects: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    return subprocess.run([sys.executable, str(WORKLOAD), "--url", url, "--effects",
                           str(effects), *flags], capture_output=True, text=True,
                          timeout=60, env=env)


def test_sigkill_during_a_retry_backoff_keeps_the_attempt_count(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/g.db"
    effects = tmp_path / "effects.log"

    killed = run(url, effects, "--kill-in-backoff")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert len(effects.read_text().splitlines()) == 1  # attempt 1 failed, then the kill

    resumed = run(url, effects)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert resumed.stdout.strip().splitlines()[-1] == "up after 3"
    pids = effects.read_text().split()
    assert len(pids) == 3 and pids[0] != pids[1] == pids[2]  # attempts 2, 3 in the new one

    async def journal() -> tuple[StepStatus, int]:
        store = open_store(url)
        await store.open()
        try:
            [entry] = await store.load_journal("retry-1")
            return entry.status, entry.attempts
        finally:
            await store.close()

    assert asyncio.run(journal()) == (StepStatus.COMPLETED, 3)  # the count went on: 1, 2, 3
