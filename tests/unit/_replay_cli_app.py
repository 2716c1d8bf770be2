"""An application for the `garrison runs replay/fork --app` tests: its store and code
variant come from the environment (each CLI call is its own process)."""

from __future__ import annotations

import os

import structlog

from garrison import Context, Garrison

app = Garrison(os.environ.get("GARRISON_TEST_REPLAY_DB", "sqlite:///garrison.db"))
VARIANT = os.environ.get("GARRISON_TEST_REPLAY_VARIANT", "same")
if VARIANT == "broken":
    raise RuntimeError("the module's own bug")
log = structlog.get_logger("shop")


@app.step(name="double")
async def double(x: int) -> int:
    return x * 2


@app.workflow(name="twice")
async def twice(ctx: Context, x: int) -> int:
    if VARIANT == "logs":  # workflow code logging: replay runs it again
        log.info("twice.start", x=x)
        log.warning("twice.careful", x=x)
    doubled = await double(x)
    if VARIANT == "changed":
        doubled = await double(doubled)  # a step the recorded runs never took
    return doubled


@app.workflow(name="pair")
async def pair(ctx: Context, x: int) -> int:
    first = await ctx.start_child(twice, x, run_id=f"{ctx.run_id}/a")
    second = await ctx.start_child(twice, x + 1, run_id=f"{ctx.run_id}/b")
    return int(await first.result()) + int(await second.result())
