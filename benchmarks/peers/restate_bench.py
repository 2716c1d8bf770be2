"""Garrison peer benchmark: Restate (Python SDK) against a local restate-server.

Run inside the restate virtualenv:
    python restate_bench.py --workload w1|w2|w3|w5 --workdir DIR
Prints one JSON line on stdout.

The server is the binary shipped in the npm package ``@restatedev/restate-server``
(installed into ``<venv>/npm``), started with its ingress, admin and node ports on
free 127.0.0.1 ports, its data under the workdir and default options otherwise
(telemetry and web UI off). The script runs in a loopback-only network namespace
where it can make one: the server asks GitHub for its latest release at start, and
no option turns that off. The SDK's ASGI app is served by hypercorn (set up as in
the SDK's own test harness) on this process's event loop and registered through the
admin API; each workflow is a ``restate.Workflow`` invoked over the ingress HTTP API
with httpx (a new connection per invocation), which waits for its result, so W2's
peak RSS covers the service and the client. A Garrison step is ``ctx.run_typed`` (a
journaled side effect, which the server acknowledges before the handler goes on).

W3 starts a fresh server (new data directory) per repetition, which keeps running
throughout; what is killed is the SDK service process. The first service child serves
the app with hypercorn, registers it, submits ``CrashWorkflow/w3/run`` over the
ingress (``/send``) and is SIGKILLed inside step 10. The second serves the same app on
the same port (the deployment stays registered) and attaches to the workflow's result;
the server's own invocation retries (default retry policy) bring the invocation back
to it, with nothing else done by the script.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import pathlib
import platform
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import restate
from _bench_common import (
    SERVER_READY_S,
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
    quiet_stdout,
    w3_repetition,
    w3_result,
)
from hypercorn.asyncio import serve
from hypercorn.config import Config

PEER = "restate"
IMPORT_STATEMENT = "import restate"
SERVER_PACKAGE = "@restatedev/restate-server"
REQUEST_TIMEOUT_S = 300.0

sequential = restate.Workflow("SequentialWorkflow")
sleepy = restate.Workflow("SleepyWorkflow")


async def noop_step(index: int) -> int:
    return index


async def sleep_step(index: int) -> int:
    await asyncio.sleep(W2_SLEEP_S)
    return index


@sequential.main(name="run")
async def run_sequential(ctx: restate.WorkflowContext, steps: int) -> int:
    for index in range(steps):
        await ctx.run_typed(f"step-{index}", noop_step, restate.RunOptions(), index=index)
    return steps


@sleepy.main(name="run")
async def run_sleepy(ctx: restate.WorkflowContext, steps: int) -> int:
    for index in range(steps):
        await ctx.run_typed(f"step-{index}", sleep_step, restate.RunOptions(), index=index)
    return steps


APP = restate.app(services=[sequential, sleepy])

crash = restate.Workflow("CrashWorkflow")


async def logged_step(index: int) -> int:
    W3Log.mark(index)
    await asyncio.sleep(W3_SLEEP_S)
    return index


@crash.main(name="run")
async def run_crash(ctx: restate.WorkflowContext, steps: int) -> int:
    total = 0
    for index in range(steps):
        total += await ctx.run_typed(f"step-{index}", logged_step, restate.RunOptions(),
                                     index=index)
    return total


W3_APP = restate.app(services=[crash])


def server_binary() -> pathlib.Path:
    modules = pathlib.Path(sys.prefix) / "npm" / "node_modules" / "@restatedev"
    arch = {"x86_64": "x64", "amd64": "x64", "aarch64": "arm64", "arm64": "arm64"}.get(
        platform.machine().lower(), platform.machine().lower()
    )
    binary = modules / f"restate-server-{sys.platform}-{arch}" / "bin" / "restate-server"
    if not binary.is_file():
        raise RuntimeError(f"no restate-server binary at {binary} (npm {SERVER_PACKAGE})")
    return binary


def server_version() -> str:
    package = pathlib.Path(sys.prefix) / "npm" / "node_modules" / SERVER_PACKAGE / "package.json"
    version: str = json.loads(package.read_text())["version"]
    return version


def restate_server(workdir: pathlib.Path, ingress: int, admin: int) -> Server:
    node = free_port()
    config = f"""\
