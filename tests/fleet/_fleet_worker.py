"""A fleet worker process for the chaos and zombie tests: serves runs until SIGTERM.

    python _fleet_worker.py --url STORE_URL --effects PATH --id NAME [--lease-ttl S]
        [--step-sleep S] [--concurrency N]

Every step body appends one line to the effects file (O_APPEND, one write):

    PID KEY BEGAN WROTE           KEY = the step's idempotency key (run_id:position)
    PID done:RUN_ID BEGAN WROTE   also written by the last step of each run
    PID finished:RUN_ID T T       written when this worker durably ended the run

BEGAN is when the step body began, WROTE when the side effect happened (epoch seconds):
5 ms into the body, which then goes on for 50 to 200 ms before returning.
The worker id is `host:pid:NAME`, so a journal entry's writer names the process.
The zombie test's workflow is one slow step: it writes `PID started KEY T`, sleeps
`--step-sleep` seconds, writes `PID returned KEY T` and returns the pid.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from garrison import Context, EngineHooks, Garrison, RunStatus, current_step

QUEUE = "fleet"
CAP = 20  # the queue's fleet-wide concurrency: at most this many active runs
STEPS_PER_RUN = 3
LEASE_TTL_S = 2.0
CLAIM_INTERVAL_S = 0.5
EFFECT_AFTER_S = 0.005
WORKER_CONCURRENCY = 10  # so that the queue's runs spread over at least two workers

Workflow = Callable[..., Awaitable[Any]]


def run_id(i: int) -> str:
    return f"fleet-{i:05d}"


def expected(i: int) -> int:
    return (i * 10 + 1) + (i * 10 + 2) + i


def step_delay(i: int, k: int) -> float:
    """50 to 200 ms, deterministic per step: kills land mid-step, and 1,000 runs take
    long enough (about half a minute at the queue's cap) for a dozen and more of them."""
    return (50 + (i * 37 + k * 53) % 151) / 1000


class _Effects:
    def __init__(self, path: str | None) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if path else -1
        self.pid = os.getpid()

    def write(self, text: str) -> None:
        if self.fd >= 0:
            os.write(self.fd, text.encode())


class _Finished(EngineHooks):
    def __init__(self, effects: _Effects) -> None:
        self.effects = effects

    def run_finished(self, run_id: str, status: RunStatus) -> None:
        now = f"{time.time():.6f}"
        self.effects.write(f"{self.effects.pid} finished:{run_id} {now} {now}\n")


def build(url: str, effects_path: str | None, *, worker: bool, worker_id: str | None = None,
          lease_ttl_s: float = LEASE_TTL_S, concurrency: int | None = WORKER_CONCURRENCY,
          step_sleep: float = 0.0) -> tuple[Garrison, Workflow, Workflow]:
    """The application every process declares (clients included): the app, the chaos
    test's three-step workflow `fleet` and the zombie test's one-step `zombie`."""
    effects = _Effects(effects_path)
    app = Garrison(url, worker=worker, worker_id=worker_id, hooks=[_Finished(effects)],
                   lease_ttl_s=lease_ttl_s, claim_interval_s=CLAIM_INTERVAL_S,
                   concurrency=concurrency if worker else None)
    app.queue(QUEUE, concurrency=CAP)

    def effect(began: float, done: bool = False) -> None:
        step = current_step()
        now = time.time()
        line = f"{effects.pid} {step.idempotency_key} {began:.6f} {now:.6f}\n"
        if done:
            line += f"{effects.pid} done:{step.run_id} {began:.6f} {now:.6f}\n"
        effects.write(line)

    # The side effect happens early in the body, then the step goes on for a while: a
    # kill during that while leaves an effect whose step was never committed.
    @app.step()
    async def work(i: int, k: int) -> int:
        began = time.time()
        await asyncio.sleep(EFFECT_AFTER_S)
        effect(began)
        await asyncio.sleep(step_delay(i, k))
        return i * 10 + k

    @app.step()
    async def finish(i: int, total: int) -> int:
        began = time.time()
        await asyncio.sleep(EFFECT_AFTER_S)
        effect(began, done=True)
        await asyncio.sleep(step_delay(i, 3))
        return total + i

    @app.workflow(name="fleet")
    async def fleet(ctx: Context, i: int) -> int:
        first = await work(i, 1)
        second = await work(i, 2)
        return await finish(i, first + second)

    @app.step()
    async def slow() -> int:
        step = current_step()
        effects.write(f"{effects.pid} started {step.idempotency_key} {time.time():.6f}\n")
        await asyncio.sleep(step_sleep)
        effects.write(f"{effects.pid} returned {step.idempotency_key} {time.time():.6f}\n")
        return effects.pid

    @app.workflow(name="zombie")
    async def zombie(ctx: Context) -> int:
        return await slow()

    return app, fleet, zombie


async def serve() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--effects", required=True)
    parser.add_argument("--id", required=True)
    parser.add_argument("--lease-ttl", type=float, default=LEASE_TTL_S)
    parser.add_argument("--step-sleep", type=float, default=0.0)
    parser.add_argument("--concurrency", type=int, default=WORKER_CONCURRENCY)
    args = parser.parse_args()
    worker_id = f"{socket.gethostname()}:{os.getpid()}:{args.id}"
    app, _, _ = build(args.url, args.effects, worker=True, worker_id=worker_id,
                   lease_ttl_s=args.lease_ttl, concurrency=args.concurrency,
                   step_sleep=args.step_sleep)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with app:
        print(f"fleet-worker ready {worker_id}", flush=True)
        await stop.wait()
        print(f"fleet-worker stopping {worker_id}", flush=True)
    print(f"fleet-worker stopped {worker_id}", flush=True)


if __name__ == "__main__":
    asyncio.run(serve())
    sys.exit(0)
