"""Where a step's time goes on the PostgreSQL store: round trips and statements per step.

    python benchmarks/pg_trace.py [--pg-url postgresql://postgres@127.0.0.1:5432/test]
        [--steps 500] [--workflows 1] [--sleep 0]

Runs W1's shape (one workflow of `--steps` sequential no-op steps; with `--workflows N`,
N such workflows at once, and with `--sleep S` each step sleeps S: `--steps 10
--workflows 200 --sleep 0.005` is W2's shape) on a fresh schema (dropped afterwards)
with psycopg wrapped: every operation psycopg waits on (a statement, BEGIN, COMMIT,
SAVEPOINT, a pipeline sync: each a round trip to the server, but for a pipeline's
entry) is counted and timed, and every statement is recorded by its first words.
Prints per step: those waits, statements by kind, time spent waiting for the server,
CPU of this process, and the group-commit counters (transactions, writes). The wrapping
costs a little CPU, so ms/step here is a bit above run.py's. PG_TRACE_OFF=1: unwrapped.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import re
import secrets
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import psycopg  # noqa: E402
from psycopg import AsyncConnection, AsyncCursor  # noqa: E402

from benchmarks.pg import DEFAULT_PG, drop_schema, schema_url  # noqa: E402

WAITS: collections.Counter[str] = collections.Counter()
WAIT_S: collections.Counter[str] = collections.Counter()
STATEMENTS: collections.Counter[str] = collections.Counter()
_original_wait = AsyncConnection.wait
_original_execute = AsyncCursor.execute
_original_executemany = AsyncCursor.executemany


def _kind(sql: Any) -> str:
    text = sql if isinstance(sql, str) else str(getattr(sql, "_obj", sql))
    text = " ".join(text.split())
    match = re.match(r"(SELECT pg_notify|SELECT \w+ FROM runs WHERE run_id = %s FOR UPDATE|"
                     r"SELECT \S+|INSERT INTO \w+|UPDATE \w+ SET \w+|DELETE FROM \w+|\w+)", text)
    return match.group(1) if match else text[:40]


async def _wait(self: AsyncConnection[Any], gen: Any, *args: Any, **kwargs: Any) -> Any:
    name = getattr(getattr(gen, "gi_code", None), "co_name", type(gen).__name__)
    started = time.perf_counter()
    try:
        return await _original_wait(self, gen, *args, **kwargs)
    finally:
        if name != "notifies":  # the LISTEN connection waiting for notifications
            WAITS[name] += 1
            WAIT_S[name] += time.perf_counter() - started


async def _execute(self: AsyncCursor[Any], query: Any, *args: Any, **kwargs: Any) -> Any:
    STATEMENTS[_kind(query)] += 1
    return await _original_execute(self, query, *args, **kwargs)


async def _executemany(self: AsyncCursor[Any], query: Any, params_seq: Any,
                       *args: Any, **kwargs: Any) -> Any:
    rows = list(params_seq)
    STATEMENTS[f"executemany {_kind(query)} ({len(rows)} rows)"] += 1
    return await _original_executemany(self, query, rows, *args, **kwargs)


def _patch() -> None:
    AsyncConnection.wait = _wait  # type: ignore[method-assign]
    AsyncCursor.execute = _execute  # type: ignore[method-assign,assignment]
    AsyncCursor.executemany = _executemany  # type: ignore[method-assign]


WAL_STATS = ("SELECT pg_current_wal_lsn(), wal_records, wal_fpi, wal_sync "
             "FROM pg_stat_wal")


def wal(base: str) -> tuple[Any, ...]:
    with psycopg.connect(base, autocommit=True) as conn:
        row = conn.execute(WAL_STATS).fetchone()
        assert row is not None
        return tuple(row)


def wal_delta(base: str, before: tuple[Any, ...], total: int) -> dict[str, float]:
    """WAL written per step, server-wide (other sessions' writes count too)."""
    after = wal(base)
    with psycopg.connect(base, autocommit=True) as conn:
        row = conn.execute("SELECT pg_wal_lsn_diff(%s, %s)", (after[0], before[0])).fetchone()
        assert row is not None
    return {"wal_bytes_per_step": round(float(row[0]) / total, 1),
            "wal_records_per_step": round((after[1] - before[1]) / total, 2),
            "wal_full_page_images_per_step": round((after[2] - before[2]) / total, 3),
            "wal_syncs_per_step": round((after[3] - before[3]) / total, 3)}


async def trace(url: str, steps: int, workflows: int, sleep_s: float,
                base: str) -> dict[str, Any]:
    from garrison import Context, Garrison

    app = Garrison(url)

    @app.step(name="noop")
    async def noop(i: int) -> int:
        if sleep_s:
            await asyncio.sleep(sleep_s)
        return i

    @app.workflow(name="trace")
    async def flow(ctx: Context, n: int) -> int:
        for i in range(n):
            await noop(i)
        return n

    async with app:
        await (await app.start(flow, 5)).result()  # warm-up: pool connections, plans
        WAITS.clear()
        WAIT_S.clear()
        STATEMENTS.clear()
        before = dict(app.store.stats)  # type: ignore[attr-defined]
        wal_before = await asyncio.to_thread(wal, base)
        started = time.perf_counter()
        cpu = time.process_time()
        handles = await asyncio.gather(*(app.start(flow, steps) for _ in range(workflows)))
        await asyncio.gather(*(h.result() for h in handles))
        elapsed = time.perf_counter() - started
        after = dict(app.store.stats)  # type: ignore[attr-defined]
    await asyncio.sleep(0.5)  # closed backends flush their WAL counters as they exit
    written = await asyncio.to_thread(wal_delta, base, wal_before, steps * workflows)
    total = steps * workflows
    return {
        "steps": total,
        "ms_per_step": round(elapsed * 1000 / total, 4),
        "round_trips_per_step": round(sum(WAITS.values()) / total, 2),
        "wait_ms_per_step": round(sum(WAIT_S.values()) * 1000 / total, 4),
        "round_trips_by_kind_per_step": {k: round(v / total, 3)
                                         for k, v in WAITS.most_common()},
        "wait_ms_by_kind_per_step": {k: round(v * 1000 / total, 4)
                                     for k, v in WAIT_S.most_common()},
        "statements_per_step": {k: round(v / total, 3) for k, v in STATEMENTS.most_common()},
        "transactions_per_step": round((after["batches"] - before["batches"]) / total, 3),
        "cpu_ms_per_step": round((time.process_time() - cpu) * 1000 / total, 4),
        "writes_per_step": round((after["writes"] - before["writes"]) / total, 3),
        **written,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pg-url", "--url", dest="url", default=DEFAULT_PG,
                        help="PostgreSQL database (libpq URL)")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--workflows", type=int, default=1,
                        help="workflows started at once (W2: 200)")
    parser.add_argument("--sleep", type=float, default=0.0,
                        help="asyncio.sleep in each step (W2: 0.005)")
    args = parser.parse_args()
    if not os.environ.get("PG_TRACE_OFF"):
        _patch()
    schema = f"bench_trace_{secrets.token_hex(4)}"
    try:
        result = asyncio.run(trace(schema_url(args.url, schema), args.steps, args.workflows,
                                   args.sleep, args.url))
    finally:
        drop_schema(args.url, schema)
    print(f"psycopg {psycopg.__version__}; {result['steps']} steps in "
          f"{args.workflows} workflow(s)")
    print(f"  ms/step (traced)        {result['ms_per_step']}  "
          f"(CPU of this process {result['cpu_ms_per_step']} ms/step)")
    print(f"  round trips/step        {result['round_trips_per_step']}  "
          f"(waiting {result['wait_ms_per_step']} ms/step)")
    for kind, count in result["round_trips_by_kind_per_step"].items():
        print(f"    {kind:<22}{count:>8}  {result['wait_ms_by_kind_per_step'][kind]} ms")
    print(f"  transactions/step       {result['transactions_per_step']}  "
          f"(writes/step {result['writes_per_step']})")
    print(f"  WAL/step (server-wide)  {result['wal_bytes_per_step']} bytes, "
          f"{result['wal_records_per_step']} records, "
          f"{result['wal_full_page_images_per_step']} full-page images, "
          f"{result['wal_syncs_per_step']} syncs")
    print("  statements/step")
    for kind, count in result["statements_per_step"].items():
        print(f"    {count:>7}  {kind}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
