"""A worker process whose one run retries a failing step; it may SIGKILL itself while
the run waits in its backoff (parked on the journaled retry timer).

    python _retry_workload.py --url URL --effects PATH [--kill-in-backoff]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from pathlib import Path

from garrison import Context, EngineHooks, Garrison
from garrison.resilience import Retry


class KillInBackoff(EngineHooks):
    def run_parked(self, run_id: str, wake_at: float | None) -> None:
        os.kill(os.getpid(), signal.SIGKILL)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--effects", required=True)
    parser.add_argument("--kill-in-backoff", action="store_true")
    args = parser.parse_args()
    effects = Path(args.effects)
    app = Garrison(args.url, hooks=(KillInBackoff(),) if args.kill_in_backoff else ())

    @app.step(name="flaky", retry=Retry(max_attempts=5, base=0.5, cap=0.5,
                                        random=lambda: 1.0))
    def flaky() -> str:  # a sync step: plain file I/O in the step thread
        with effects.open("a") as out:
            out.write(f"{os.getpid()}\n")
        attempts = len(effects.read_text().splitlines())
        if attempts < 3:
            raise ConnectionError(f"down (attempt {attempts})")
        return f"up after {attempts}"

    @app.workflow(name="retrying")
    async def retrying(ctx: Context) -> str:
        return await flaky()

    async with app:
        handle = await app.start(retrying, run_id="retry-1")
        print(await handle.result(timeout=60))


if __name__ == "__main__":
    asyncio.run(main())
