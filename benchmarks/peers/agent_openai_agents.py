"""Agents benchmark: the OpenAI Agents SDK (``openai-agents``). Not durable.

Run inside the agent-openai-agents virtualenv (benchmarks/agents_bench.py does):
    python agent_openai_agents.py --workload a|b --base-url URL --workdir DIR
Prints one JSON line on stdout.

An ``agents.Agent`` with one ``@function_tool``, on ``OpenAIChatCompletionsModel`` over
one ``openai.AsyncOpenAI`` client (the local server speaks Chat Completions), run with
``Runner.run``. Tracing is off (its exporter would post every span to api.openai.com).
A conversation's next message goes in on ``result.to_input_list()``. Nothing is saved:
a crash loses the conversation in flight (the SDK's sessions store history between
runs, not a run's progress).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
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
    TOOL_NAME,
    check_answer,
    emit,
    measure,
    order_status,
    parse_args,
    quiet_stdout,
    record,
)
from agent_openai_raw import RawControl
from agents import (
    Agent,
    OpenAIChatCompletionsModel,
    RunConfig,
    Runner,
    function_tool,
    set_tracing_disabled,
)


@function_tool(name_override=TOOL_NAME)
async def lookup_order(order_id: str) -> dict[str, str]:
    """Look up an order by its id."""
    return order_status(order_id)


def main() -> None:
    args = parse_args(__doc__)
    quiet_stdout()
    set_tracing_disabled(True)

    async def bench() -> dict[str, Any]:
        client = openai.AsyncOpenAI(base_url=args.base_url, api_key=API_KEY)
        agent: Agent[None] = Agent(
            name="bench", instructions=INSTRUCTIONS, tools=[lookup_order],
            model=OpenAIChatCompletionsModel(model=MODEL, openai_client=client))
        config = RunConfig(tracing_disabled=True)

        async def run_a(run_id: str) -> None:
            result = await Runner.run(agent, A_PROMPT, run_config=config)
            check_answer("openai-agents", result.final_output, TOOL_ANSWER)

        async def conversation_b(conv_id: str) -> None:
            history: list[Any] = []
            for text, expected in zip(B_MESSAGES, (TOOL_ANSWER, TOOL_ANSWER, FINAL_ANSWER),
                                      strict=True):
                result = await Runner.run(
                    agent, [*history, {"role": "user", "content": text}], run_config=config)
                check_answer("openai-agents", result.final_output, expected)
                history = result.to_input_list()

        control = RawControl(args.base_url)
        try:
            return await measure(args, run_a, conversation_b, control.run_a)
        finally:
            await control.aclose()
            await client.close()

    result = asyncio.run(bench())
    emit(record("openai-agents", importlib.metadata.version("openai-agents"), args, result,
                durable="no: a crash loses the run in flight",
                openai=importlib.metadata.version("openai")))


if __name__ == "__main__":
    main()
