"""Multi-agent patterns on Garrison: a router with handoffs, and an orchestrator with
worker agents called as tools (each call a durable child run with its own budget).

Runs offline: the models here are `FunctionModel`s that decide like a model would.
Swap them for "openai:gpt-4o-mini" or "anthropic:claude-haiku-4-5" in production.

    python examples/router.py
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
from typing import Any

from garrison import Garrison
from garrison.agents import Agent, Budget, FunctionModel, Message, tool


@tool
async def lookup_order(order_id: str) -> dict[str, Any]:
    """Look up an order.

    Args:
        order_id: the order's id.
    """
    return {"order_id": order_id, "status": "shipped", "carrier": "DHL", "cents": 1299}


@tool(side_effects=True)
async def refund(order_id: str, cents: int) -> str:
    """Refund an order."""
    return f"refund of {cents} cents for order {order_id} issued"


def _last(messages: list[Message], role: str) -> Message | None:
    return next((m for m in reversed(messages) if m.role == role), None)


def triage_model(messages: list[Message], tools: list[Any]) -> Any:
    """Routes by topic: billing questions to billing, the rest to shipping."""
    text = (_last(messages, "user") or Message.user("")).content or ""
    target = "billing" if "refund" in text.lower() else "shipping"
    return {"name": f"transfer_to_{target}", "arguments": {}}


def specialist_model(action: str) -> Any:
    def decide(messages: list[Message], tools: list[Any]) -> Any:
        last = messages[-1]
        if last.role == "tool" and last.name == "lookup_order":
            order = json.loads(last.content or "{}")
            if action == "refund":
                return {"name": "refund", "arguments": {"order_id": order["order_id"],
                                                        "cents": order["cents"]}}
            return f"Order {order['order_id']} is {order['status']} with {order['carrier']}."
        if last.role == "tool" and last.name == "refund":
            return f"Done: {last.content}."
        return {"name": "lookup_order", "arguments": {"order_id": "42"}}
    return decide


def worker_model(topic: str) -> Any:
    def answer(messages: list[Message], tools: list[Any]) -> Any:
        question = (_last(messages, "user") or Message.user("")).content
        return f"[{topic}] notes on: {question}"
    return answer


def orchestrator_model(messages: list[Message], tools: list[Any]) -> Any:
    """Fans the question out to both workers, then writes the summary."""
    results = [m for m in messages if m.role == "tool"]
    if not results:
        question = (_last(messages, "user") or Message.user("")).content
        return [{"name": "research", "arguments": {"input": f"facts about {question}"}},
                {"name": "critic", "arguments": {"input": f"risks of {question}"}}]
    return "Summary: " + " | ".join(m.content or "" for m in results)


billing = Agent("billing", model=FunctionModel(specialist_model("refund"), name="billing"),
                instructions="You issue refunds.", tools=[lookup_order, refund],
                description="refunds and invoices")
shipping = Agent("shipping", model=FunctionModel(specialist_model("track"), name="shipping"),
                 instructions="You track parcels.", tools=[lookup_order],
                 description="where a parcel is")
triage = Agent("triage", model=FunctionModel(triage_model, name="triage"),
               instructions="Route the customer to the right team.",
               handoffs=[billing, shipping])

research = Agent("research", model=FunctionModel(worker_model("research"), name="research"))
critic = Agent("critic", model=FunctionModel(worker_model("critic"), name="critic"))
orchestrator = Agent(
    "orchestrator", model=FunctionModel(orchestrator_model, name="orchestrator"),
    tools=[research.as_tool(description="Research a question", budget=Budget(tokens=5_000)),
           critic.as_tool(description="List the risks", timeout_s=60)])


async def main(db: str) -> list[str]:
    app = Garrison(f"sqlite:///{db}")
    app.add_agent(triage)
    app.add_agent(orchestrator)
    lines = []
    async with app:
        for prompt in ("I want a refund for order 42", "Where is my parcel?"):
            res = await triage.run(app, prompt)
            lines.append(f"{prompt!r} -> {res.agent}: {res.output}")
        res = await orchestrator.run(app, "moving our checkout to a new provider")
        lines.append(f"orchestrator ({res.usage.model_calls} model calls in all, child runs "
                     f"included): {res.output}")
    return lines


if __name__ == "__main__":
    folder = tempfile.mkdtemp(prefix="garrison-router-")
    for line in asyncio.run(main(f"{folder}/router.db")):
        print(line)
    sys.exit(0)
