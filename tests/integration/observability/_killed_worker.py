"""A worker process the recovery test SIGKILLs: it starts run "r-1" of `recover`, whose
`hold` step writes the ready file and then waits (until the kill).

    python _killed_worker.py STORE_URL READY_PATH
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from garrison import Context, Garrison


def build(url: str, worker_id: str, ready: Path | None) -> Garrison:
    """The app, as the killed worker (`ready` given: `hold` waits) and as the rescuer."""
    app = Garrison(url, worker_id=worker_id, lease_ttl_s=1.0, claim_interval_s=0.2)

    @app.step(name="prepare")
    async def prepare() -> str:
        return "prepared"

    @app.step(name="hold")
    async def hold() -> str:
        if ready is not None:
            await asyncio.to_thread(ready.write_text, "in hold")
            await asyncio.Event().wait()
        return "held"

    @app.workflow(name="recover")
    async def recover(ctx: Context) -> str:
        await prepare()
        return await hold()

    return app


async def main(url: str, ready: Path) -> None:
    async with build(url, "w-killed", ready) as app:
        await app.start("recover", run_id="r-1")
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], Path(sys.argv[2])))
