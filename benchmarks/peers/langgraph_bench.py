"""Garrison peer benchmark: LangGraph functional API with a SQLite checkpointer.

Run inside the langgraph virtualenv:
    python langgraph_bench.py --workload w1|w2|w3|w5 --workdir DIR
Prints one JSON line on stdout.

A Garrison step maps to a LangGraph ``@task`` (the functional API's durable,
memoised unit of work) and a workflow to an ``@entrypoint`` run on its own
``thread_id``. Runs use ``AsyncSqliteSaver`` (a fresh SQLite file, WAL) and
``durability="sync"``. Note that LangGraph saves each task's result through
``aput_writes`` submitted in the background, so a step's write may overlap
the next step; ``"sync"`` only awaits the checkpoint at the end of each
superstep, and the whole entrypoint is one superstep.

With ``--pg-url URL --pg-schema S``, W1 and W2 use ``AsyncPostgresSaver`` (from
langgraph-checkpoint-postgres) on the one connection ``from_conn_string`` opens, its
tables in schema S (GARRISON_BENCH_LANGGRAPH_PG=pool: a pool of 10 connections instead).

W3 runs two child processes per repetition on one fresh SQLite file. The first
invokes the 20-task entrypoint on ``thread_id="w3"`` and is SIGKILLed inside task
10. LangGraph has no recovery of its own (nothing notices an interrupted thread),
so the second resumes it by hand, the documented way: ``ainvoke(None, config)``
on the same ``thread_id``, which re-runs the entrypoint from its last checkpoint
and replays the tasks whose writes were saved.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import os
import pathlib
import time
import uuid
from typing import Any

from _bench_common import (
    W1_REPEATS,
    W1_STEPS,
    W2_REPEATS,
    W2_SLEEP_S,
    W2_STEPS,
    W2_WORKFLOWS,
    W3_REPEATS,
    W3_SLEEP_S,
    W3_STEPS,
    W3_WORKFLOW_ID,
    W3Log,
    emit,
    measure_import,
    parse_args,
    peak_rss_mib,
    pg_search_path_url,
    quiet_stdout,
    w3_repetition,
    w3_result,
)
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
from langgraph.func import entrypoint, task
from langgraph.pregel import Pregel

PEER = "langgraph"
IMPORT_STATEMENT = "import langgraph.func, langgraph.checkpoint.sqlite.aio"
Workflow = Pregel[Any, Any, Any, Any]
PG_POOL_SIZE = 10  # Garrison's PostgreSQL store pools 10 connections by default


@task
async def noop_step(index: int) -> int:
    return index


@task
async def sleep_step(index: int) -> int:
    await asyncio.sleep(W2_SLEEP_S)
    return index


@task
async def logged_step(index: int) -> int:
    W3Log.mark(index)
    await asyncio.sleep(W3_SLEEP_S)
    return index


def build_workflows(saver: AsyncSqliteSaver) -> tuple[Workflow, Workflow]:
    @entrypoint(checkpointer=saver)
    async def sequential_workflow(steps: int) -> int:
        for index in range(steps):
            await noop_step(index)
        return steps

    @entrypoint(checkpointer=saver)
    async def sleepy_workflow(steps: int) -> int:
        for index in range(steps):
            await sleep_step(index)
        return steps

    return sequential_workflow, sleepy_workflow


async def run_workflow(workflow: Workflow, steps: int) -> None:
    config: Any = {"configurable": {"thread_id": uuid.uuid4().hex}}
    await workflow.ainvoke(steps, config, durability="sync")


async def run_w1(workflow: Workflow) -> dict[str, Any]:
    samples = []
    for _ in range(W1_REPEATS):
        started = time.perf_counter()
        await run_workflow(workflow, W1_STEPS)
        samples.append(round((time.perf_counter() - started) * 1000 / W1_STEPS, 4))
    return {"unit": "ms/step", "samples": samples}


async def run_w2(workflow: Workflow) -> dict[str, Any]:
    samples = []
    for _ in range(W2_REPEATS):
        started = time.perf_counter()
        await asyncio.gather(*(run_workflow(workflow, W2_STEPS) for _ in range(W2_WORKFLOWS)))
        samples.append(round(W2_WORKFLOWS * W2_STEPS / (time.perf_counter() - started), 1))
    return {"unit": "steps/s", "samples": samples, "peak_rss_mib": round(peak_rss_mib(), 1)}


async def run_workload(workload: str, saver: Any) -> dict[str, Any]:
    await saver.setup()
    sequential_workflow, sleepy_workflow = build_workflows(saver)
    if workload == "w1":
        return await run_w1(sequential_workflow)
    return await run_w2(sleepy_workflow)


async def run_durable(workload: str, workdir: pathlib.Path) -> dict[str, Any]:
    db_path = workdir / f"langgraph-{uuid.uuid4().hex}.sqlite"
    async with AsyncSqliteSaver.from_conn_string(str(db_path)) as saver:
        return await run_workload(workload, saver)


async def run_postgres(workload: str, url: str, schema: str) -> dict[str, Any]:
    """The same on ``AsyncPostgresSaver`` over the one connection ``from_conn_string``
    opens, its tables in ``schema``; with GARRISON_BENCH_LANGGRAPH_PG=pool, over a pool
    of PG_POOL_SIZE connections (the connection settings LangGraph documents), which
    measured slower here (W1 1.07-1.13 ms/step against 0.74; W2 551-632 steps/s against
    861)."""
    from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
    from psycopg.rows import dict_row
    from psycopg_pool import AsyncConnectionPool

    if os.environ.get("GARRISON_BENCH_LANGGRAPH_PG", "conn") == "conn":
        conn_url = pg_search_path_url(url, schema)
        async with AsyncPostgresSaver.from_conn_string(conn_url) as saver:
            result = await run_workload(workload, saver)
        result["connections"] = 1
        return result
    kwargs = {"autocommit": True, "prepare_threshold": 0, "row_factory": dict_row}
    async with AsyncConnectionPool(pg_search_path_url(url, schema), min_size=1,
                                   max_size=PG_POOL_SIZE, kwargs=kwargs, open=False) as pool:
        await pool.open(wait=True)
        result = await run_workload(workload, AsyncPostgresSaver(pool))  # type: ignore[arg-type]
        result["connections"] = PG_POOL_SIZE
        return result


async def w3_child_run(spec: dict[str, Any]) -> None:
    async with AsyncSqliteSaver.from_conn_string(spec["db"]) as saver:
        await saver.setup()

        @entrypoint(checkpointer=saver)
        async def crash_workflow(steps: int) -> int:
            return sum([await logged_step(index) for index in range(steps)])

        config: Any = {"configurable": {"thread_id": W3_WORKFLOW_ID}}
        if spec["role"] == "first":
            await crash_workflow.ainvoke(W3_STEPS, config, durability="sync")
            raise RuntimeError("the W3 workflow finished without being killed")
        result = await crash_workflow.ainvoke(None, config, durability="sync")
        if result != sum(range(W3_STEPS)):
            raise RuntimeError(f"W3 workflow returned {result!r}")


def w3_child(spec: dict[str, Any]) -> None:
    """A W3 child: "first" starts the thread (and dies in task 10); "resume" re-invokes
    the same thread_id with None, LangGraph's way to continue an interrupted run."""
    W3Log.open(spec["log"], kill=spec["role"] == "first")
    asyncio.run(w3_child_run(spec))


