"""SIGKILL a real worker process at seeded points; a fresh process must finish every run.

Asserts, for every seed: every run completes with the right result; every step's side
effect happened once, except steps in flight at the kill, which ran at most twice (once
in the killed process, once in the new one, whose commit is the journaled one).
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from tests.crash._workload import RUNS, expected

pytestmark = pytest.mark.crash  # a skip of these is a failure under CI=true

WORKLOAD = Path(__file__).with_name("_workload.py")
POINTS = ("started", "completed", "committed", "parked", "fanout")
# Steps per run of the workload: 1 + 1 + 3 fan-out + 2 in the child + 1.
STEPS_PER_RUN = 8
SEEDS = range(int(os.environ.get("GARRISON_CRASH_SEEDS", "30")))


def run_worker(tmp: Path, kill_at: str | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, str(WORKLOAD), "--db", str(tmp / "g.db"),
               "--effects", str(tmp / "effects.log"), "--out", str(tmp / "out.json")]
    if kill_at:
        command += ["--kill-at", kill_at]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)


def journal_writers(db: Path) -> dict[str, str]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT run_id, position, worker FROM steps WHERE kind = 'step'")
        return {f"{run}:{pos}": worker.rsplit(":", 1)[1] for run, pos, worker in rows}


def check_recovery(tmp: Path, killed: subprocess.CompletedProcess[str]) -> dict[str, int]:
    resumed = run_worker(tmp)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    out = json.loads((tmp / "out.json").read_text())
    assert out["results"] == [expected(i) for i in range(RUNS)]

    executions: dict[str, list[str]] = defaultdict(list)
    for line in (tmp / "effects.log").read_text().splitlines():
        pid, key = line.split()
        executions[key].append(pid)
    writers = journal_writers(tmp / "g.db")
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


@pytest.mark.parametrize("seed", SEEDS)
def test_runs_complete_and_completed_steps_never_rerun_after_sigkill(
    tmp_path: Path, seed: int
) -> None:
    rng = random.Random(seed)
    point = POINTS[seed % len(POINTS)]
    limit = RUNS if point == "parked" else RUNS * STEPS_PER_RUN // (3 if point == "fanout" else 1)
    kill_at = f"{point}:{rng.randint(1, max(1, limit - 1))}"
    killed = run_worker(tmp_path, kill_at)
    assert killed.returncode == -signal.SIGKILL, (
        f"{kill_at}: worker was not killed (rc={killed.returncode}) {killed.stderr[-2000:]}"
    )
    stats = check_recovery(tmp_path, killed)
    if point == "completed":
        # The step whose side effect had happened but whose commit had not must re-run.
        assert stats["duplicates"] >= 1
    # Other runs' steps may have been mid-flight too, but never more than one per branch.
    assert stats["duplicates"] <= RUNS * 3


def test_worker_killed_from_outside_at_a_random_moment_loses_nothing(tmp_path: Path) -> None:
    rng = random.Random(1234)
    command = [sys.executable, str(WORKLOAD), "--db", str(tmp_path / "g.db"),
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
    check_recovery(tmp_path, subprocess.CompletedProcess(command, -9))
