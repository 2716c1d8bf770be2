"""Fleet chaos: worker processes SIGKILLed at random, PostgreSQL restarted once.

Three worker processes (`_fleet_worker.py`) serve 1,000 runs of a three-step workflow
from a queue capped at `CAP` active runs, on a private PostgreSQL cluster. Every one to
two seconds a random worker is killed with SIGKILL and a new one started; once, when a
third of the runs are done, the database is stopped (`-m immediate`) and started again
under the running workers, which must ride it out on their own.

Asserted afterwards, from the store and from the side-effect log each step body writes:

* every run COMPLETED, once, with the right result, and its journal holds each step
  exactly once;
* a step's side effect happened more than once only if an earlier execution was in
  flight in a process that was then killed, or around the database restart; the
  journaled execution is the last one to start, and none started after its commit
  (a committed step never runs again);
* each run was ended durably by one worker (the `run_finished` hook fires at most once
  per run, in the process that owns the finished run);
* the queue's cap was never exceeded (sampled every 50 ms);
* the workers alive through the restart went on committing, no task of any worker
  crashed, and every worker not killed exits cleanly on SIGTERM.

The duplicate counts are printed (run pytest with -s) and written to report.json.
`GARRISON_FLEET_RUNS` and `GARRISON_FLEET_SEED` change the size and the kill schedule.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.fleet._cluster import Cluster, private_cluster
from tests.fleet._fleet_worker import (
    CAP,
    LEASE_TTL_S,
    QUEUE,
    STEPS_PER_RUN,
    build,
    expected,
    run_id,
)

pytestmark = pytest.mark.crash  # a skip of this is a failure under CI=true

WORKER = Path(__file__).with_name("_fleet_worker.py")
ROOT = Path(__file__).parents[2]
RUNS = int(os.environ.get("GARRISON_FLEET_RUNS", "1000"))
SEED = int(os.environ.get("GARRISON_FLEET_SEED", str(random.randrange(1_000_000))))
WORKERS = 3
KILL_EVERY_S = (1.0, 2.0)
RESTART_AT = 0.35  # restart the database when this fraction of the runs has ended
DB_DOWN_S = 1.0
QUIET_AFTER_RESTART_S = 6.0  # no kills meanwhile: the survivors must recover alone
# An execution in flight within this window of the restart may be repeated: its commit
# failed (the database was down, or its pooled connection was a dead one afterwards).
RESTART_BEFORE_S = 1.0
RESTART_AFTER_S = 2 * LEASE_TTL_S + 3.0
# An execution cut off by a kill wrote its side effect at most this long before the
# kill (its commit was still on its way); an older one was not in flight at the kill.
KILL_SLACK_S = LEASE_TTL_S
DEADLINE_S = 120.0
SCHEMA = "fleet_chaos"
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED")


@dataclass
class Proc:
    name: str
    process: subprocess.Popen[bytes]
    log: Path
    started_at: float
    killed_at: float | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.killed_at is None and self.process.poll() is None


@dataclass
class Fleet:
    tmp: Path
    url: str
    effects: Path
    procs: list[Proc] = field(default_factory=list)

    def spawn(self) -> Proc:
        name = f"w{len(self.procs) + 1}"
        log = self.tmp / f"{name}.log"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, str(WORKER), "--url", self.url, "--effects",
                 str(self.effects), "--id", name],
                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        proc = Proc(name, process, log, time.time())
        self.procs.append(proc)
        return proc

    def live(self) -> list[Proc]:
        return [p for p in self.procs if p.alive()]

    def kill(self, proc: Proc) -> None:
        proc.killed_at = time.time()
        proc.process.send_signal(signal.SIGKILL)
        proc.process.wait(timeout=30)

    def killed_pids(self) -> set[str]:
        return {str(p.pid) for p in self.procs if p.killed_at is not None}

    def by_pid(self) -> dict[str, Proc]:
        return {str(p.pid): p for p in self.procs}

    def wait_ready(self) -> None:
        """Until every live worker is up (its store open, its SIGTERM handler set)."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(
                "fleet-worker ready" in p.log.read_text(errors="replace")
                or p.process.poll() is not None for p in self.live()):
            time.sleep(0.05)

    def stop(self) -> dict[str, int]:
        """SIGTERM every live worker (once it is up: a worker still importing has no
        handler yet, and would die of the signal); their exit codes."""
        self.wait_ready()
        live = self.live()
        for proc in live:
            proc.process.send_signal(signal.SIGTERM)
        codes: dict[str, int] = {}
        for proc in live:
            try:
                codes[proc.name] = proc.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.process.kill()
                codes[proc.name] = proc.process.wait()
        return codes

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.process.poll() is None:
                proc.process.kill()
                proc.process.wait()


