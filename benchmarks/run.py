"""Garrison's benchmarks side by side with peers, measured in one invocation.

    python benchmarks/run.py                       # Garrison + baselines
    python benchmarks/run.py --peers dbos,langgraph
    python benchmarks/run.py --workloads w1,w2
    python benchmarks/run.py --store postgres --peers dbos,langgraph   # W1/W2 on PostgreSQL

Each engine runs in its own process (peers in virtualenvs this script creates under
benchmarks/.venvs). Prints, per workload, the median and min-max of each engine and its
ratio to Garrison. Absolute times on a shared 2-core VM swing by ±30 %: compare within
one run. Workloads (see docs/benchmarks.md): W1 500 sequential no-op steps (ms/step);
W2 200 workflows x 10 steps of asyncio.sleep(5 ms) (steps/s, RSS); W3 SIGKILL at step 10
of 20 then restart (s to first resumed step); W5 import time; W6 10,000 parked runs.

With --store postgres (W1 and W2 only) every engine runs on the PostgreSQL server of
--pg-url, each measurement in a fresh schema dropped afterwards; next to W1 the raw
baseline is one autocommit INSERT per commit on that server (benchmarks/pg.py). The last
line printed is JSON: every row of every table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.peers import PEERS, POSTGRES_PEERS, PeerError, run_peer  # noqa: E402
from benchmarks.pg import DEFAULT_PG, fresh_schema, schema_url  # noqa: E402

GARRISON_WORKLOADS = ("w1", "w2", "w3", "w5", "w6")
BASELINES = {"w1": "commit", "w2": "asyncio"}
HIGHER_IS_BETTER = {"w2"}
UNMEASURED_PEERS: dict[str, str] = {}


POSTGRES_WORKLOADS = ("w1", "w2")


def garrison(workload: str, pg_url: str | None = None) -> dict[str, Any]:
    """Garrison's `workload` in a fresh process; on PostgreSQL (`pg_url`) in a fresh
    schema, dropped afterwards."""
    env = dict(os.environ)
    env.pop("GARRISON_BENCH_URL", None)
    with contextlib.ExitStack() as stack:
        workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix=f"garrison-{workload}-"))
        if pg_url is not None:
            schema = stack.enter_context(fresh_schema(pg_url, f"garrison_{workload}"))
            env["GARRISON_BENCH_URL"] = schema_url(pg_url, schema)
        done = subprocess.run(
            [sys.executable, str(HERE / "garrison_bench.py"), "--workload", workload,
             "--workdir", workdir],
            capture_output=True, text=True, timeout=900, check=False, env=env,
        )
    if done.returncode != 0:
        raise RuntimeError(f"garrison {workload} failed:\n{done.stderr[-3000:]}")
    record: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    if pg_url is not None and workload in POSTGRES_WORKLOADS:
        record["store"] = "postgres"
    return record


def peer_record(name: str, workload: str, pg_url: str | None) -> dict[str, Any]:
    if pg_url is None:
        return run_peer(name, workload)
    with fresh_schema(pg_url, f"{name}_{workload}", create=True) as schema:
        return run_peer(name, workload, postgres=(pg_url, schema))


def number(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def summary(samples: list[float]) -> str:
    return f"{number(statistics.median(samples))} ({number(min(samples))}-{number(max(samples))})"


def ratio(workload: str, mine: float, theirs: float) -> str:
    if workload in HIGHER_IS_BETTER:
        return f"{mine / theirs:,.1f}x" if theirs else "-"
    return f"{theirs / mine:,.1f}x" if mine else "-"


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, "
            f"SQLite {sqlite3.sqlite_version}, {platform.system()} {platform.release()}")


def postgres_version(url: str) -> str:
    import psycopg

    with psycopg.connect(url, connect_timeout=10) as conn:
        row = conn.execute("SHOW server_version").fetchone()
        sync = conn.execute("SHOW synchronous_commit").fetchone()
    return f"{row[0] if row else '?'} (synchronous_commit={sync[0] if sync else '?'})"


def print_table(workload: str, rows: list[dict[str, Any]], store: str = "") -> None:
    mine = next((r for r in rows if r["peer"] == "garrison"), None)
    unit = mine["unit"] if mine else rows[0]["unit"]
    store = f", on {store}" if store else ""
    print(f"\n{workload.upper()} ({unit}){store}")
    print(f"  {'engine':<12}{'version':<10}{'median (min-max)':<28}{'Garrison is':<14}extra")
    for row in rows:
        median = statistics.median(row["samples"])
        better = ""
        if mine is not None and row is not mine and row.get("unit") == mine["unit"]:
            better = ratio(workload, statistics.median(mine["samples"]), median)
        extra = {k: v for k, v in row.items()
                 if k not in {"peer", "version", "workload", "unit", "samples", "import"}}
        print(f"  {row['peer']:<12}{row['version']:<10}{summary(row['samples']):<28}"
              f"{better:<14}{json.dumps(extra) if extra else ''}")
    base = next((r for r in rows if r["peer"] in ("raw-commit", "asyncio")), None)
    if mine is not None and base is not None:
        share = statistics.median(mine["samples"]) / statistics.median(base["samples"])
        print(f"  Garrison / {base['peer']} (same run): {share:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", default="", help="comma-separated: dbos,langgraph")
    parser.add_argument("--workloads", default=None,
                        help=f"comma-separated (default: {','.join(GARRISON_WORKLOADS)}; "
                             f"with --store postgres: {','.join(POSTGRES_WORKLOADS)})")
    parser.add_argument("--store", choices=("sqlite", "postgres"), default="sqlite",
                        help="sqlite (embedded, default) or postgres (W1 and W2)")
    parser.add_argument("--pg-url", default=DEFAULT_PG,
                        help="with --store postgres: the database (a schema per measurement "
                             "is created in it and dropped)")
    args = parser.parse_args()
    pg_url = args.pg_url if args.store == "postgres" else None
    peers = [p for p in args.peers.split(",") if p]
    default = POSTGRES_WORKLOADS if pg_url else GARRISON_WORKLOADS
    workloads = [w for w in (args.workloads or ",".join(default)).split(",") if w]
    if pg_url is not None:
        wrong = [w for w in workloads if w not in POSTGRES_WORKLOADS]
        if wrong:
            parser.error(f"--store postgres runs {', '.join(POSTGRES_WORKLOADS)} only, "
                         f"not {', '.join(wrong)}")
        wrong = [p for p in peers if p not in POSTGRES_PEERS]
        if wrong:
            parser.error(f"--store postgres: {', '.join(wrong)} not supported (peers on "
                         f"PostgreSQL: {', '.join(POSTGRES_PEERS)})")
    print(f"machine: {machine()}")
    if pg_url is not None:
        print(f"store: PostgreSQL {postgres_version(pg_url)} at {pg_url} "
              "(a fresh schema per measurement)")
    tables: dict[str, list[dict[str, Any]]] = {}
    for peer in peers:
        if peer in UNMEASURED_PEERS:
            print(f"peer {peer}: not measured, {UNMEASURED_PEERS[peer]}", file=sys.stderr)
        elif peer not in PEERS:
            parser.error(f"unknown peer {peer!r}; known: {', '.join([*PEERS, *UNMEASURED_PEERS])}")
    for workload in workloads:
        print(f"running {workload} ...", file=sys.stderr, flush=True)
        rows = [garrison(workload, pg_url)]
        if workload in BASELINES:
            baseline = garrison(BASELINES[workload], pg_url)
            baseline["peer"] = {"commit": "raw-commit", "asyncio": "asyncio"}[BASELINES[workload]]
            baseline["version"] = "-"
            rows.append(baseline)
        for name in peers:
            if name in PEERS and workload in ("w1", "w2", "w3", "w5"):
                try:
                    rows.append(peer_record(name, workload, pg_url))
                except PeerError as exc:
                    print(f"peer {name} {workload} failed: {exc}", file=sys.stderr)
        print_table(workload, rows, "PostgreSQL" if pg_url else "")
        tables[workload] = rows
    print(json.dumps({"store": args.store, "machine": machine(), "tables": tables}))


if __name__ == "__main__":
    main()
