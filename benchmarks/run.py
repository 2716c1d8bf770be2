"""Garrison's benchmarks side by side with peers, measured in one invocation.

    python benchmarks/run.py                       # Garrison + baselines
    python benchmarks/run.py --peers dbos,langgraph
    python benchmarks/run.py --workloads w1,w2

Each engine runs in its own process (peers in virtualenvs this script creates under
benchmarks/.venvs). Prints, per workload, the median and min-max of each engine and its
ratio to Garrison. Absolute times on a shared 2-core VM swing by ±30 %: compare within
one run. Workloads (see docs/benchmarks.md): W1 500 sequential no-op steps (ms/step);
W2 200 workflows x 10 steps of asyncio.sleep(5 ms) (steps/s, RSS); W3 SIGKILL at step 10
of 20 then restart (s to first resumed step); W5 import time; W6 10,000 parked runs.
"""

from __future__ import annotations

import argparse
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

from benchmarks.peers import PEERS, PeerError, run_peer  # noqa: E402

GARRISON_WORKLOADS = ("w1", "w2", "w3", "w5", "w6")
BASELINES = {"w1": "commit", "w2": "asyncio"}
HIGHER_IS_BETTER = {"w2"}
UNMEASURED_PEERS: dict[str, str] = {}


def garrison(workload: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"garrison-{workload}-") as workdir:
        done = subprocess.run(
            [sys.executable, str(HERE / "garrison_bench.py"), "--workload", workload,
             "--workdir", workdir],
            capture_output=True, text=True, timeout=900, check=False,
        )
    if done.returncode != 0:
        raise RuntimeError(f"garrison {workload} failed:\n{done.stderr[-3000:]}")
    record: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return record


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


def print_table(workload: str, rows: list[dict[str, Any]]) -> None:
    mine = next((r for r in rows if r["peer"] == "garrison"), None)
    unit = mine["unit"] if mine else rows[0]["unit"]
    print(f"\n{workload.upper()} ({unit})")
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
    parser.add_argument("--workloads", default=",".join(GARRISON_WORKLOADS))
    args = parser.parse_args()
    peers = [p for p in args.peers.split(",") if p]
    workloads = [w for w in args.workloads.split(",") if w]
    print(f"machine: {machine()}")
    for peer in peers:
        if peer in UNMEASURED_PEERS:
            print(f"peer {peer}: not measured, {UNMEASURED_PEERS[peer]}", file=sys.stderr)
        elif peer not in PEERS:
            parser.error(f"unknown peer {peer!r}; known: {', '.join([*PEERS, *UNMEASURED_PEERS])}")
    for workload in workloads:
        print(f"running {workload} ...", file=sys.stderr, flush=True)
        rows = [garrison(workload)]
        if workload in BASELINES:
            baseline = garrison(BASELINES[workload])
            baseline["peer"] = {"commit": "raw-commit", "asyncio": "asyncio"}[BASELINES[workload]]
            baseline["version"] = "-"
            rows.append(baseline)
        for peer in peers:
            if peer in PEERS and workload in ("w1", "w2", "w3", "w5"):
                try:
                    rows.append(run_peer(peer, workload))
                except PeerError as exc:
                    print(f"peer {peer} {workload} failed: {exc}", file=sys.stderr)
        print_table(workload, rows)


if __name__ == "__main__":
    main()