class Sampler(threading.Thread):
    """Counts the queue's active runs every 50 ms (reconnecting through the restart)."""

    def __init__(self, dsn: str) -> None:
        super().__init__(daemon=True)
        self.dsn = dsn
        self.done = threading.Event()
        self.samples = 0
        self.errors = 0
        self.max_active = 0
        self.over_cap: list[tuple[float, int]] = []

    def run(self) -> None:
        conn: psycopg.Connection[Any] | None = None
        sql = (f"SELECT count(*) FROM {SCHEMA}.runs WHERE queue = %s "
               "AND status IN ('RUNNING', 'WAITING')")
        while not self.done.is_set():
            try:
                if conn is None:
                    conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=2)
                row = conn.execute(sql, (QUEUE,)).fetchone()
                active = int(row[0]) if row else 0
                self.samples += 1
                self.max_active = max(self.max_active, active)
                if active > CAP:
                    self.over_cap.append((time.time(), active))
            except psycopg.Error:
                self.errors += 1
                if conn is not None:
                    conn.close()
                conn = None
                self.done.wait(0.2)
            self.done.wait(0.05)
        if conn is not None:
            conn.close()


class Db:
    """The test's own reads, reconnecting after the restart."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.conn: psycopg.Connection[Any] | None = None

    def rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        if self.conn is None:
            self.conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=5)
        try:
            return self.conn.execute(sql, params).fetchall()
        except psycopg.Error:
            self.conn.close()
            self.conn = None
            raise

    def ended(self) -> int | None:
        try:
            rows = self.rows(f"SELECT count(*) FROM {SCHEMA}.runs WHERE status IN {TERMINAL}")
        except psycopg.Error:
            return None
        return int(rows[0][0])

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


async def submit(url: str) -> None:
    app, fleet, _ = build(url, None, worker=False)
    async with app:
        for first in range(0, RUNS, 100):
            await asyncio.gather(*(app.start(fleet, i, run_id=run_id(i), queue=QUEUE)
                                   for i in range(first, min(RUNS, first + 100))))


@dataclass
class Execution:
    pid: str
    began: float
    wrote: float


def read_effects(path: Path) -> tuple[dict[str, list[Execution]], dict[str, list[str]],
                                      dict[str, list[str]]]:
    steps: dict[str, list[Execution]] = defaultdict(list)
    done: dict[str, list[str]] = defaultdict(list)
    finished: dict[str, list[str]] = defaultdict(list)
    for line in path.read_text().splitlines():
        pid, key, began, wrote = line.split()
        if key.startswith("done:"):
            done[key[5:]].append(pid)
        elif key.startswith("finished:"):
            finished[key[9:]].append(pid)
        else:
            steps[key].append(Execution(pid, float(began), float(wrote)))
    return steps, done, finished


def worker_pid(worker_id: str | None) -> str:
    return worker_id.split(":")[1] if worker_id else "?"


def log_lines(fleet: Fleet, needle: str, limit: int = 20) -> list[str]:
    found: list[str] = []
    for proc in fleet.procs:
        for line in proc.log.read_text(errors="replace").splitlines():
            if needle in line:
                found.append(f"{proc.name}/{proc.pid}: {line.strip()[:300]}")
    return found[:limit]


def test_fleet_survives_sigkills_and_a_postgres_restart(tmp_path: Path) -> None:
    with private_cluster() as cluster:
        began = time.time()
        report = run_chaos(tmp_path, cluster)
        report["test_s"] = round(time.time() - began, 1)
        (tmp_path / "report.json").write_text(json.dumps(report, indent=2))
        print("\nfleet chaos report:", json.dumps(report, indent=2))
        problems: list[str] = report.pop("problems")
        assert not problems, (f"{len(problems)} problem(s), seed {SEED}, logs in {tmp_path}:\n"
                              + "\n".join(problems[:40]))


def run_chaos(tmp: Path, cluster: Cluster) -> dict[str, Any]:
    url = cluster.url(SCHEMA)
    fleet = Fleet(tmp, url, tmp / "effects.log")
    rng = random.Random(SEED)
    db = Db(cluster.dsn)
    sampler = Sampler(cluster.dsn)
    problems: list[str] = []
    t_down = t_up = 0.0
    survivors: list[Proc] = []
    try:
        for _ in range(WORKERS):
            fleet.spawn()
        sampler.start()
        t_submit = time.time()
        asyncio.run(submit(url))
        t_chaos = time.time()
        next_kill = t_chaos + rng.uniform(*KILL_EVERY_S)
        deadline = t_chaos + DEADLINE_S
        while True:
            ended = db.ended()
            now = time.time()
            if ended == RUNS:
                break
            if now > deadline:
                problems.append(f"only {ended} of {RUNS} runs ended within {DEADLINE_S} s")
                problems += stuck_runs(db, fleet)
                break
            if not t_down and ended is not None and ended >= RUNS * RESTART_AT:
                # A worker still opening its store would fail to start (as it should);
                # the restart is for workers that are running.
                fleet.wait_ready()
                t_down = time.time()
                cluster.stop("immediate")
                time.sleep(DB_DOWN_S)
                cluster.start()
                t_up = time.time()
                survivors = fleet.live()
                next_kill = max(next_kill, t_up + QUIET_AFTER_RESTART_S)
            elif now >= next_kill:
                fleet.kill(rng.choice(fleet.live()))
                fleet.spawn()
                next_kill = now + rng.uniform(*KILL_EVERY_S)
            time.sleep(0.1)
        t_all_ended = time.time()
        sampler.done.set()
        sampler.join(timeout=10)
        codes = fleet.stop()
        for name, code in codes.items():
            if code != 0:
                problems.append(f"worker {name} exited with {code} on SIGTERM")
        for proc in fleet.procs:
            if proc.killed_at is None and proc.name not in codes:
                problems.append(f"worker {proc.name} (pid {proc.pid}) died on its own: "
                                f"rc={proc.process.returncode}; "
                                f"{proc.log.read_text(errors='replace')[-2000:]}")
        if not t_down:
            problems.append("the database was never restarted")
        crashed = log_lines(fleet, "task_crashed") + log_lines(fleet, "Traceback")
        if crashed:
            problems.append(f"worker tasks crashed: {crashed}")
        report = check(db, fleet, problems, t_down, t_up, survivors)
        report.update({
            "seed": SEED, "runs": RUNS, "submit_s": round(t_chaos - t_submit, 1),
            "chaos_s": round(t_all_ended - t_chaos, 1),
            "kills": len(fleet.killed_pids()), "workers_started": len(fleet.procs),
            "db_restart_at_s": round(t_down - t_chaos, 1) if t_down else None,
            "db_stopped_at": round(t_down, 3), "db_back_at": round(t_up, 3),
            "db_down_s": round(t_up - t_down, 1) if t_down else None,
            "queue_cap": CAP, "max_active_sampled": sampler.max_active,
            "samples": sampler.samples, "sample_errors": sampler.errors,
        })
        if sampler.over_cap:
            problems.append(f"queue {QUEUE!r} had more than {CAP} active runs: "
                            f"{sampler.over_cap[:10]}")
        if sampler.samples < 100:
            problems.append(f"only {sampler.samples} samples of the queue's active runs")
        report["problems"] = problems
        return report
    finally:
        sampler.done.set()
        fleet.kill_all()
        db.close()


def stuck_runs(db: Db, fleet: Fleet) -> list[str]:
    rows = db.rows(f"SELECT run_id, status, owner, fence, lease_until, updated_at "
                   f"FROM {SCHEMA}.runs WHERE status NOT IN {TERMINAL} ORDER BY run_id LIMIT 10")
    now = time.time()
    lines = [f"stuck: {r[0]} {r[1]} owner={r[2]} fence={r[3]} "
             f"lease_until={r[4] and round(r[4] - now, 1)}s updated={round(r[5] - now, 1)}s"
             for r in rows]
    for row in rows[:3]:
        lines += log_lines(fleet, str(row[0]))
    return lines


def check(db: Db, fleet: Fleet, problems: list[str], t_down: float, t_up: float,
          survivors: list[Proc]) -> dict[str, Any]:
    runs = {r[0]: r for r in db.rows(
        f"SELECT run_id, status, result, owner, fence, completed_at FROM {SCHEMA}.runs")}
    journal: dict[str, dict[str, tuple[Any, ...]]] = defaultdict(dict)
    for row in db.rows(f"SELECT run_id, position, kind, status, worker, completed_at "
                       f"FROM {SCHEMA}.steps"):
        journal[row[0]][row[1]] = row
    executions, done, finished = read_effects(fleet.effects)
    killed = fleet.killed_pids()
    procs = fleet.by_pid()

    # Every run: completed once, with the right result, each step journaled once.
    if len(runs) != RUNS:
        problems.append(f"{len(runs)} runs stored, {RUNS} started")
    for i in range(RUNS):
        rid = run_id(i)
        run = runs.get(rid)
        if run is None:
            problems.append(f"{rid}: missing")
            continue
        if run[1] != "COMPLETED" or run[2] is None or json.loads(run[2]) != expected(i):
            problems.append(f"{rid}: {run[1]} result={run[2]} (expected {expected(i)})")
        entries = journal.get(rid, {})
        positions = {str(k) for k in range(1, STEPS_PER_RUN + 1)}
        if set(entries) != positions or any(e[2] != "step" or e[3] != "completed"
                                            for e in entries.values()):
            problems.append(f"{rid}: journal {sorted(entries.values())}")

    # Side effects: repeated only when an earlier execution was cut off by a kill or by
    # the restart; the journaled one is the last to start, and started before its commit.
    window = (t_down - RESTART_BEFORE_S, t_up + RESTART_AFTER_S)
    causes: Counter[str] = Counter()
    repeats: list[str] = []
    repeated_steps = 0
    for rid, entries in journal.items():
        for position, entry in entries.items():
            key = f"{rid}:{position}"
            runs_of = sorted(executions.get(key, []), key=lambda e: e.began)
            writer = worker_pid(entry[4])
            if not runs_of:
                problems.append(f"{key}: journaled by {writer} but its side effect never "
                                "happened")
                continue
            last = runs_of[-1]
            if last.pid != writer:
                problems.append(f"{key}: journaled by pid {writer}, but the last execution "
                                f"was in pid {last.pid}: {runs_of}")
            committed_at = float(entry[5])
            late = [e for e in runs_of if e.began > committed_at]
            if late:
                problems.append(f"{key}: ran again after its commit at {committed_at:.3f}: "
                                f"{late} (journaled by {writer})")
            if len(runs_of) > 1:
                repeated_steps += 1
            for extra in runs_of[:-1]:
                killed_at = procs[extra.pid].killed_at if extra.pid in killed else None
                if killed_at is not None and killed_at - KILL_SLACK_S <= extra.wrote:
                    cause = "kill"  # in flight when its process died: not committed yet
                elif t_down and extra.wrote >= window[0] and extra.began <= window[1]:
                    cause = "db_restart"
                else:
                    cause = "unexplained"
                causes[cause] += 1
                repeats.append(f"{key} ran in pid {extra.pid} ({cause}), journaled by "
                               f"{writer}")
                if cause == "unexplained":
                    problems.append(
                        f"{key}: unexplained repeat: {extra} (killed pids {sorted(killed)}); "
                        f"all executions {runs_of}, journaled by {writer}; logs: "
                        f"{log_lines(fleet, rid, 8)}")
    unjournaled = sorted(set(executions) - {f"{r}:{p}" for r, es in journal.items() for p in es})
    if unjournaled:
        problems.append(f"side effects of steps never journaled: {unjournaled[:10]}")

    # A run is finished durably once: by the worker that owns it at the end.
    finished_twice = {r: pids for r, pids in finished.items() if len(pids) > 1}
    if finished_twice:
        problems.append(f"runs finished more than once: {list(finished_twice.items())[:10]}")
    unreported = 0
    for rid, run in runs.items():
        owner = worker_pid(run[3])
        pids = finished.get(rid, [])
        if pids and pids[0] != owner:
            problems.append(f"{rid}: finished by pid {pids[0]} but owned by {owner}")
        elif not pids:
            unreported += 1  # its finisher died (or lost its connection) after the commit
            near_restart = t_down and window[0] <= float(run[5] or 0) <= window[1]
            if owner not in killed and not near_restart:
                problems.append(f"{rid}: completed by {run[3]} (alive) without run_finished")
    done_repeats = sum(len(p) - 1 for p in done.values())
    missing_done = [r for r in runs if r not in done]
    if missing_done:
        problems.append(f"runs whose last step never ran: {missing_done[:10]}")

    # The workers alive through the restart went on committing without being restarted.
    for proc in survivors:
        if proc.killed_at is not None and proc.killed_at < t_up + QUIET_AFTER_RESTART_S:
            continue
        after = [e for es in journal.values() for e in es.values()
                 if worker_pid(e[4]) == str(proc.pid) and float(e[5]) > t_up]
        if not after:
            problems.append(f"worker {proc.name} (pid {proc.pid}) committed nothing after the "
                            f"database restart; log: {proc.log.read_text()[-1500:]}")

    fences = Counter(int(r[4]) for r in runs.values())
    return {
        "step_executions": sum(len(v) for v in executions.values()),
        "steps_journaled": sum(len(v) for v in journal.values()),
        "steps_repeated": repeated_steps,
        "repeats_by_cause": dict(causes),
        "last_step_repeats": done_repeats,
        "runs_finished_by_a_killed_or_cut_off_worker": unreported,
        "runs_by_fence": dict(sorted(fences.items())),
        "lease_lost_logged": len(log_lines(fleet, "run.lease_lost", 100_000)),
        "lease_lost_away_from_the_restart": away_from(
            log_lines(fleet, "run.lease_lost", 100_000), window),
        "store_errors_logged": len(log_lines(fleet, "run.store_error", 100_000)),
        "repeats": repeats,
    }


def away_from(lines: list[str], window: tuple[float, float]) -> list[str]:
    """The log lines stamped (to the second, local time) outside `window`."""
    away = []
    for line in lines:
        stamp = re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", line)
        if stamp is None:
            continue
        at = time.mktime(time.strptime(stamp.group(), "%Y-%m-%d %H:%M:%S"))
        if not window[0] - 1 <= at <= window[1] + 1:
            away.append(line)
    return away
