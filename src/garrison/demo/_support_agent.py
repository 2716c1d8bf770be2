"""The agent demo's application: a support agent that looks up and refunds orders.

`refund` is a side effect: it appends its idempotency key to an effects log, standing
in for a payment API, so the demo can count refunds that happened twice.
"""

from __future__ import annotations

import os
from typing import Any

from garrison import Garrison
from garrison.agents import Agent, OpenAIModel, Price, PriceTable, ToolContext, tool
from garrison.resilience import Retry

__all__ = ["DEMO_SCRIPT", "MODEL_CALLS_PER_RUN", "build_app"]

MODEL_CALLS_PER_RUN = 3

# What the local server answers: look the order up, refund it, confirm.
DEMO_SCRIPT: dict[str, Any] = {
    "rules": [
        {"last_role": "user", "last_user_contains": "refund",
         "tool_calls": [{"name": "lookup_order", "arguments": {"order_id": "42"}}]},
        {"last_tool": "lookup_order",
         "tool_calls": [{"name": "refund", "arguments": {"order_id": "42", "cents": 1299}}]},
        {"last_tool": "refund", "content": "Done: {last_tool_result}. Anything else?"},
    ],
    "default": {"content": "How can I help?"},
}


def _retryable(error: BaseException) -> bool:
    return bool(getattr(error, "retryable", False))


def build_app(url: str, base_url: str, effects_path: str) -> tuple[Garrison, Agent]:
    """The demo app and its support agent, talking to the server at `base_url`."""
    effects = os.open(effects_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    @tool
    async def lookup_order(order_id: str) -> dict[str, Any]:
        """Look up an order.

        Args:
            order_id: the order's id.
        """
        return {"order_id": order_id, "status": "delivered", "cents": 1299}

    @tool(side_effects=True)
    async def refund(order_id: str, cents: int, ctx: ToolContext) -> str:
        """Refund an order (a payment API call, keyed by the idempotency key)."""
        os.write(effects, f"{os.getpid()} {ctx.idempotency_key}\n".encode())
        return f"refunded {cents} cents on order {order_id}"

    prices = PriceTable({"demo-*": Price(0.15, 0.60)})
    agent = Agent(
        "support",
        model=OpenAIModel("demo-primary", base_url=base_url, api_key="demo"),
        fallback_models=[OpenAIModel("demo-backup", base_url=base_url, api_key="demo")],
        instructions="You are a support agent. Look orders up before refunding them.",
        tools=[lookup_order, refund], prices=prices, model_timeout_s=5.0,
        retry=Retry(max_attempts=3, base=0.05, cap=0.5, retry_on=_retryable))
    app = Garrison(url)
    app.add_agent(agent)
    return app, agent
