"""The application the fleet benchmark's processes share (fleet_bench.py).

Worker processes run it with the CLI, configured by environment variables:

    GARRISON_FLEET_URL=postgresql://...?schema=... GARRISON_FLEET_LEASE_TTL=2 \\
        garrison worker --app benchmarks.fleet_app:app --queues bench --grace 0

    GARRISON_FLEET_URL            the store (required)
    GARRISON_FLEET_LEASE_TTL      lease_ttl_s (default: Garrison's, 10)
    GARRISON_FLEET_CLAIM_INTERVAL claim_interval_s (default: Garrison's, 1)
    GARRISON_FLEET_LOG            if set, every step body appends
                                  `PID RUN_ID INDEX TIME` to this file (one write, O_APPEND)

The client (fleet_bench.py) builds the same app with `build(url, worker=False)`.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from garrison import Context, Garrison, current_step

QUEUE = "bench"

Workflow = Callable[..., Awaitable[Any]]


class _StepLog:
    def __init__(self, path: str | None) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if path else -1
        self.pid = os.getpid()

    def mark(self, index: int) -> None:
        if self.fd >= 0:
            run_id = current_step().run_id
            os.write(self.fd, f"{self.pid} {run_id} {index} {time.time():.6f}\n".encode())


def build(url: str, *, worker: bool = True, lease_ttl_s: float | None = None,
          claim_interval_s: float | None = None,
          log_path: str | None = None) -> tuple[Garrison, Workflow, Workflow]:
    """The app, its `drain(steps, sleep_s)` workflow (steps of `asyncio.sleep`) and its
    `ping()` workflow (one step returning `time.time()` taken in its body)."""
    options: dict[str, Any] = {"worker": worker}
    if lease_ttl_s is not None:
        options["lease_ttl_s"] = lease_ttl_s
    if claim_interval_s is not None:
        options["claim_interval_s"] = claim_interval_s
    app = Garrison(url, **options)
    app.queue(QUEUE)
    step_log = _StepLog(log_path if worker else None)

    @app.step(name="nap")
    async def nap(index: int, seconds: float) -> int:
        step_log.mark(index)
        await asyncio.sleep(seconds)
        return index

    @app.step(name="stamp")
    async def stamp() -> float:
        return time.time()

    @app.workflow(name="drain")
    async def drain(ctx: Context, steps: int, seconds: float) -> int:
        for index in range(steps):
            await nap(index, seconds)
        return steps

    @app.workflow(name="ping")
    async def ping(ctx: Context) -> float:
        return await stamp()

    return app, drain, ping


def _env_float(name: str) -> float | None:
    value = os.environ.get(name)
    return float(value) if value else None


def _from_env() -> Garrison | None:
    url = os.environ.get("GARRISON_FLEET_URL")
    if not url:
        return None  # imported by the client, which builds its own
    built, _, _ = build(url, lease_ttl_s=_env_float("GARRISON_FLEET_LEASE_TTL"),
                        claim_interval_s=_env_float("GARRISON_FLEET_CLAIM_INTERVAL"),
                        log_path=os.environ.get("GARRISON_FLEET_LOG"))
    return built


app = _from_env()
