"""The demo's workflows: an order pipeline with a durable timer and a fan-out.

Every step appends `pid idempotency_key` to an effects log, standing in for a call to
an external system, so the demo can count side effects that happened twice.
"""

from __future__ import annotations

import asyncio
import os
import random
from typing import Any

from garrison import Context, Garrison, current_step

STEPS_PER_ORDER = 6


def build_app(url: str, effects_path: str) -> tuple[Garrison, Any]:
    """The demo app and its `fulfil_order` workflow."""
    app = Garrison(url)
    effects = os.open(effects_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def record_effect() -> None:
        os.write(effects, f"{os.getpid()} {current_step().idempotency_key}\n".encode())

    async def external_call() -> None:
        await asyncio.sleep(random.uniform(0.005, 0.03))  # a payment API, a warehouse...
        record_effect()

    @app.step()
    async def reserve_stock(order_id: str, items: int) -> str:
        await external_call()
        return f"res-{order_id}"

    @app.step()
    async def charge_card(order_id: str, cents: int) -> str:
        await external_call()
        return f"ch-{order_id}-{cents}"

    @app.step()
    async def notify(order_id: str, channel: str) -> str:
        await external_call()
        return channel

    @app.step()
    async def ship(order_id: str, reservation: str) -> str:
        await external_call()
        return f"trk-{order_id}"

    @app.workflow(name="fulfil_order")
    async def fulfil_order(ctx: Context, order_id: str, cents: int) -> dict[str, Any]:
        reservation = await reserve_stock(order_id, 3)
        charge = await charge_card(order_id, cents)
        await ctx.sleep(0.25)  # durable: the run is parked in the store meanwhile
        channels = await asyncio.gather(*(notify(order_id, c) for c in ("email", "sms", "push")))
        tracking = await ship(order_id, reservation)
        return {"charge": charge, "tracking": tracking, "notified": list(channels)}

    return app, fulfil_order
