"""A worker process running support-agent conversations against the local LLM server;
it SIGKILLs itself at a named point of the second conversation.

    python _agent_workload.py --url URL --base-url URL --effects PATH
                              [--point model|tool|stream] [--stream]

Points: `model`, right after the server answered the second model call and before
the answer is journaled; `tool`, inside the refund tool after its side effect; `stream`,
inside a streamed answer after its second text piece was published. Prints one JSON
line per conversation: run id and answer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
from collections.abc import Mapping, Sequence
from typing import Any

from garrison import Garrison, current_step
from garrison.agents import (
    Agent,
    FinalOutput,
    Message,
    ModelResponse,
    OpenAIModel,
    ToolContext,
    tool,
)
from garrison.agents._model import DeltaHandler

TARGET = "conv-2"
PROMPTS = {"conv-1": "Customer 1: please refund order 42",
           "conv-2": "Customer 2: please refund order 42"}


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class KillingModel:
    """A real OpenAIModel that dies at the chosen point of the target run."""

    def __init__(self, inner: OpenAIModel, point: str | None) -> None:
        self.inner = inner
        self.point = point
        self.name, self.provider, self.model_name = inner.name, inner.provider, inner.model_name

    async def request(self, messages: Sequence[Message], *,
                      tools: Sequence[Mapping[str, Any]] = (), settings: Any = None,
                      output_schema: Mapping[str, Any] | None = None,
                      on_delta: DeltaHandler | None = None) -> ModelResponse:
        step = current_step()
        target = step.run_id == TARGET
        turn = sum(1 for m in messages if m.role == "assistant") + 1
        if target and self.point == "stream" and on_delta is not None and turn == 3:
            pieces = 0
            inner_delta = on_delta

            async def counting(piece: str) -> None:
                nonlocal pieces
                await inner_delta(piece)
                pieces += 1
                if pieces == 2:
                    _die()  # two pieces are durable in the stream; the rest is not

            on_delta = counting
        response = await self.inner.request(messages, tools=tools, settings=settings,
                                            output_schema=output_schema, on_delta=on_delta)
        if target and self.point == "model" and turn == 2:
            _die()  # the server answered; the answer is not journaled yet
        return response


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--effects", required=True)
    parser.add_argument("--point", choices=["model", "tool", "stream"])
    parser.add_argument("--stream", action="store_true")
    args = parser.parse_args()
    effects = os.open(args.effects, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    @tool
    async def lookup_order(order_id: str) -> dict[str, Any]:
        """Look up an order."""
        step = current_step()
        os.write(effects, f"lookup {step.idempotency_key}\n".encode())
        return {"order_id": order_id, "cents": 1299}

    @tool(side_effects=True)
    async def refund(order_id: str, cents: int, ctx: ToolContext) -> str:
        """Refund an order."""
        os.write(effects, f"refund {ctx.idempotency_key}\n".encode())
        if args.point == "tool" and ctx.run_id == TARGET:
            _die()  # the refund happened; its step is not journaled
        return f"refunded {cents} cents on order {order_id}"

    model = KillingModel(OpenAIModel("crash-model", base_url=args.base_url, api_key="t"),
                         args.point)
    agent = Agent("support", model=model, tools=[lookup_order, refund],
                  instructions="Look orders up before refunding them.")
    app = Garrison(args.url, lease_ttl_s=1.0)  # a killed worker's runs free up in 1 s
    app.add_agent(agent)
    async with app:
        for run_id, prompt in PROMPTS.items():  # one after the other: one call in flight
            if args.stream:
                answer = None
                async for event in agent.stream(app, prompt, run_id=run_id):
                    if isinstance(event, FinalOutput):
                        answer = event.result.output
            else:
                answer = (await agent.run(app, prompt, run_id=run_id)).output
            print(json.dumps({"run_id": run_id, "answer": answer}), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
