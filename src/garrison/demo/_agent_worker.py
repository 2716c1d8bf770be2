"""The agent demo's worker: `python -m garrison.demo._agent_worker DB BASE_URL EFFECTS N`.

Starts (idempotently) N conversations and works until all have answered. The driver
SIGKILLs it midway and starts it again: the new process resumes every run by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys

from garrison.demo._support_agent import build_app
from garrison.errors import GarrisonError


async def main(db: str, base_url: str, effects: str, runs: int) -> None:
    app, agent = build_app(f"sqlite:///{db}", base_url, effects)
    async with app:
        handles = [await agent.start(app, f"Customer {i}: please refund order 42",
                                     run_id=f"conv-{i:04d}") for i in range(runs)]
        for handle in handles:
            with contextlib.suppress(GarrisonError):  # a failed run is reported, not fatal
                await agent.result(handle)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
