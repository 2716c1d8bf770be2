"""A worker process hosting a supervision tree whose child crashes on command.

    python _tree_workload.py --url URL [--crash-and-die] [--crash-again]

--crash-and-die: crash child a#1 (one restart spent), then SIGKILL this process while a#2
runs. --crash-again: crash the current child a; prints the tree's outcome.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal

from garrison import Context, Garrison, WorkflowFailed
from garrison.resilience import Child, Supervisor


async def until_exists(app: Garrison, run_id: str) -> None:
    while await app.store.get_run(run_id) is None:  # noqa: ASYNC110  # another run's progress
        await asyncio.sleep(0.01)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--crash-and-die", action="store_true")
    parser.add_argument("--crash-again", action="store_true")
    args = parser.parse_args()
    app = Garrison(args.url)

    @app.workflow(name="agent")
    async def agent(ctx: Context, label: str) -> str:
        if await ctx.wait_for("cmd") == "crash":
            raise RuntimeError(f"{label} crashed")
        return label

    tree = Supervisor("desk", [Child(agent, ("a",), name="a"), Child(agent, ("b",), name="b")],
                      intensity=1, period=3600)
    app.add_supervisor(tree)
    async with app:
        if args.crash_and_die:
            await app.start(tree, run_id="t")  # type: ignore[arg-type]
            await until_exists(app, "t/b#1")
            await app.send("t/a#1", "cmd", "crash")
            await until_exists(app, "t/a#2")
            os.kill(os.getpid(), signal.SIGKILL)
        await until_exists(app, "t/a#2")
        await app.send("t/a#2", "cmd", "crash")  # the second restart within the period
        try:
            await app.handle("t").result(timeout=30)
        except WorkflowFailed as exc:
            print("escalated" if "SupervisorEscalated" in str(exc) else f"failed: {exc}")


if __name__ == "__main__":
    asyncio.run(main())
