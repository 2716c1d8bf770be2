"""A zombie worker: paused (SIGSTOP) past its lease mid-step, then resumed, commits nothing.

Worker A (lease 1 s) claims a run whose one step sleeps 3 s; once the step has begun, A
is frozen with SIGSTOP. Worker B claims the run when A's lease has run out (the fence
goes up) and completes it. A is then resumed with SIGCONT: its step returns and its
heartbeat wakes, but the store refuses every write of A about the run (owner and fence
are checked in the write's transaction). A logs the lost lease and lives on: once B
is stopped, A takes and completes the next run.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest

from garrison.store._postgres import parse_postgres_url
from tests.fleet._fleet_worker import build
from tests.pg import drop_schemas, fresh_postgres_url

pytestmark = pytest.mark.crash  # a skip of this is a failure under CI=true

WORKER = Path(__file__).with_name("_fleet_worker.py")
ROOT = Path(__file__).parents[2]
RUN = "zombie-1"
NEXT = "zombie-2"  # started after the episode: A, alive, must still take work
STEP_SLEEP_S = 3.0  # worker A's step; worker B's takes 0.2 s
T = TypeVar("T")


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 20.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        found = probe()
        if found is not None and found is not False:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


class Worker:
    def __init__(self, tmp: Path, url: str, name: str, lease_ttl: float,
                 step_sleep: float) -> None:
        self.name = name
        self.log = tmp / f"{name}.log"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, str(WORKER), "--url", url, "--effects", str(tmp / "effects.log"),
                 "--id", name, "--lease-ttl", str(lease_ttl), "--step-sleep", str(step_sleep)],
                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        self.pid = self.process.pid
        self.worker_id = wait_for(f"worker {name} to start", self._ready)

    def _ready(self) -> str | None:
        if self.process.poll() is not None:
            raise AssertionError(f"worker {self.name} exited: {self.output()}")
        for line in self.output().splitlines():
            if line.startswith("fleet-worker ready "):
                return line.split()[-1]
        return None

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"worker {self.name} ignored SIGTERM: {self.output()}") from None


@pytest.fixture
def store_url() -> Iterator[str]:
    yield fresh_postgres_url()
    drop_schemas()


def parse_schema(url: str) -> tuple[str, str]:
    dsn, schema, _ = parse_postgres_url(url)
    return dsn, schema


def run_row(url: str, run: str = RUN) -> dict[str, Any] | None:
    dsn, schema = parse_schema(url)
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(f"SELECT status, owner, fence, result FROM {schema}.runs "
                           "WHERE run_id = %s", (run,)).fetchone()
    if row is None:
        return None
    return {"status": row[0], "owner": row[1], "fence": row[2], "result": row[3]}


def journal(url: str) -> list[tuple[str, str, str, str | None]]:
    dsn, schema = parse_schema(url)
    with psycopg.connect(dsn, autocommit=True) as conn:
        return [(r[0], r[1], r[2], r[3]) for r in conn.execute(
            f"SELECT position, kind, status, worker FROM {schema}.steps WHERE run_id = %s "
            "ORDER BY position", (RUN,)).fetchall()]


def effects(tmp: Path) -> list[list[str]]:
    path = tmp / "effects.log"
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


async def start_run(url: str, run: str = RUN) -> None:
    app, _, zombie = build(url, None, worker=False)
    async with app:
        await app.start(zombie, run_id=run)


def test_worker_paused_past_its_lease_commits_nothing_on_postgres(
    tmp_path: Path, store_url: str
) -> None:
    workers: list[Worker] = []
    try:
        a = Worker(tmp_path, store_url, "A", lease_ttl=1.0, step_sleep=STEP_SLEEP_S)
        workers.append(a)
        asyncio.run(start_run(store_url))
        wait_for("A to be inside the step", lambda: any(
            e[:2] == [str(a.pid), "started"] for e in effects(tmp_path)))
        a.process.send_signal(signal.SIGSTOP)
        paused_at = time.monotonic()
        held = run_row(store_url)
        assert held is not None and held["status"] == "RUNNING", held
        assert held["owner"] == a.worker_id, held
        fence_a = held["fence"]

        b = Worker(tmp_path, store_url, "B", lease_ttl=1.0, step_sleep=0.2)
        workers.append(b)
        taken = wait_for("B to take the run over and complete it", lambda: (
            (row := run_row(store_url)) is not None and row["status"] == "COMPLETED"
            and row["owner"] == b.worker_id and row))
        assert isinstance(taken, dict)
        assert taken["fence"] > fence_a, (fence_a, taken)
        assert time.monotonic() - paused_at > 0.5, "B took a live lease over"

        # Resume A only once its step's sleep is over: on SIGCONT the step returns at
        # once and A tries to commit it, as a zombie would.
        time.sleep(max(0.0, paused_at + STEP_SLEEP_S + 0.5 - time.monotonic()))
        a.process.send_signal(signal.SIGCONT)
        wait_for("A to find its lease lost", lambda: "run.lease_lost" in a.output(), 10.0)
        time.sleep(2.0)  # let A go on
        assert a.process.poll() is None, f"worker A died on resuming: {a.output()}"
        lines = effects(tmp_path)
        assert [str(a.pid), "returned", f"{RUN}:1"] in [e[:3] for e in lines], (
            "A's step did not go on after SIGCONT", lines)
        assert "no longer holds run" in a.output(), (
            f"A's commit of the step was not refused with LeaseLostError: {a.output()}")

        final = run_row(store_url)
        assert final is not None
        assert final["status"] == "COMPLETED" and final["owner"] == b.worker_id, final
        assert json.loads(final["result"]) == b.pid, (final, "not B's result")
        assert final["fence"] == taken["fence"], (taken, final)
        entries = journal(store_url)
        assert [e[:3] for e in entries] == [("1", "step", "completed")], entries
        assert all(e[3] == b.worker_id for e in entries), (
            f"journal written by another worker than B ({b.worker_id}): {entries}")
        finished = [e for e in lines if e[1] == f"finished:{RUN}"]
        assert [e[0] for e in finished] == [str(b.pid)], f"run finished by {finished}"
        # A lives on as a worker: with B gone, it takes and completes the next run.
        assert b.stop() == 0, b.output()
        asyncio.run(start_run(store_url, NEXT))
        try:
            wait_for(f"A, alive after its lost lease, to complete {NEXT}",
                     lambda: (row := run_row(store_url, NEXT)) is not None
                     and row["status"] == "COMPLETED" and row["owner"] == a.worker_id,
                     STEP_SLEEP_S + 10)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; {NEXT} is {run_row(store_url, NEXT)}; "
                                 f"A's log:\n{a.output()}") from None
        crashed = [line for line in a.output().splitlines()
                   if "task_crashed" in line or "Traceback" in line]
        assert not crashed, f"a task of worker A crashed: {crashed}\n{a.output()}"
        report = {
            "fence": [fence_a, final["fence"]],
            "a_lease_lost": [line[:400] for line in a.output().splitlines()
                             if "lease_lost" in line],
        }
        print("\nzombie report:", json.dumps(report, indent=2))

        assert a.stop() == 0, a.output()
        assert run_row(store_url) == final
    finally:
        for worker in workers:
            if worker.process.poll() is None:
                worker.process.send_signal(signal.SIGCONT)
                worker.process.kill()
                worker.process.wait()
