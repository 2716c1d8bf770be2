"""Agents benchmark baseline: the official ``openai`` client, the loop written by hand.

Run inside the agent-openai virtualenv (benchmarks/agents_bench.py does):
    python agent_openai_raw.py --workload a|b --base-url URL --workdir DIR
Prints one JSON line on stdout.

One ``openai.AsyncOpenAI`` client; each turn calls ``chat.completions.create`` with the
tool's JSON schema, runs the tool the model asked for and appends its result, until the
model answers in text. Nothing is saved anywhere: this is the floor every framework's
time per model call is compared with. ``RawControl`` is the same loop for the other
scripts to alternate with their own runs in workload A.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
from typing import Any

import openai
from _agent_common import (
    A_PROMPT,
    API_KEY,
    B_MESSAGES,
    FINAL_ANSWER,
    INSTRUCTIONS,
    MODEL,
    TOOL_ANSWER,
    TOOL_DESCRIPTION,
    TOOL_NAME,
    check_answer,
    emit,
    measure,
    order_status,
    parse_args,
    quiet_stdout,
    record,
)

TOOLS: list[Any] = [{
    "type": "function",
    "function": {
        "name": TOOL_NAME,
        "description": TOOL_DESCRIPTION,
        "parameters": {
            "type": "object",
            "properties": {"order_id": {"type": "string"}},
            "required": ["order_id"],
        },
    },
}]


async def turn(client: openai.AsyncOpenAI, messages: list[Any]) -> str:
    """Call the model until it answers in text, running the tools it asks for."""
    while True:
        completion = await client.chat.completions.create(
            model=MODEL, messages=messages, tools=TOOLS)
        message = completion.choices[0].message
        if not message.tool_calls:
            messages.append({"role": "assistant", "content": message.content})
            return message.content or ""
        messages.append(message.model_dump(exclude_none=True))
        for call in message.tool_calls:
            arguments = json.loads(call.function.arguments)  # type: ignore[union-attr]
            result = order_status(**arguments)
            messages.append({"role": "tool", "tool_call_id": call.id,
                             "content": json.dumps(result)})


class RawControl:
    """Workload A on the raw client, for another framework's script to alternate with its
    own runs (``measure(..., control_a=control.run_a)``): the in-process control."""

    def __init__(self, base_url: str) -> None:
        self.client = openai.AsyncOpenAI(base_url=base_url, api_key=API_KEY)

    async def run_a(self, run_id: str) -> None:
        messages: list[Any] = [{"role": "system", "content": INSTRUCTIONS},
                               {"role": "user", "content": A_PROMPT}]
        check_answer("openai (control)", await turn(self.client, messages), TOOL_ANSWER)

    async def aclose(self) -> None:
        await self.client.close()


def main() -> None:
    args = parse_args(__doc__)
    quiet_stdout()

    async def bench() -> dict[str, Any]:
        client = openai.AsyncOpenAI(base_url=args.base_url, api_key=API_KEY)
        system = {"role": "system", "content": INSTRUCTIONS}

        async def run_a(run_id: str) -> None:
            answer = await turn(client, [system, {"role": "user", "content": A_PROMPT}])
            check_answer("openai", answer, TOOL_ANSWER)

        async def conversation_b(conv_id: str) -> None:
            history: list[Any] = [system]
            for text, expected in zip(B_MESSAGES, (TOOL_ANSWER, TOOL_ANSWER, FINAL_ANSWER),
                                      strict=True):
                history.append({"role": "user", "content": text})
                check_answer("openai", await turn(client, history), expected)

        try:
            return await measure(args, run_a, conversation_b)
        finally:
            await client.close()

    result = asyncio.run(bench())
    emit(record("openai", importlib.metadata.version("openai"), args, result,
                durable="no (nothing is saved)"))


if __name__ == "__main__":
    main()
