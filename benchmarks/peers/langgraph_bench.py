"""Garrison peer benchmark: LangGraph functional API with a SQLite checkpointer.

Run inside the langgraph virtualenv:
    python langgraph_bench.py --workload w1|w2|w5 --workdir DIR
Prints one JSON line on stdout.

A Garrison step maps to a LangGraph ``@task`` (the functional API's durable,
memoised unit of work) and a workflow to an ``@entrypoint`` run on its own
``thread_id``. Runs use ``AsyncSqliteSaver`` (a fresh SQLite file, WAL) and
``durability="sync"``. Note that LangGraph saves each task's result through
``aput_writes`` submitted in the background, so a step's write may overlap
the next step; ``"sync"`` only awaits the checkpoint at the end of each
superstep, and the whole entrypoint is one superstep.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
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
    emit,
    measure_import,
    parse_args,
    peak_rss_mib,
    quiet_stdout,
)
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
from langgraph.func import entrypoint, task
from langgraph.pregel import Pregel

PEER = "langgraph"
IMPORT_STATEMENT = "import langgraph.func, langgraph.checkpoint.sqlite.aio"
Workflow = Pregel[Any, Any, Any, Any]


@task
async def noop_step(index: int) -> int:
    return index


@task
async def sleep_step(index: int) -> int:
    await asyncio.sleep(W2_SLEEP_S)
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


async def run_durable(workload: str, workdir: pathlib.Path) -> dict[str, Any]:
    db_path = workdir / f"langgraph-{uuid.uuid4().hex}.sqlite"
    async with AsyncSqliteSaver.from_conn_string(str(db_path)) as saver:
        await saver.setup()
        sequential_workflow, sleepy_workflow = build_workflows(saver)
        if workload == "w1":
            return await run_w1(sequential_workflow)
        return await run_w2(sleepy_workflow)


def main() -> None:
    args = parse_args(__doc__)
    quiet_stdout()
    version = importlib.metadata.version(PEER)
    if args.workload == "w5":
        result = measure_import(IMPORT_STATEMENT)
    else:
        result = asyncio.run(run_durable(args.workload, args.workdir))
    emit(PEER, version, args.workload, result)


if __name__ == "__main__":
    main()
