"""Agents benchmark: LangGraph's prebuilt ReAct agent with its SQLite checkpointer.

Run inside the agent-langgraph virtualenv (benchmarks/agents_bench.py does):
    python agent_langgraph.py --workload a|b --base-url URL --workdir DIR [--mode sqlite|memory]
Prints one JSON line on stdout.

``langgraph.prebuilt.create_react_agent`` over ``langchain_openai.ChatOpenAI`` (Chat
Completions) with one ``@tool``, checkpointed by ``AsyncSqliteSaver`` on a fresh file
(WAL; ``PRAGMA synchronous`` is read back and reported, FULL is SQLite's default) and
invoked with ``durability="sync"``, LangGraph's most durable setting: each superstep's
checkpoint is written before the next superstep starts. A conversation is one
``thread_id``; its next message is a new ``ainvoke`` on that thread, whose history the
checkpointer holds. ``--mode memory`` runs the same agent with no checkpointer (not
durable), to separate the graph's own cost from the checkpoints'.

What that durability means: after a crash the thread's last checkpoint is on disk, but
nothing resumes it; the application has to call ``ainvoke(None, config)`` on each
interrupted thread itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import warnings
from typing import Any

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
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

with warnings.catch_warnings():  # create_react_agent is deprecated for langchain's create_agent
    warnings.simplefilter("ignore")
    from langgraph.prebuilt import create_react_agent


@tool(TOOL_NAME)
async def lookup_order(order_id: str) -> dict[str, str]:
    """Look up an order by its id."""
    return order_status(order_id)


def final_text(state: dict[str, Any]) -> object:
    return state["messages"][-1].content


def main() -> None:
    args = parse_args(__doc__, modes=("sqlite", "memory"))
    quiet_stdout()
    extra: dict[str, Any] = {}

    async def bench() -> dict[str, Any]:
        model = ChatOpenAI(model=MODEL, base_url=args.base_url, api_key=API_KEY,  # type: ignore[arg-type]
                           use_responses_api=False)
        async with contextlib.AsyncExitStack() as stack:
            saver = None
            if args.mode == "sqlite":
                saver = await stack.enter_async_context(
                    AsyncSqliteSaver.from_conn_string(str(args.workdir / "langgraph.db")))
                await saver.setup()
                await saver.conn.execute("PRAGMA synchronous=FULL")
                async with saver.conn.execute("PRAGMA synchronous") as cursor:
                    row = await cursor.fetchone()
                async with saver.conn.execute("PRAGMA journal_mode") as cursor:
                    mode = await cursor.fetchone()
                extra["sqlite"] = {"synchronous": row[0] if row else None,
                                   "journal_mode": mode[0] if mode else None}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                agent = create_react_agent(model, [lookup_order], prompt=INSTRUCTIONS,
                                           checkpointer=saver)

            async def ask(thread_id: str, text: str, expected: str) -> None:
                # Without a checkpointer LangGraph 1.2 fails on durability="sync".
                durability: dict[str, Any] = {"durability": "sync"} if saver else {}
                state = await agent.ainvoke(
                    {"messages": [{"role": "user", "content": text}]},
                    config={"configurable": {"thread_id": thread_id}}, **durability)
                check_answer("langgraph", final_text(state), expected)

            async def run_a(run_id: str) -> None:
                await ask(run_id, A_PROMPT, TOOL_ANSWER)

            async def conversation_b(conv_id: str) -> None:
                if saver is None:  # no checkpointer: the caller carries the history
                    messages: list[Any] = []
                    for text, expected in zip(B_MESSAGES, (TOOL_ANSWER, TOOL_ANSWER,
                                                           FINAL_ANSWER), strict=True):
                        state = await agent.ainvoke(
                            {"messages": [*messages, {"role": "user", "content": text}]})
                        check_answer("langgraph", final_text(state), expected)
                        messages = state["messages"]
                    return
                for text, expected in zip(B_MESSAGES, (TOOL_ANSWER, TOOL_ANSWER, FINAL_ANSWER),
                                          strict=True):
                    await ask(conv_id, text, expected)

            control = RawControl(args.base_url)
            stack.push_async_callback(control.aclose)
            return await measure(args, run_a, conversation_b, control.run_a)

    result = asyncio.run(bench())
    name = "langgraph" if args.mode == "sqlite" else "langgraph-memory"
    durable = ("sqlite checkpoint per superstep, durability='sync' (resumed by hand)"
               if args.mode == "sqlite" else "no (no checkpointer)")
    emit(record(name, importlib.metadata.version("langgraph"), args, result, durable=durable,
                langchain_openai=importlib.metadata.version("langchain-openai"),
                checkpoint_sqlite=importlib.metadata.version("langgraph-checkpoint-sqlite"),
                openai=importlib.metadata.version("openai"), **extra))


if __name__ == "__main__":
    main()
