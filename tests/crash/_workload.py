"""A worker process for crash tests: runs a batch of workflows, may SIGKILL itself.

Every step body appends `pid key` to the effects file before returning, so the test can
count how often each step's side effect happened and in which process.

    python _workload.py --url STORE_URL --effects PATH --out PATH [--kill-at POINT:N]

POINT is one of: started (inside a step, before its side effect), completed (after the
side effect, before the commit), committed (right after the commit), parked (a run just
parked on a timer), fanout (a step in a fan-out branch starts).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from garrison import Context, EngineHooks, Garrison, StepInfo, current_step

RUNS = 12


class KillAt(EngineHooks):
    def __init__(self, point: str, n: int) -> None:
        self.point, self.n, self.seen = point, n, 0

    def _tick(self, point: str) -> None:
        if point == self.point:
            self.seen += 1
            if self.seen == self.n:
                os.kill(os.getpid(), signal.SIGKILL)

    def step_started(self, step: StepInfo) -> None:
        self._tick("started")
        if "." in step.position:
            self._tick("fanout")

    def step_completed(self, step: StepInfo, duration_s: float) -> None:
        self._tick("completed")

    def step_committed(self, step: StepInfo) -> None:
        self._tick("committed")

    def run_parked(self, run_id: str, wake_at: float | None) -> None:
        self._tick("parked")


def build(url: str, effects_path: str, hooks: list[EngineHooks]) -> tuple[Garrison, Any]:
    app = Garrison(url, hooks=hooks)
    effects = os.open(effects_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    @app.step()
    async def effect(value: int) -> int:
        os.write(effects, f"{os.getpid()} {current_step().idempotency_key}\n".encode())
        return value * 2

    @app.workflow(name="child")
    async def child(ctx: Context, base: int) -> int:
        return await effect(base) + await effect(base + 1)

    @app.workflow(name="batch")
    async def batch(ctx: Context, i: int) -> int:
        total = await effect(i)
        await ctx.sleep(0.05)
        total += await effect(i + 1)
        parts = await asyncio.gather(*(effect(i * 10 + k) for k in range(3)))
        total += sum(parts)
        total += await (await ctx.start_child(child, i)).result()
        return total + await effect(i + 2)

    return app, batch


def expected(i: int) -> int:
    return 2 * (i + (i + 1) + sum(i * 10 + k for k in range(3)) + i + (i + 1) + (i + 2))


async def main() -> list[int]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True, help="the store URL")
    parser.add_argument("--effects", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--kill-at", default=None)
    args = parser.parse_args()
    hooks: list[EngineHooks] = []
    if args.kill_at:
        point, n = args.kill_at.split(":")
        hooks.append(KillAt(point, int(n)))
    app, batch = build(args.url, args.effects, hooks)
    async with app:
        handles = [await app.start(batch, i, run_id=f"batch-{i}") for i in range(RUNS)]
        results = [await h.result(timeout=60) for h in handles]
    return results


if __name__ == "__main__":
    out = sys.argv[sys.argv.index("--out") + 1]
    Path(out).write_text(json.dumps({"pid": os.getpid(), "results": asyncio.run(main())}))
