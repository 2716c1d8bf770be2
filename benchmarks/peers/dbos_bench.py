"""Garrison peer benchmark: DBOS Transact with its SQLite system database.

Run inside the dbos virtualenv:
    python dbos_bench.py --workload w1|w2|w5 --workdir DIR
Prints one JSON line on stdout.

Both workloads use async workflows of async ``@DBOS.step`` functions, called
directly under ``SetWorkflowID`` (W2: 200 such calls gathered on one event
loop); DBOS's synchronous API measured about 40% slower on W1. Every step is checkpointed
in a fresh SQLite file (DBOS defaults: rollback journal, synchronous=FULL).
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
from dbos import DBOS, DBOSConfig, SetWorkflowID

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


def launch(workdir: pathlib.Path) -> None:
    db_path = workdir / f"dbos-{uuid.uuid4().hex}.sqlite"
    config: DBOSConfig = {
        "name": "garrison-peer-bench",
        "system_database_url": f"sqlite:///{db_path}",
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


def main() -> None:
    args = parse_args(__doc__)
    quiet_stdout()
    version = importlib.metadata.version(PEER)
    if args.workload == "w5":
        emit(PEER, version, "w5", measure_import("import dbos"))
        return
    launch(args.workdir)
    try:
        result = run_w1() if args.workload == "w1" else run_w2()
    finally:
        DBOS.destroy()
    emit(PEER, version, args.workload, result)


if __name__ == "__main__":
    main()