def run_w3(args: argparse.Namespace) -> dict[str, Any]:
    samples, complete_s, twice = [], [], []
    for rep in range(W3_REPEATS):
        spec = {"db": str(args.workdir / f"langgraph-w3-{rep}.sqlite")}
        first_step, complete, repeated = w3_repetition(args, rep, spec)
        samples.append(first_step)
        complete_s.append(complete)
        twice.append(repeated)
    recovery = "by hand: ainvoke(None) on the same thread_id"
    return w3_result(samples, complete_s, twice, recovery)


def main() -> None:
    args = parse_args(__doc__)
    quiet_stdout()
    if args.w3_child is not None:
        w3_child(args.w3_child)
        return
    version = importlib.metadata.version(PEER)
    if args.workload == "w5":
        result = measure_import(IMPORT_STATEMENT)
    elif args.workload == "w3":
        result = run_w3(args)
    elif args.pg_url is not None:
        result = asyncio.run(run_postgres(args.workload, args.pg_url, args.pg_schema))
        result["store"] = "postgres"
        result["checkpointer"] = "AsyncPostgresSaver " + importlib.metadata.version(
            "langgraph-checkpoint-postgres")
    else:
        result = asyncio.run(run_durable(args.workload, args.workdir))
        result["store"] = "sqlite"
    emit(PEER, version, args.workload, result)


if __name__ == "__main__":
    main()
