"""Garrison as a fleet on one PostgreSQL: scale-out, enqueue-to-start, kill-to-resume.

    python benchmarks/fleet_bench.py                       # all three, defaults below
    python benchmarks/fleet_bench.py --only scale --workers 1,2,4 --repeats 2
    python benchmarks/fleet_bench.py --only latency --samples 200
    python benchmarks/fleet_bench.py --only kill --lease-ttls 2,10 --kill-repeats 3

Worker processes are `garrison worker --app benchmarks.fleet_app:app --queues bench
--grace 0` (the CLI, one process each); the client is `Garrison(url, worker=False)` in
this process. Every measurement gets a fresh schema in --pg-url's database, dropped
afterwards.

- scale: the client enqueues --runs runs of --steps steps of asyncio.sleep(--sleep) into
  queue "bench" while N idle workers listen; steps/s = runs x steps / (last
  runs.completed_at - first runs.started_at), read from the runs table.
- latency: one idle worker; the client starts one `ping` run at a time (its one step
  returns time.time() taken in its body) and waits for it. Enqueue-to-start = that time
  minus time.time() just before app.start(); also runs.started_at - runs.created_at.
- kill: a worker holding --kill-runs runs (steps of 0.1 s), a second idle worker; the
  first is SIGKILLed mid-step; kill-to-resume = the first step body the survivor runs for
  those runs (its own log line) minus the kill time. Repeated for each --lease-ttls.

Prints a table per measurement, then one JSON line with every sample. Times are wall
clock on one host (the store's clock offset, measured at open, is ~0).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402

from benchmarks.fleet_app import QUEUE, build  # noqa: E402
from benchmarks.pg import DEFAULT_PG, fresh_schema, schema_url  # noqa: E402

READY_S = 60.0
STOP_S = 20.0
TICKS = os.sysconf("SC_CLK_TCK")


def cli() -> list[str]:
    script = Path(sys.executable).parent / "garrison"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from garrison.cli import main; main()"]


class WorkerProcess:
    """One `garrison worker` process, its output in a file, stopped on exit."""

    def __init__(self, url: str, workdir: Path, name: str, *, concurrency: int | None = None,
                 lease_ttl_s: float | None = None, claim_interval_s: float | None = None,
                 step_log: Path | None = None) -> None:
        env = dict(os.environ, GARRISON_FLEET_URL=url)
        for key, value in (("GARRISON_FLEET_LEASE_TTL", lease_ttl_s),
                           ("GARRISON_FLEET_CLAIM_INTERVAL", claim_interval_s),
                           ("GARRISON_FLEET_LOG", step_log)):
            env.pop(key, None)
            if value is not None:
                env[key] = str(value)
        cmd = [*cli(), "worker", "--app", "benchmarks.fleet_app:app", "--queues", QUEUE,
               "--grace", "0"]
        if concurrency is not None:
            cmd += ["--concurrency", str(concurrency)]
        self.output = workdir / f"{name}.out"
        with open(self.output, "wb") as out:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.pid = self.proc.pid
        self.worker_id = ""

    def text(self) -> str:
        try:
            return self.output.read_text(errors="replace")
        except OSError:
            return ""

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_S
        while time.monotonic() < deadline:
            for line in self.text().splitlines():
                if "Ctrl-C to stop" in line and line.startswith("worker "):
                    self.worker_id = line.split()[1]
                    return
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"worker {self.pid} not ready:\n{self.text()[-3000:]}")

    def cpu_s(self) -> float:
        """User + system CPU seconds this process has used so far."""
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan")
        return (int(fields[11]) + int(fields[12])) / TICKS

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=STOP_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            self.proc.wait()


@contextlib.contextmanager
def workers(count: int, url: str, workdir: Path, prefix: str, **options: Any):
    procs: list[WorkerProcess] = []
    try:
        for i in range(count):
            procs.append(WorkerProcess(url, workdir, f"{prefix}{i}", **options))
        for proc in procs:
            proc.wait_ready()
        yield procs
    finally:
        for proc in procs:
            proc.stop()


def machine_busy_s() -> float:
    """CPU seconds the whole machine (every CPU) has spent busy since boot."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / TICKS


