"""Garrison on the agents benchmark (issue 7); prints one JSON line.

    python benchmarks/agents_garrison.py --workload a|b --base-url URL --workdir DIR
        [--mode full|normal]

A ``garrison.agents.Agent`` on ``OpenAIModel`` with one ``@tool``, added to a Garrison
app on a fresh SQLite file (``synchronous=FULL``: durable on power loss). Each user
message is one durable run (``agent.run(app, text, run_id=...)``): its model calls and
the tool call are journaled, and a conversation's next message is a new run given the
previous result's ``messages``. ``--mode normal`` opens the store with
``?synchronous=NORMAL`` (survives a process crash, not a power loss), for comparison.
Workloads and the server's script come from peers/_agent_common.py, so every framework
runs the same thing. Run through benchmarks/agents_bench.py, which prints the tables.
"""

from __future__ import annotations

import asyncio
import sqlite3
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent / "peers"))
from _agent_common import (  # the shared workload definitions
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

import garrison
from garrison import Garrison
from garrison.agents import Agent, OpenAIModel, tool


@tool(name=TOOL_NAME)
async def lookup_order(order_id: str) -> dict[str, str]:
    """Look up an order by its id."""
    return order_status(order_id)


def main() -> None:
    args = parse_args(__doc__, modes=("full", "normal"))
    quiet_stdout()
    db_path = args.workdir / "garrison.db"

    async def bench() -> dict[str, Any]:
        agent = Agent("bench", model=OpenAIModel(MODEL, base_url=args.base_url, api_key=API_KEY),
                      instructions=INSTRUCTIONS, tools=[lookup_order])
        options = "?synchronous=NORMAL" if args.mode == "normal" else ""
        app = Garrison(f"sqlite:///{db_path}{options}")
        app.add_agent(agent)

        async def run_a(run_id: str) -> None:
            result = await agent.run(app, A_PROMPT, run_id=f"a-{run_id}")
            check_answer("garrison", result.output, TOOL_ANSWER)

        async def conversation_b(conv_id: str) -> None:
            history: Any = None
            for index, (text, expected) in enumerate(
                    zip(B_MESSAGES, (TOOL_ANSWER, TOOL_ANSWER, FINAL_ANSWER), strict=True)):
                result = await agent.run(app, text, run_id=f"b-{conv_id}-m{index}",
                                         history=history)
                check_answer("garrison", result.output, expected)
                history = result.messages

        control = RawControl(args.base_url)
        try:
            async with app:
                return await measure(args, run_a, conversation_b, control.run_a)
        finally:
            await control.aclose()

    result = asyncio.run(bench())
    with sqlite3.connect(db_path) as conn:
        journal_mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    emit(record("garrison" if args.mode == "full" else "garrison-normal", garrison.__version__,
                args, result,
                durable="journaled run per message, model calls and tool calls as steps",
                sqlite={"journal_mode": journal_mode, "synchronous": args.mode.upper()},
                openai=_version("openai")))


def _version(package: str) -> str:
    import importlib.metadata

    return importlib.metadata.version(package)


if __name__ == "__main__":
    main()
