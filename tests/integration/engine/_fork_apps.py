"""The apps of the replay and fork tests: `build(url, variant)` makes the same workflow
names with the code of one version, and a counter of the step bodies that ran."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from garrison import Context, Garrison, RunStatus

__all__ = ["build", "wait_status"]


def build(url: str, variant: str = "same", *, worker: bool = True,
          claim_interval_s: float = 0.05, release: asyncio.Event | None = None
          ) -> tuple[Garrison, Counter[str]]:
    app = Garrison(url, worker=worker, poll_interval_s=0.005,
                   claim_interval_s=claim_interval_s)
    calls: Counter[str] = Counter()
    released = release or asyncio.Event()

    @app.step(name="reserve")
    async def reserve(sku: str) -> str:
        calls["reserve"] += 1
        return f"res-{sku}"

    @app.step(name="hold")
    async def hold(sku: str) -> str:
        calls["hold"] += 1
        return f"hold-{sku}"

    @app.step(name="charge")
    async def charge(cents: int) -> int:
        calls["charge"] += 1
        return cents

    @app.step(name="ship")
    async def ship(sku: str) -> str:
        calls["ship"] += 1
        return f"shipped-{sku}"

    @app.step(name="part")
    async def part(n: int) -> int:
        calls["part"] += 1
        return n * 10

    @app.workflow(name="order")
    async def order(ctx: Context, sku: str, cents: int) -> dict[str, Any]:
        first = await (hold(sku) if variant == "renamed" else reserve(sku))
        if variant == "removed":
            return {"r": first, "c": cents}
        paid = await charge(cents)
        if variant == "added":
            await ship(sku)
        return {"r": first, "c": paid + (1 if variant == "result" else 0)}

    @app.workflow(name="approval")
    async def approval(ctx: Context, sku: str) -> str:
        await reserve(sku)
        if variant == "sleep":
            await ctx.sleep(3600)
            return "slept"
        return str(await ctx.wait_for("approved"))

    @app.workflow(name="fanout")
    async def fanout(ctx: Context, n: int) -> int:
        parts = await asyncio.gather(*(part(n + i) for i in range(3)))
        return sum(parts) + await charge(n)

    @app.workflow(name="orders")
    async def orders(ctx: Context, skus: list[str]) -> int:
        handles = [await ctx.start_child(order, sku, 100) for sku in skus]
        return sum([(await h.result())["c"] for h in handles])

    @app.workflow(name="gate")
    async def gate(ctx: Context, sku: str) -> str:
        return f"{await ctx.wait_for('go')}-{sku}"

    @app.workflow(name="gated")
    async def gated(ctx: Context, sku: str) -> str:
        child = await ctx.start_child(gate, sku)
        if variant == "cancels":  # from workflow code: a write outside the journal
            await child.cancel()
        return str(await child.result())

    @app.step(name="busy")
    async def busy() -> None:
        await released.wait()

    @app.step(name="note")
    async def note(value: str) -> str:
        calls["note"] += 1
        return value

    @app.workflow(name="gated_busy")  # live (a step running) while it waits on its child
    async def gated_busy(ctx: Context, sku: str) -> str:
        child = await ctx.start_child(gate, sku)

        async def told() -> str:
            return await note(str(await child.result()))

        got, _ = await asyncio.gather(told(), busy())
        return got

    return app, calls


async def wait_status(app: Garrison, run_id: str, status: RunStatus) -> None:
    async with asyncio.timeout(10):
        while await app.store.get_run(run_id) is None:  # noqa: ASYNC110  # not started yet
            await asyncio.sleep(0.01)
        while await app.handle(run_id).status() is not status:  # noqa: ASYNC110  # the store
            await asyncio.sleep(0.01)