def postgres_cpu_s() -> float:
    """User + system CPU seconds of the local `postgres` processes now alive (every
    database's: other work on the server counts too)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name, rest = text.split(" (", 1)[1].rsplit(")", 1)
        if name == "postgres":
            fields = rest.split()
            total += int(fields[11]) + int(fields[12])
    return total / TICKS


TABLE_STATS = ("SELECT relname, seq_scan, coalesce(idx_scan, 0), n_tup_ins, n_tup_upd, "
               "n_tup_hot_upd FROM pg_stat_user_tables WHERE schemaname = %s")


def query(base: str, schema: str, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
    with psycopg.connect(base, autocommit=True, connect_timeout=10,
                         options=f"-c search_path={schema}") as conn:
        rows: list[Any] = conn.execute(sql, params).fetchall()
        return rows


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def fmt(value: float, digits: int = 3) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.{digits}g}"


def summary(samples: list[float]) -> str:
    return (f"{fmt(statistics.median(samples))} ({fmt(min(samples))}-{fmt(max(samples))})"
            if samples else "-")


# -- scale-out ----------------------------------------------------------------------------


async def enqueue(url: str, runs: int, steps: int, sleep_s: float) -> float:
    app, drain, _ = build(url, worker=False)
    async with app:
        started = time.perf_counter()
        await asyncio.gather(*(app.start(drain, steps, sleep_s, queue=QUEUE)
                               for _ in range(runs)))
        return time.perf_counter() - started


async def open_schema(url: str) -> None:
    app, _, _ = build(url, worker=False)
    async with app:  # creates the tables before the workers race to
        pass


def scale_once(base: str, n: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    total = args.runs * args.steps
    with fresh_schema(base, f"scale{n}") as schema:
        url = schema_url(base, schema)
        asyncio.run(open_schema(url))
        with workers(n, url, workdir, f"scale{n}-", concurrency=args.concurrency) as procs:
            cpu_before = [p.cpu_s() for p in procs]
            busy_before, pg_before = machine_busy_s(), postgres_cpu_s()
            enqueue_s = asyncio.run(enqueue(url, args.runs, args.steps, args.sleep))
            deadline = time.monotonic() + args.timeout
            while True:
                done = query(base, schema,
                             "SELECT count(*) FROM runs WHERE status = 'COMPLETED'")[0][0]
                if done >= args.runs:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"scale {n}: {done}/{args.runs} runs done after "
                                       f"{args.timeout} s")
                time.sleep(0.05)
            busy, pg_cpu = machine_busy_s() - busy_before, postgres_cpu_s() - pg_before
            cpu = [round(p.cpu_s() - b, 3) for p, b in zip(procs, cpu_before, strict=True)]
            ids = {p.worker_id: f"w{i}" for i, p in enumerate(procs)}
        time.sleep(0.5)  # the workers' server backends flush their table counters at exit
        tables = {r[0]: r[1:] for r in query(base, schema, TABLE_STATS, (schema,))}
        first, last, created_lo, created_hi = query(
            base, schema, "SELECT min(started_at), max(completed_at), min(created_at), "
            "max(created_at) FROM runs")[0]
        waits = [r[0] for r in query(base, schema, "SELECT started_at - created_at FROM runs")]
        owners = dict(query(base, schema, "SELECT owner, count(*) FROM runs GROUP BY owner"))
        steps = query(base, schema, "SELECT count(*) FROM steps")[0][0]
    wall = last - first
    return {
        "workers": n,
        "steps_per_s": round(total / wall, 1),
        "wall_s": round(wall, 3),
        "enqueue_s": round(enqueue_s, 3),
        "enqueue_span_s": round(created_hi - created_lo, 3),
        "queue_wait_p50_ms": round(statistics.median(waits) * 1000, 1),
        "queue_wait_max_ms": round(max(waits) * 1000, 1),
        "runs_per_worker": sorted((owners.get(w, 0) for w in ids), reverse=True),
        "worker_cpu_s": cpu,
        "worker_cpu_ms_per_step": round(sum(cpu) * 1000 / total, 3),
        "postgres_cpu_ms_per_step": round(pg_cpu * 1000 / total, 3),
        "machine_busy_cpus": round(busy / wall, 2),
        "journal_rows": steps,
        # Per step, from pg_stat_user_tables: rows written, and index scans of runs (a
        # fence check, a claim, a read of a run each scan it).
        "runs_idx_scans_per_step": round(tables["runs"][1] / total, 2),
        "runs_updates_per_step": round(tables["runs"][3] / total, 3),
        "steps_inserts_per_step": round(tables["steps"][2] / total, 3),
    }


def run_scale(base: str, args: argparse.Namespace, workdir: Path) -> list[dict[str, Any]]:
    counts = [int(n) for n in args.workers.split(",")]
    results: list[dict[str, Any]] = []
    for rep in range(args.repeats):
        for n in counts:  # interleaved: drift in the machine's load hits every N alike
            print(f"scale: {n} worker(s), repetition {rep + 1}", file=sys.stderr, flush=True)
            result = scale_once(base, n, args, workdir)
            print(f"  {json.dumps(result)}", file=sys.stderr, flush=True)
            results.append(result)
    print(f"\nSCALE-OUT: {args.runs} runs x {args.steps} steps of asyncio.sleep({args.sleep}), "
          f"worker concurrency {args.concurrency or 'unlimited'}; steps/s from the runs table")
    print(f"  {'workers':<9}{'steps/s median (min-max)':<28}{'vs 1 worker':<13}"
          f"{'wall s':<20}{'worker CPU ms/step':<22}{'PG CPU ms/step':<22}"
          f"{'busy CPUs':<18}runs per worker (each repetition)")
    base_median = None
    for n in counts:
        rows = [r for r in results if r["workers"] == n]
        rates = [r["steps_per_s"] for r in rows]
        median = statistics.median(rates)
        base_median = base_median or median
        print(f"  {n:<9}{summary(rates):<28}{median / base_median:<13.2f}"
              f"{summary([r['wall_s'] for r in rows]):<20}"
              f"{summary([r['worker_cpu_ms_per_step'] for r in rows]):<22}"
              f"{summary([r['postgres_cpu_ms_per_step'] for r in rows]):<22}"
              f"{summary([r['machine_busy_cpus'] for r in rows]):<18}"
              f"{' | '.join(str(r['runs_per_worker']) for r in rows)}")
    return results


# -- enqueue-to-start latency ---------------------------------------------------------


async def ping_loop(url: str, samples: int, warmup: int, gap_s: float
                    ) -> list[tuple[str, float, float, float]]:
    app, _, ping = build(url, worker=False)
    rows: list[tuple[str, float, float, float]] = []
    async with app:
        for i in range(warmup + samples):
            before = time.time()
            handle = await app.start(ping, queue=QUEUE)
            returned = time.time()
            stamp = float(await handle.result(timeout=30))
            if i >= warmup:
                rows.append((handle.run_id, before, returned, stamp))
            await asyncio.sleep(gap_s)
    return rows


def latency_once(base: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    with fresh_schema(base, "latency") as schema:
        url = schema_url(base, schema)
        asyncio.run(open_schema(url))
        with workers(1, url, workdir, "latency-"):
            rows = asyncio.run(ping_loop(url, args.samples, 5, args.gap))
        stored = dict((r[0], r[1:]) for r in query(
            base, schema, "SELECT run_id, created_at, started_at FROM runs"))
    first_step = [(stamp - before) * 1000 for _, before, _, stamp in rows]
    start_call = [(returned - before) * 1000 for _, before, returned, _ in rows]
    claimed = [(stored[run_id][1] - stored[run_id][0]) * 1000 for run_id, *_ in rows]
    return {"samples": len(rows),
            "first_step_ms": [round(v, 3) for v in first_step],
            "start_call_ms": [round(v, 3) for v in start_call],
            "claim_ms": [round(v, 3) for v in claimed]}


def run_latency(base: str, args: argparse.Namespace, workdir: Path) -> list[dict[str, Any]]:
    results = []
    for rep in range(args.repeats):
        print(f"latency: repetition {rep + 1}", file=sys.stderr, flush=True)
        results.append(latency_once(base, args, workdir))
    print(f"\nENQUEUE-TO-START: one idle worker, {args.samples} runs started one at a time "
          "(ms)")
    print(f"  {'repetition':<12}{'measure':<44}{'p50':>8}{'p90':>8}{'min':>8}{'max':>8}")
    labels = {"first_step_ms": "first step body - before app.start()",
              "claim_ms": "runs.started_at - runs.created_at",
              "start_call_ms": "app.start() call (the client's insert)"}
    for i, result in enumerate(results, 1):
        for key, label in labels.items():
            values = result[key]
            print(f"  {i:<12}{label:<44}{pct(values, 0.5):>8.2f}{pct(values, 0.9):>8.2f}"
                  f"{min(values):>8.2f}{max(values):>8.2f}")
    return results


# -- kill-to-resume -------------------------------------------------------------------


def read_log(path: Path) -> list[tuple[int, str, int, float]]:
    try:
        text = path.read_text()
    except OSError:
        return []
    rows = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 4:
            rows.append((int(parts[0]), parts[1], int(parts[2]), float(parts[3])))
    return rows


async def start_victims(url: str, runs: int, steps: int) -> list[str]:
    app, drain, _ = build(url, worker=False)
    async with app:
        handles = [await app.start(drain, steps, 0.1, queue=QUEUE) for _ in range(runs)]
    return [h.run_id for h in handles]


def kill_once(base: str, ttl: float, args: argparse.Namespace, workdir: Path
              ) -> dict[str, Any]:
    step_log = workdir / f"kill-{ttl}-{time.time_ns()}.log"
    with fresh_schema(base, "kill") as schema:
        url = schema_url(base, schema)
        asyncio.run(open_schema(url))
        options = {"lease_ttl_s": ttl, "claim_interval_s": args.claim_interval,
                   "step_log": step_log}
        with workers(1, url, workdir, "victim-", **options) as (victim,):
            run_ids = asyncio.run(start_victims(url, args.kill_runs, args.kill_steps))
            deadline = time.monotonic() + 30
            while {r[1] for r in read_log(step_log) if r[0] == victim.pid} != set(run_ids):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the victim did not start every run:\n{victim.text()}")
                time.sleep(0.02)
            with workers(1, url, workdir, "survivor-", **options) as (survivor,):
                # A random point of the heartbeat's cycle (it renews every ttl/3).
                time.sleep(0.3 + random.uniform(0, ttl / 3))
                held = query(base, schema, "SELECT min(lease_until), max(lease_until), "
                             "count(*) FROM runs WHERE owner = %s", (victim.worker_id,))[0]
                killed_at = time.time()
                victim.kill()
                deadline = time.monotonic() + ttl + args.claim_interval + 20
                while True:
                    rows = read_log(step_log)
                    resumed = {r[1]: r[3] for r in reversed(rows) if r[0] == survivor.pid}
                    if set(run_ids) <= resumed.keys():
                        break
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"runs not resumed: {resumed}\n{survivor.text()}")
                    time.sleep(0.02)
                time.sleep(0.2)
        rows = read_log(step_log)
        journaled = query(base, schema, "SELECT min(started_at) FROM steps WHERE worker = %s",
                          (survivor.worker_id,))[0][0]
    twice = 0
    for run_id in run_ids:
        by_victim = {r[2] for r in rows if r[1] == run_id and r[0] == victim.pid}
        by_survivor = {r[2] for r in rows if r[1] == run_id and r[0] == survivor.pid}
        twice += len(by_victim & by_survivor)
    first = min(resumed.values())
    return {
        "lease_ttl_s": ttl,
        "kill_to_first_resumed_step_s": round(first - killed_at, 3),
        "kill_to_all_resumed_s": round(max(resumed.values()) - killed_at, 3),
        "lease_left_at_kill_s": round(held[1] - killed_at, 3) if held[1] else None,
        "lease_expiry_to_first_step_s": round(first - held[1], 3) if held[1] else None,
        "runs_held_by_victim": held[2],
        "steps_run_twice": twice,
        "survivor_journal_first_step_s": round(journaled - killed_at, 3) if journaled else None,
    }


def run_kill(base: str, args: argparse.Namespace, workdir: Path) -> list[dict[str, Any]]:
    ttls = [float(t) for t in args.lease_ttls.split(",")]
    results = []
    for rep in range(args.kill_repeats):
        for ttl in ttls:
            print(f"kill: lease_ttl_s={ttl:g}, repetition {rep + 1}", file=sys.stderr,
                  flush=True)
            result = kill_once(base, ttl, args, workdir)
            print(f"  {json.dumps(result)}", file=sys.stderr, flush=True)
            results.append(result)
    print(f"\nKILL-TO-RESUME: two workers, {args.kill_runs} runs on the one SIGKILLed "
          f"mid-step; claim_interval_s={args.claim_interval:g} (s)")
    print(f"  {'lease_ttl_s':<13}{'kill -> first resumed step':<30}{'kill -> all resumed':<24}"
          f"{'lease left at kill':<24}{'expiry -> step':<20}steps run twice")
    for ttl in ttls:
        rows = [r for r in results if r["lease_ttl_s"] == ttl]
        print(f"  {ttl:<13g}{summary([r['kill_to_first_resumed_step_s'] for r in rows]):<30}"
              f"{summary([r['kill_to_all_resumed_s'] for r in rows]):<24}"
              f"{summary([r['lease_left_at_kill_s'] for r in rows]):<24}"
              f"{summary([r['lease_expiry_to_first_step_s'] for r in rows]):<20}"
              f"{[r['steps_run_twice'] for r in rows]}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pg-url", default=DEFAULT_PG)
    parser.add_argument("--only", default="scale,latency,kill",
                        help="comma-separated: scale, latency, kill")
    parser.add_argument("--repeats", type=int, default=2,
                        help="repetitions of scale and latency")
    parser.add_argument("--workers", default="1,2,4", help="scale: worker process counts")
    parser.add_argument("--runs", type=int, default=400)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--sleep", type=float, default=0.005)
    parser.add_argument("--concurrency", type=int, default=None,
                        help="scale: --concurrency of each worker (default: unlimited)")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--samples", type=int, default=200, help="latency: runs per repetition")
    parser.add_argument("--gap", type=float, default=0.02,
                        help="latency: seconds between a run's end and the next start")
    parser.add_argument("--lease-ttls", default="2,10")
    parser.add_argument("--kill-repeats", type=int, default=3)
    parser.add_argument("--kill-runs", type=int, default=5)
    parser.add_argument("--kill-steps", type=int, default=100)
    parser.add_argument("--claim-interval", type=float, default=1.0,
                        help="kill: claim_interval_s of both workers (Garrison's default 1)")
    args = parser.parse_args()
    only = {o for o in args.only.split(",") if o}
    unknown = only - {"scale", "latency", "kill"}
    if unknown:
        parser.error(f"--only: unknown {', '.join(sorted(unknown))}")
    import garrison

    with psycopg.connect(args.pg_url, connect_timeout=10) as conn:
        version = conn.execute("SHOW server_version").fetchone()
        sync = conn.execute("SHOW synchronous_commit").fetchone()
    print(f"garrison {garrison.__version__} ({Path(garrison.__file__).parent}); PostgreSQL "
          f"{version[0] if version else '?'} synchronous_commit={sync[0] if sync else '?'}; "
          f"{os.cpu_count()} CPUs; load {os.getloadavg()[0]:.2f}")
    record: dict[str, Any] = {"load_before": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="garrison-fleet-") as tmp:
        workdir = Path(tmp)
        if "scale" in only:
            record["scale"] = run_scale(args.pg_url, args, workdir)
        if "latency" in only:
            record["latency"] = run_latency(args.pg_url, args, workdir)
        if "kill" in only:
            record["kill"] = run_kill(args.pg_url, args, workdir)
    record["load_after"] = os.getloadavg()[0]
    print(json.dumps(record))


if __name__ == "__main__":
    main()
