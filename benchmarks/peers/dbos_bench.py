"""Garrison peer benchmark: DBOS Transact with its SQLite system database.

Run inside the dbos virtualenv:
    python dbos_bench.py --workload w1|w2|w3|w5 --workdir DIR
Prints one JSON line on stdout.

With ``--pg-url URL --pg-schema S`` W1 and W2 run on a PostgreSQL system database
instead, DBOS's tables in schema S (``dbos_system_schema``); the pool is DBOS's default.

Both workloads use async workflows of async ``@DBOS.step`` functions, called
directly under ``SetWorkflowID`` (W2: 200 such calls gathered on one event
loop); DBOS's synchronous API measured about 40% slower on W1. Every step is checkpointed
in a fresh SQLite file (DBOS defaults: rollback journal, synchronous=FULL).

W3 runs two child processes per repetition on one fresh SQLite file: the first
starts the 20-step workflow under ``SetWorkflowID("w3")`` and is SIGKILLed inside
step 10; the second only calls ``DBOS.launch()``, which recovers the pending
workflow by itself, and waits on ``DBOS.retrieve_workflow("w3").get_result()``
(polled every 50 ms instead of the default 1 s, so that completion is not rounded
up to DBOS's polling).
"""

from __future__ import annotations

import argparse
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
    W3_REPEATS,
    W3_SLEEP_S,
    W3_STEPS,
    W3_WORKFLOW_ID,
    W3Log,
    emit,
    measure_import,
    parse_args,
    peak_rss_mib,
    quiet_stdout,
    w3_repetition,
    w3_result,
)
from dbos import DBOS, DBOSConfig, SetWorkflowID, WorkflowHandle

PEER = "dbos"


@DBOS.step()
async def noop_step(index: int) -> int:
    return index


@DBOS.workflow()
async def sequential_workflow(steps: int) -> int:
    for index in range(steps):
        await noop_step(index)
    return steps


@DBOS.step()
async def sleep_step(index: int) -> int:
    await asyncio.sleep(W2_SLEEP_S)
    return index


@DBOS.workflow()
async def sleepy_workflow(steps: int) -> int:
    for index in range(steps):
        await sleep_step(index)
    return steps


@DBOS.step()
async def logged_step(index: int) -> int:
    W3Log.mark(index)
    await asyncio.sleep(W3_SLEEP_S)
    return index


@DBOS.workflow()
async def crash_workflow(steps: int) -> int:
    return sum([await logged_step(index) for index in range(steps)])


def launch(db_path: pathlib.Path) -> None:
    config: DBOSConfig = {
        "name": "garrison-peer-bench",
        "system_database_url": f"sqlite:///{db_path}",
        "log_level": "WARNING",
    }
    DBOS(config=config)
    DBOS.launch()


def launch_postgres(url: str, schema: str) -> None:
    """DBOS on a PostgreSQL system database, its tables in `schema` (DBOS creates it)."""
    config: DBOSConfig = {
        "name": "garrison-peer-bench",
        "system_database_url": url,
        "dbos_system_schema": schema,
        "log_level": "WARNING",
    }
    DBOS(config=config)
    DBOS.launch()


async def run_w1_repeats() -> list[float]:
    samples = []
    for _ in range(W1_REPEATS):
        started = time.perf_counter()
        with SetWorkflowID(f"w1-{uuid.uuid4().hex}"):
            await sequential_workflow(W1_STEPS)
        samples.append(round((time.perf_counter() - started) * 1000 / W1_STEPS, 4))
    return samples


def run_w1() -> dict[str, Any]:
    return {"unit": "ms/step", "samples": asyncio.run(run_w1_repeats())}


async def run_one_sleepy() -> None:
    with SetWorkflowID(f"w2-{uuid.uuid4().hex}"):
        await sleepy_workflow(W2_STEPS)


async def run_w2_repeats() -> list[float]:
    samples = []
    for _ in range(W2_REPEATS):
        started = time.perf_counter()
        await asyncio.gather(*(run_one_sleepy() for _ in range(W2_WORKFLOWS)))
        samples.append(round(W2_WORKFLOWS * W2_STEPS / (time.perf_counter() - started), 1))
    return samples


def run_w2() -> dict[str, Any]:
    samples = asyncio.run(run_w2_repeats())
    return {"unit": "steps/s", "samples": samples, "peak_rss_mib": round(peak_rss_mib(), 1)}


async def start_w3() -> None:
    with SetWorkflowID(W3_WORKFLOW_ID):
        await crash_workflow(W3_STEPS)


def w3_child(spec: dict[str, Any]) -> None:
    """A W3 child: "first" starts the workflow (and dies in step 10); "resume" only
    launches DBOS, whose launch recovers the pending workflow, and waits for it."""
    W3Log.open(spec["log"], kill=spec["role"] == "first")
    launch(pathlib.Path(spec["db"]))
    try:
        if spec["role"] == "first":
            asyncio.run(start_w3())
            raise RuntimeError("the W3 workflow finished without being killed")
        handle: WorkflowHandle[int] = DBOS.retrieve_workflow(W3_WORKFLOW_ID)
        result = handle.get_result(polling_interval_sec=0.05)
        if result != sum(range(W3_STEPS)):
            raise RuntimeError(f"W3 workflow returned {result!r}")
    finally:
        DBOS.destroy()


def run_w3(args: argparse.Namespace) -> dict[str, Any]:
    samples, complete_s, twice = [], [], []
    for rep in range(W3_REPEATS):
        spec = {"db": str(args.workdir / f"dbos-w3-{rep}.sqlite")}
        first_step, complete, repeated = w3_repetition(args, rep, spec)
        samples.append(first_step)
        complete_s.append(complete)
        twice.append(repeated)
    return w3_result(samples, complete_s, twice, "automatic (on DBOS.launch)")


def main() -> None:
    args = parse_args(__doc__)
    quiet_stdout()
    if args.w3_child is not None:
        w3_child(args.w3_child)
        return
    version = importlib.metadata.version(PEER)
    if args.workload == "w5":
        emit(PEER, version, "w5", measure_import("import dbos"))
        return
    if args.workload == "w3":
        emit(PEER, version, "w3", run_w3(args))
        return
    if args.pg_url is not None:
        launch_postgres(args.pg_url, args.pg_schema)
    else:
        launch(args.workdir / f"dbos-{uuid.uuid4().hex}.sqlite")
    try:
        result = run_w1() if args.workload == "w1" else run_w2()
    finally:
        DBOS.destroy()
    result["store"] = "postgres" if args.pg_url is not None else "sqlite"
    emit(PEER, version, args.workload, result)


if __name__ == "__main__":
    main()
