"""Agents benchmark: pydantic-ai made durable with DBOS (SQLite system database).

Run inside the agent-pydantic-dbos virtualenv (benchmarks/agents_bench.py does):
    python agent_pydantic_dbos.py --workload a|b --base-url URL --workdir DIR
        [--mode dbos-agent|dbos-capability|plain]
Prints one JSON line on stdout.

A ``pydantic_ai.Agent`` on ``OpenAIChatModel`` over one ``openai.AsyncOpenAI`` client,
with one tool. Modes:

dbos-agent       ``pydantic_ai.durable_exec.dbos.DBOSAgent`` wraps the agent: each
                 ``run`` is a DBOS workflow, each model request a DBOS step. (The
                 wrapper is deprecated since pydantic-ai 2.x for the capability below;
                 it still works and is what the published figures measured.)
dbos-capability  the replacement: ``Agent(..., capabilities=[DBOSDurability()])``, its
                 ``run`` called inside our own ``@DBOS.workflow``.
plain            the same agent, no DBOS: not durable.

In both DBOS modes the tool is a ``@DBOS.step`` (pydantic-ai makes model requests and
MCP calls steps, not function tools; its docs ask for ``@DBOS.step`` on tools doing
I/O), so a tool's result is journaled like Garrison's. DBOS keeps its system database
in a fresh SQLite file (rollback journal, SQLite's default ``synchronous=FULL``): a
workflow that crashes is recovered on the next ``DBOS.launch()`` from its last
completed step. A conversation's next message is a new workflow given the previous
run's ``all_messages()``.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import sqlite3
import warnings
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
    log,
    measure,
    order_status,
    parse_args,
    quiet_stdout,
    record,
)
from agent_openai_raw import RawControl
from pydantic_ai import Agent
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.providers.openai import OpenAIProvider

MODES = ("dbos-agent", "dbos-capability", "plain")


def main() -> None:
    args = parse_args(__doc__, modes=MODES)
    quiet_stdout()
    durable = args.mode != "plain"
    extra: dict[str, Any] = {"mode": args.mode}

    if durable:
        from dbos import DBOS, DBOSConfig

        db_path = args.workdir / "dbos.sqlite"
        config: DBOSConfig = {"name": "garrison-agents-bench",
                              "system_database_url": f"sqlite:///{db_path}",
                              "log_level": "WARNING"}
        DBOS(config=config)

        @DBOS.step(name=TOOL_NAME)
        async def lookup_order_step(order_id: str) -> dict[str, str]:
            return order_status(order_id)

    async def lookup_order(order_id: str) -> dict[str, str]:
        """Look up an order by its id."""
        if durable:
            return await lookup_order_step(order_id)
        return order_status(order_id)

    lookup_order.__name__ = TOOL_NAME
    client = openai.AsyncOpenAI(base_url=args.base_url, api_key=API_KEY)
    model = OpenAIChatModel(MODEL, provider=OpenAIProvider(openai_client=client))
    capabilities: list[Any] = []
    if args.mode == "dbos-capability":
        from pydantic_ai.durable_exec.dbos import DBOSDurability

        capabilities.append(DBOSDurability())
    agent: Agent[None, str] = Agent(model, name="bench", instructions=INSTRUCTIONS,
                                    tools=[lookup_order], capabilities=capabilities)
    runner: Any = agent
    if args.mode == "dbos-agent":
        from pydantic_ai.durable_exec.dbos import DBOSAgent

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            runner = DBOSAgent(agent)
    if args.mode == "dbos-capability":
        @DBOS.workflow(name="bench.turn")
        async def turn_workflow(text: str, history: list[Any] | None) -> tuple[str, list[Any]]:
            result = await agent.run(text, message_history=history)
            return result.output, result.all_messages()

    async def turn(text: str, history: list[Any] | None) -> tuple[str, list[Any]]:
        if args.mode == "dbos-capability":
            return await turn_workflow(text, history)
        result = await runner.run(text, message_history=history)
        return result.output, result.all_messages()

    async def run_a(run_id: str) -> None:
        output, _ = await turn(A_PROMPT, None)
        check_answer("pydantic-ai", output, TOOL_ANSWER)

    async def conversation_b(conv_id: str) -> None:
        history: list[Any] | None = None
        for text, expected in zip(B_MESSAGES, (TOOL_ANSWER, TOOL_ANSWER, FINAL_ANSWER),
                                  strict=True):
            output, history = await turn(text, history)
            check_answer("pydantic-ai", output, expected)

    async def bench() -> dict[str, Any]:
        control = RawControl(args.base_url)
        try:
            return await measure(args, run_a, conversation_b, control.run_a)
        finally:
            await control.aclose()
            await client.close()

    if durable:
        DBOS.launch()
    try:
        result = asyncio.run(bench())
    finally:
        if durable:
            DBOS.destroy()
    if durable:
        with sqlite3.connect(db_path) as conn:
            # DBOS sets no synchronous pragma, so its connections have the default a fresh
            # connection reads back (2 = FULL in this build).
            extra["sqlite"] = {"journal_mode": conn.execute("PRAGMA journal_mode").fetchone()[0],
                               "synchronous": conn.execute("PRAGMA synchronous").fetchone()[0]}
            extra["workflows"] = conn.execute(
                "SELECT count(*) FROM workflow_status").fetchone()[0]
        extra["dbos"] = importlib.metadata.version("dbos")
        log(f"dbos recorded {extra['workflows']} workflows")
    name = {"dbos-agent": "pydantic-ai+dbos", "dbos-capability": "pydantic-ai+dbos-cap",
            "plain": "pydantic-ai"}[args.mode]
    emit(record(name, importlib.metadata.version("pydantic-ai-slim"), args, result,
                durable=("DBOS workflow per run, model requests and the tool as steps "
                         "(recovered on DBOS.launch)") if durable else "no",
                openai=importlib.metadata.version("openai"), **extra))


if __name__ == "__main__":
    main()
