"""SIGKILL a real worker process at seeded points; a fresh process must finish every run.

Asserts, for every seed: every run completes with the right result; every step's side
effect happened once, except steps in flight at the kill, which ran at most twice (once
in the killed process, once in the new one, whose commit is the journaled one).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest

from garrison.store import StepKind, open_store
from tests.crash._workload import RUNS, expected
from tests.pg import drop_schemas, fresh_postgres_url

pytestmark = pytest.mark.crash  # a skip of these is a failure under CI=true

WORKLOAD = Path(__file__).with_name("_workload.py")
POINTS = ("started", "completed", "committed", "parked", "fanout")
# Steps per run of the workload: 1 + 1 + 3 fan-out + 2 in the child + 1.
STEPS_PER_RUN = 8
SEEDS = range(int(os.environ.get("GARRISON_CRASH_SEEDS", "30")))
PG_SEEDS = 10


def run_worker(tmp: Path, url: str, kill_at: str | None = None
               ) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, str(WORKLOAD), "--url", url,
               "--effects", str(tmp / "effects.log"), "--out", str(tmp / "out.json")]
    if kill_at:
        command += ["--kill-at", kill_at]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)


def journal_writers(url: str) -> dict[str, str]:
    """Which worker (pid) committed each step, read through the store itself."""

    async def read() -> dict[str, str]:
        store = open_store(url, create=False)
        await store.open()
        try:
            runs = await store.list_runs(limit=10_000)
            writers: dict[str, str] = {}
            for run in runs:
                for entry in await store.load_journal(run.run_id):
                    if entry.kind is StepKind.STEP and entry.worker is not None:
                        pid = entry.worker.split(":")[1]  # host:pid:nonce
                        writers[f"{run.run_id}:{entry.position}"] = pid
            return writers
        finally:
            await store.close()

    return asyncio.run(read())


def check_recovery(tmp: Path, url: str) -> dict[str, int]:
    resumed = run_worker(tmp, url)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    out = json.loads((tmp / "out.json").read_text())
    assert out["results"] == [expected(i) for i in range(RUNS)]

    executions: dict[str, list[str]] = defaultdict(list)
    for line in (tmp / "effects.log").read_text().splitlines():
        pid, key = line.split()
        executions[key].append(pid)
    writers = journal_writers(url)
    assert set(executions) == set(writers), "every journaled step ran, every run step is journaled"
    assert len(writers) == RUNS * STEPS_PER_RUN
    twice = {k: pids for k, pids in executions.items() if len(pids) > 1}
    for key, pids in twice.items():
        assert len(pids) == 2, f"{key} ran {len(pids)} times"
        assert pids[0] != pids[1], f"{key} ran twice in one process"
        assert writers[key] == pids[1] == str(out["pid"]), (
            f"{key} ran again although the killed process had committed it"
        )
    return {"duplicates": len(twice)}


@pytest.fixture
def backend() -> str:
    return "sqlite"


@pytest.fixture
def store_url(backend: str, tmp_path: Path) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path}/g.db"
    else:
        yield fresh_postgres_url()
        drop_schemas()


# Every seed on SQLite; the first PG_SEEDS on PostgreSQL (each costs more round trips).
CASES = [("sqlite", seed) for seed in SEEDS] + [("postgres", seed) for seed in range(PG_SEEDS)]


@pytest.mark.parametrize(("backend", "seed"), CASES)
def test_runs_complete_and_completed_steps_never_rerun_after_sigkill(
    tmp_path: Path, seed: int, store_url: str
) -> None:
    rng = random.Random(seed)
    point = POINTS[seed % len(POINTS)]
    limit = RUNS if point == "parked" else RUNS * STEPS_PER_RUN // (3 if point == "fanout" else 1)
    kill_at = f"{point}:{rng.randint(1, max(1, limit - 1))}"
    killed = run_worker(tmp_path, store_url, kill_at)
    assert killed.returncode == -signal.SIGKILL, (
        f"{kill_at}: worker was not killed (rc={killed.returncode}) {killed.stderr[-2000:]}"
    )
    stats = check_recovery(tmp_path, store_url)
    if point == "completed":
        # The step whose side effect had happened but whose commit had not must re-run.
        assert stats["duplicates"] >= 1
    # Other runs' steps may have been mid-flight too, but never more than one per branch.
    assert stats["duplicates"] <= RUNS * 3


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_worker_killed_from_outside_at_a_random_moment_loses_nothing(
    tmp_path: Path, store_url: str
) -> None:
    rng = random.Random(1234)
    command = [sys.executable, str(WORKLOAD), "--url", store_url,
               "--effects", str(tmp_path / "effects.log"), "--out", str(tmp_path / "out.json")]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    for _ in range(3):
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        try:
            process.wait(timeout=rng.uniform(0.3, 0.9))
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            process.wait()
    check_recovery(tmp_path, store_url)
