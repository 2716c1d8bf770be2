"""The demo's worker process: `python -m garrison.demo._worker DB EFFECTS RUNS`.

Starts (idempotently) RUNS orders and works until all are done. The demo driver kills
it with SIGKILL midway and starts it again.
"""

from __future__ import annotations

import asyncio
import sys

from garrison.demo._orders import build_app


async def main(db: str, effects: str, runs: int) -> None:
    app, fulfil_order = build_app(f"sqlite:///{db}", effects)
    async with app:
        handles = [
            await app.start(fulfil_order, f"o-{i:04d}", 100 + i, run_id=f"order-{i:04d}")
            for i in range(runs)
        ]
        for handle in handles:
            await handle.result()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