node-name = "garrison-bench"
base-dir = "{workdir / "restate-data"}"
disable-telemetry = true
shutdown-timeout = "10s"
log-filter = "warn"
log-disable-ansi-codes = true
bind-address = "127.0.0.1:{node}"
advertised-address = "http://127.0.0.1:{node}/"

[admin]
bind-address = "127.0.0.1:{admin}"
advertised-address = "http://127.0.0.1:{admin}/"
disable-web-ui = true

[ingress]
bind-address = "127.0.0.1:{ingress}"
advertised-address = "http://127.0.0.1:{ingress}/"
"""
    config_path = workdir / "restate.toml"
    config_path.write_text(config)
    cmd = [
        str(server_binary()), "--config-file", str(config_path), "--no-logo",
        "--listen-mode", "tcp",
    ]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(workdir)}
    return Server("restate-server", cmd, workdir / "restate-server.log", env=env, cwd=workdir)


def http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@contextlib.asynccontextmanager
async def sdk_service(port: int, app: Any = APP) -> AsyncIterator[None]:
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.h2_max_concurrent_streams = 2**31 - 1
    config.keep_alive_max_requests = 2**31 - 1
    config.keep_alive_timeout = 2**31 - 1
    config.accesslog = None
    stop = asyncio.Event()
    task = asyncio.create_task(serve(app, config, mode="asgi", shutdown_trigger=stop.wait))
    try:
        yield
    finally:
        stop.set()
        with contextlib.suppress(TimeoutError):  # wait_for cancels the task on timeout
            await asyncio.wait_for(task, timeout=15)


async def register(
    client: httpx.AsyncClient, server: Server | None, admin: int, sdk: int
) -> None:
    deadline = time.monotonic() + SERVER_READY_S
    while True:
        if server is not None:
            server.check_alive()
        try:
            response = await client.post(
                f"http://127.0.0.1:{admin}/deployments", json={"uri": f"http://127.0.0.1:{sdk}"}
            )
            if response.status_code in (200, 201):
                return
            problem = f"{response.status_code} {response.text[:500]}"
        except httpx.HTTPError as exc:
            problem = repr(exc)
        if time.monotonic() > deadline:
            raise RuntimeError(f"cannot register the deployment: {problem}")
        await asyncio.sleep(0.2)


async def invoke(client: httpx.AsyncClient, ingress: int, workflow: str, steps: int) -> None:
    url = f"http://127.0.0.1:{ingress}/{workflow}/{uuid.uuid4().hex}/run"
    response = await client.post(url, json=steps)
    if response.status_code != 200 or response.json() != steps:
        raise RuntimeError(f"{workflow} answered {response.status_code}: {response.text[:500]}")


async def run_w1(client: httpx.AsyncClient, ingress: int) -> dict[str, Any]:
    samples = []
    for _ in range(W1_REPEATS):
        started = time.perf_counter()
        await invoke(client, ingress, "SequentialWorkflow", W1_STEPS)
        samples.append(round((time.perf_counter() - started) * 1000 / W1_STEPS, 4))
    return {"unit": "ms/step", "samples": samples}


async def run_w2(client: httpx.AsyncClient, ingress: int) -> dict[str, Any]:
    samples = []
    for _ in range(W2_REPEATS):
        started = time.perf_counter()
        await asyncio.gather(
            *(invoke(client, ingress, "SleepyWorkflow", W2_STEPS) for _ in range(W2_WORKFLOWS))
        )
        samples.append(round(W2_WORKFLOWS * W2_STEPS / (time.perf_counter() - started), 1))
    return {"unit": "steps/s", "samples": samples, "peak_rss_mib": round(peak_rss_mib(), 1)}


async def run_durable(workload: str, server: Server, ingress: int, admin: int) -> dict[str, Any]:
    await asyncio.to_thread(server.wait_ready, lambda: ready_check(ingress, admin))
    sdk = free_port()
    # A fresh loopback connection per invocation: httpcore's pool scans all of its
    # connections on every request and response, and with 200 kept alive the client,
    # not Restate, became the bottleneck (W2 fell from ~800 to ~290 steps/s after the
    # first repetition, the Python process's CPU per repetition from 2.4 s to 6.9 s).
    limits = httpx.Limits(max_connections=W2_WORKFLOWS, max_keepalive_connections=0)
    async with (
        sdk_service(sdk),
        httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=limits) as client,
    ):
        await register(client, server, admin, sdk)
        if workload == "w1":
            return await run_w1(client, ingress)
        return await run_w2(client, ingress)


async def w3_child_run(spec: dict[str, Any]) -> None:
    ingress, admin, sdk = spec["ingress"], spec["admin"], spec["sdk"]
    async with (
        sdk_service(sdk, W3_APP),
        httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S) as client,
    ):
        if spec["role"] == "first":
            await register(client, None, admin, sdk)
            url = f"http://127.0.0.1:{ingress}/CrashWorkflow/{W3_WORKFLOW_ID}/run/send"
            response = await client.post(url, json=W3_STEPS)
            if response.status_code not in (200, 202):
                raise RuntimeError(f"cannot submit W3: {response.status_code} {response.text}")
            await asyncio.sleep(REQUEST_TIMEOUT_S)  # SIGKILLed in step 10 long before
            raise RuntimeError("the W3 workflow was not killed")
        url = f"http://127.0.0.1:{ingress}/restate/workflow/CrashWorkflow/{W3_WORKFLOW_ID}/attach"
        response = await client.get(url)
        if response.status_code != 200 or response.json() != sum(range(W3_STEPS)):
            raise RuntimeError(f"W3 attach answered {response.status_code}: {response.text}")


def w3_child(spec: dict[str, Any]) -> None:
    """A W3 SDK service child: "first" registers, submits the workflow and dies in step
    10; "resume" serves the same app on the same port and waits for the result."""
    W3Log.open(spec["log"], kill=spec["role"] == "first")
    asyncio.run(w3_child_run(spec))


def ready_check(ingress: int, admin: int) -> bool:
    return http_ok(f"http://127.0.0.1:{admin}/health") and http_ok(
        f"http://127.0.0.1:{ingress}/restate/health"
    )


def run_w3(args: argparse.Namespace) -> dict[str, Any]:
    samples, complete_s, twice = [], [], []
    for rep in range(W3_REPEATS):
        server_dir = args.workdir / f"w3-server-{rep}"
        server_dir.mkdir()
        ingress, admin = free_port(), free_port()
        with restate_server(server_dir, ingress, admin) as server:
            server.wait_ready(lambda: ready_check(ingress, admin))  # noqa: B023
            spec = {"ingress": ingress, "admin": admin, "sdk": free_port()}
            first_step, complete, repeated = w3_repetition(args, rep, spec)
        samples.append(first_step)
        complete_s.append(complete)
        twice.append(repeated)
    return w3_result(samples, complete_s, twice, "automatic (server retries the invocation)")


def main() -> None:
    args = parse_args(__doc__)
    quiet_stdout()
    if args.w3_child is not None:
        w3_child(args.w3_child)
        return
    version = importlib.metadata.version("restate-sdk")
    if args.workload == "w5":
        emit(PEER, version, "w5", measure_import(IMPORT_STATEMENT))
        return
    isolate_network()
    if args.workload == "w3":
        result = run_w3(args)
        result["server"] = f"restate-server {server_version()}"
        emit(PEER, version, "w3", result)
        return
    ingress, admin = free_port(), free_port()
    with restate_server(args.workdir, ingress, admin) as server:
        started = time.perf_counter()
        result = asyncio.run(run_durable(args.workload, server, ingress, admin))
        log(f"{args.workload} ran in {time.perf_counter() - started:.1f} s")
    result["server"] = f"restate-server {server_version()}"
    emit(PEER, version, args.workload, result)


if __name__ == "__main__":
    main()
