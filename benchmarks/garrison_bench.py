"""Garrison on the peer study's workloads; prints one JSON line per invocation.

    python benchmarks/garrison_bench.py --workload w1|w2|w3|w5|w6|commit|asyncio --workdir DIR

Workload constants come from peers/_bench_common.py so that every engine runs the same
shapes. Run through benchmarks/run.py, which prints the tables.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent / "peers"))
from _bench_common import (  # the shared workload definitions
    W1_REPEATS,
    W1_STEPS,
    W2_REPEATS,
    W2_SLEEP_S,
    W2_STEPS,
    W2_WORKFLOWS,
    measure_import,
    peak_rss_mib,
)

import garrison
from garrison import Context, Garrison

W3_STEPS = 20
W3_KILL_AT = 10
W3_REPEATS = 3
W6_RUNS = 10_000


def store_url(workdir: Path, name: str) -> str:
    """The embedded store in `workdir`, or GARRISON_BENCH_URL (say, a PostgreSQL schema)."""
    return os.environ.get("GARRISON_BENCH_URL") or f"sqlite:///{workdir}/{name}.db"


def current_rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def record(workload: str, unit: str, samples: list[float], **extra: Any) -> None:
    print(json.dumps({"peer": "garrison", "version": garrison.__version__, "workload": workload,
                      "unit": unit, "samples": samples, **extra}))


async def w1(workdir: Path) -> None:
    # One app and one file for every repetition, as the peer scripts do. (Closing the
    # last connection checkpoints and deletes the WAL; a fresh WAL grows, and each sync
    # of a growing file also writes its size: ~1.5x dearer until the first checkpoint.)
    app = Garrison(store_url(workdir, "w1"))

    @app.step(name="noop")
    async def noop(i: int) -> int:
        return i

    @app.workflow(name="w1")
    async def w1_flow(ctx: Context) -> int:
        for i in range(W1_STEPS):
            await noop(i)
        return W1_STEPS

    samples = []
    async with app:
        for _ in range(W1_REPEATS):
            started = time.perf_counter()
            await (await app.start(w1_flow)).result()
            samples.append(round((time.perf_counter() - started) * 1000 / W1_STEPS, 4))
    record("w1", "ms/step", samples)


async def w2(workdir: Path) -> None:
    app = Garrison(store_url(workdir, "w2"))

    @app.step(name="nap")
    async def nap(i: int) -> int:
        await asyncio.sleep(W2_SLEEP_S)
        return i

    @app.workflow(name="w2")
    async def w2_flow(ctx: Context) -> int:
        for i in range(W2_STEPS):
            await nap(i)
        return W2_STEPS

    samples = []
    async with app:
        for _ in range(W2_REPEATS):
            started = time.perf_counter()
            handles = await asyncio.gather(*(app.start(w2_flow) for _ in range(W2_WORKFLOWS)))
            await asyncio.gather(*(h.result() for h in handles))
            samples.append(round(W2_WORKFLOWS * W2_STEPS / (time.perf_counter() - started), 1))
    record("w2", "steps/s", samples, peak_rss_mib=round(peak_rss_mib(), 1))


async def asyncio_w2() -> None:
    """The W2 shape in plain asyncio, no durability: the ceiling."""

    async def flow() -> None:
        for _ in range(W2_STEPS):
            await asyncio.sleep(W2_SLEEP_S)

    samples = []
    for _ in range(W2_REPEATS):
        started = time.perf_counter()
        await asyncio.gather(*(flow() for _ in range(W2_WORKFLOWS)))
        samples.append(round(W2_WORKFLOWS * W2_STEPS / (time.perf_counter() - started), 1))
    record("asyncio", "steps/s", samples)


def raw_commit(workdir: Path) -> None:
    """One small row per commit, WAL, synchronous=FULL: the physical limit of a step."""
    conn = sqlite3.connect(workdir / "raw.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("CREATE TABLE IF NOT EXISTS t (k INTEGER PRIMARY KEY, v TEXT)")
    samples = []
    for rep in range(5):
        started = time.perf_counter()
        for i in range(500):
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO t (v) VALUES (?)", (f"{rep}-{i}",))
            conn.execute("COMMIT")
        samples.append(round((time.perf_counter() - started) * 1000 / 500, 4))
    conn.close()
    record("commit", "ms/commit", samples)


def pg_raw_commit(url: str) -> None:
    """The same on PostgreSQL (GARRISON_BENCH_URL's server and database, a schema of its
    own): one row per autocommit INSERT over one connection."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.pg import raw_commit as measure

    base = url.split("?", 1)[0]
    result = measure(base)
    record("commit", result.pop("unit"), result.pop("samples"), **result)


# -- W3: SIGKILL at step 10 of 20, restart, time to the first resumed step ---------------

