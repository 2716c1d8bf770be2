"""An agent run on each store: the same conversation on SQLite and PostgreSQL, over
the openai client against the local server; a run resumed by a second app (a restart)
does not send the answered model call again."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from garrison import Garrison, RunStatus
from garrison.agents import Agent, FinalOutput, OpenAIModel, TextDelta, tool
from garrison.testing import LLMServer
from tests.pg import drop_schemas, fresh_postgres_url

SCRIPT: dict[str, Any] = {
    "rules": [
        {"last_role": "user", "tool_calls": [{"name": "hold", "arguments": {}}]},
        {"last_tool": "hold", "content": "All done after the hold."},
    ],
}


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/garrison.db"
    else:
        yield fresh_postgres_url()
        drop_schemas()


@pytest.fixture(scope="module")
def server() -> Iterator[LLMServer]:
    with LLMServer(SCRIPT) as running:
        yield running


async def test_agent_run_resumes_on_a_restarted_app_without_repaying(
        db_url: str, server: LLMServer) -> None:
    server.reset()
    release = asyncio.Event()
    entered = asyncio.Event()

    @tool
    async def hold() -> str:
        """Wait for the operator."""
        entered.set()
        await release.wait()
        return "released"

    def make_agent() -> Agent:
        return Agent("holder", model=OpenAIModel("m", base_url=server.openai_base_url,
                                                 api_key="t"), tools=[hold])

    first = Garrison(db_url, lease_ttl_s=1.0)
    before = make_agent()
    first.add_agent(before)
    async with first:
        await before.start(first, "please hold", run_id="conv")
        await entered.wait()  # the model answered (journaled); the tool is in flight
    assert len(server.requests()) == 1

    release.set()
    agent = make_agent()
    second = Garrison(db_url, lease_ttl_s=1.0)
    second.add_agent(agent)
    async with second:  # resumes the run by itself: the tool runs again, then one call
        res = await agent.result(second.handle("conv"))
        assert res.output == "All done after the hold."
        assert await second.handle("conv").status() is RunStatus.COMPLETED
    assert [r["messages"] for r in server.requests()] == [1, 3]  # turn 1 was not re-sent


async def test_agent_stream_on_each_backend(db_url: str, server: LLMServer) -> None:
    @tool
    async def hold() -> str:
        """No wait this time."""
        return "released"

    agent = Agent("streamer", model=OpenAIModel("m", base_url=server.openai_base_url,
                                                api_key="t"), tools=[hold])
    app = Garrison(db_url)
    app.add_agent(agent)
    async with app:
        events = [e async for e in agent.stream(app, "please hold", run_id="s")]
    assert isinstance(events[-1], FinalOutput)
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == \
        "All done after the hold."