W3_CHILD = """
import asyncio, os, signal, sys, time
from garrison import Context, EngineHooks, Garrison

db, log, kill = sys.argv[1], sys.argv[2], sys.argv[3] == "kill"
out = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

class Kill(EngineHooks):
    seen = 0
    def step_completed(self, step, duration_s):
        self.seen += 1
        if kill and self.seen == {kill_at}:
            os.kill(os.getpid(), signal.SIGKILL)

app = Garrison(f"sqlite:///{{db}}", hooks=[Kill()])

@app.step(name="work")
async def work(i: int) -> int:
    os.write(out, f"{{os.getpid()}} {{i}} {{time.time()}}\\n".encode())
    await asyncio.sleep(0.01)
    return i

@app.workflow(name="w3")
async def w3(ctx: Context) -> int:
    return sum([await work(i) for i in range({steps})])

async def main():
    async with app:
        await (await app.start(w3, run_id="w3")).result()

asyncio.run(main())
"""


def w3(workdir: Path) -> None:
    script = W3_CHILD.format(kill_at=W3_KILL_AT, steps=W3_STEPS)
    first_step_s, complete_s, twice = [], [], []
    for rep in range(W3_REPEATS):
        db, log = workdir / f"w3-{rep}.db", workdir / f"w3-{rep}.log"
        killed = subprocess.run([sys.executable, "-c", script, str(db), str(log), "kill"])
        assert killed.returncode == -signal.SIGKILL, killed.returncode
        started = time.time()
        done = subprocess.run([sys.executable, "-c", script, str(db), str(log), "resume"])
        finished = time.time()
        assert done.returncode == 0, done.returncode
        rows = [line.split() for line in log.read_text().splitlines()]
        pids = list(dict.fromkeys(r[0] for r in rows))
        resumed = [float(r[2]) for r in rows if r[0] == pids[-1]]
        first_step_s.append(round(min(resumed) - started, 4))
        complete_s.append(round(finished - started, 4))
        steps = [r[1] for r in rows]
        twice.append(sum(1 for s in set(steps) if steps.count(s) > 1))
    record("w3", "s to first resumed step", first_step_s, complete_s=complete_s,
           steps_run_twice=twice)


# -- W6: 10,000 runs parked on wait_for ---------------------------------------------------


async def w6(workdir: Path) -> None:
    app = Garrison(f"sqlite:///{workdir}/w6.db")

    @app.workflow(name="w6")
    async def parked(ctx: Context) -> Any:
        return await ctx.wait_for("go")

    async with app:
        baseline = current_rss_mib()
        started = time.perf_counter()
        handles = []
        for chunk in range(0, W6_RUNS, 1000):
            handles += await asyncio.gather(
                *(app.start(parked, run_id=f"p{i}") for i in range(chunk, chunk + 1000)))
        assert app.worker is not None
        while app.worker.live:  # noqa: ASYNC110  # a benchmark's coarse wait, not a test
            await asyncio.sleep(0.05)
        park_s = time.perf_counter() - started
        waiting = len(await app.store.list_runs(statuses=[garrison.RunStatus.WAITING],
                                                limit=W6_RUNS))
        rss = current_rss_mib()
        woke = time.perf_counter()
        await asyncio.gather(*(app.send(h.run_id, "go", 1) for h in handles))
        results = await asyncio.gather(*(h.result() for h in handles))
        wake_s = time.perf_counter() - woke
    assert waiting == W6_RUNS and results == [1] * W6_RUNS, (waiting, len(results))
    record("w6", "MiB RSS with all parked", [round(rss, 1)], baseline_rss_mib=round(baseline, 1),
           park_all_s=round(park_s, 2), wake_all_s=round(wake_s, 2), runs=W6_RUNS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workload", required=True,
                        choices=("w1", "w2", "w3", "w5", "w6", "commit", "asyncio"))
    parser.add_argument("--workdir", required=True, type=Path)
    args = parser.parse_args()
    workdir: Path = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    if args.workload == "w1":
        asyncio.run(w1(workdir))
    elif args.workload == "w2":
        asyncio.run(w2(workdir))
    elif args.workload == "w3":
        w3(workdir)
    elif args.workload == "w5":
        result = measure_import("import garrison")
        record("w5", "ms", result["samples"], rss_mib=result["rss_mib"])
    elif args.workload == "w6":
        asyncio.run(w6(workdir))
    elif args.workload == "commit":
        url = os.environ.get("GARRISON_BENCH_URL", "")
        if url.startswith(("postgresql:", "postgres:")):
            pg_raw_commit(url)
        else:
            raw_commit(workdir)
    else:
        asyncio.run(asyncio_w2())


if __name__ == "__main__":
    main()
