"""Streaming: typed events in order, reconnecting by offset, and no text shown twice
when a streamed model call runs again (a retry after a dropped stream)."""

from __future__ import annotations

import pytest

from garrison.agents import (
    Agent,
    AgentEvent,
    ApprovalRequested,
    FinalOutput,
    ScriptedModel,
    StreamReset,
    TextDelta,
    ToolCallEvent,
    ToolResultEvent,
    tool,
)
from garrison.errors import ProviderUnavailable
from garrison.resilience import Retry

from ._agents_support import StreamingScript, agent_app, call, unavailable
from ._support import CrashAt, ParkWatch


@tool
def add(a: int, b: int) -> int:
    """Add."""
    return a + b


def calc_agent(model: ScriptedModel | StreamingScript, **options: object) -> Agent:
    return Agent("calc", model=model, tools=[add], **options)  # type: ignore[arg-type]


def shown_text(events: list[AgentEvent]) -> str:
    """What a client displays: the text since the last reset."""
    text = ""
    for event in events:
        if isinstance(event, StreamReset):
            text = ""
        elif isinstance(event, TextDelta):
            text += event.text
    return text


async def test_stream_yields_tool_events_text_and_final_output_in_order(db_url: str) -> None:
    model = ScriptedModel([call("add", {"a": 2, "b": 3}, call_id="c1"), "The sum is 5"])
    agent = calc_agent(model)
    async with agent_app(db_url, agent) as app:
        events = [e async for e in agent.stream(app, "2+3?", run_id="s")]
    assert [type(e) for e in events] == [ToolCallEvent, ToolResultEvent, TextDelta,
                                         TextDelta, TextDelta, TextDelta, FinalOutput]
    tool_call, tool_result = events[0], events[1]
    assert isinstance(tool_call, ToolCallEvent)
    assert (tool_call.agent, tool_call.tool_call_id, tool_call.name) == ("calc", "c1", "add")
    assert tool_call.arguments == '{"a": 2, "b": 3}'
    assert isinstance(tool_result, ToolResultEvent)
    assert (tool_result.tool_call_id, tool_result.result, tool_result.is_error) == (
        "c1", "5", False)
    assert [e.text for e in events if isinstance(e, TextDelta)] == [
        "The ", "sum ", "is ", "5"]
    final = events[-1]
    assert isinstance(final, FinalOutput)
    assert final.result.output == "The sum is 5"
    offsets = [e.offset for e in events]
    assert offsets[:-1] == sorted(set(offsets[:-1]))
    assert final.offset == offsets[-2]


async def test_error_results_are_streamed_as_errors(db_url: str) -> None:
    model = ScriptedModel([call("add", {"a": "x", "b": 1}), "sorry"])
    agent = calc_agent(model)
    async with agent_app(db_url, agent) as app:
        events = [e async for e in agent.stream(app, "x", run_id="s")]
    results = [e for e in events if isinstance(e, ToolResultEvent)]
    assert len(results) == 1
    assert results[0].is_error
    assert results[0].result.startswith("Error: invalid arguments for add")


async def test_reconnect_after_an_offset_yields_exactly_the_rest(db_url: str) -> None:
    model = ScriptedModel([call("add", {"a": 1, "b": 1}), "one plus one is two"])
    agent = calc_agent(model)
    async with agent_app(db_url, agent) as app:
        events = [e async for e in agent.stream(app, "1+1?", run_id="re")]
        records = [r async for r in app.stream("re")]
        cut = events[2].offset  # the client saw the tool events and one piece of text
        rest = [r async for r in app.stream("re", after=cut)]
        resumed = [e async for e in agent.stream(app, "1+1?", run_id="re", after=cut)]
    assert [r.offset for r in records] == [e.offset for e in events[:-1]]
    assert [r.offset for r in rest] == [e.offset for e in events[3:-1]]
    assert resumed[:-1] == events[3:-1]
    assert isinstance(resumed[-1], FinalOutput)
    assert resumed[-1].result == events[-1].result  # type: ignore[union-attr]
    assert len(model.calls) == 2  # reconnecting is reading, not running again


async def test_a_run_started_without_streaming_publishes_nothing(db_url: str) -> None:
    agent = calc_agent(ScriptedModel(["quiet answer"]))
    async with agent_app(db_url, agent) as app:
        await agent.run(app, "x", run_id="q")
        records = [r async for r in app.stream("q")]
    assert records == []


async def test_approval_request_is_streamed(db_url: str) -> None:
    @tool(requires_approval=True)
    def wire(amount: int) -> str:
        """Wire money."""
        return "sent"

    model = ScriptedModel([call("wire", {"amount": 10}, call_id="w"), "done"])
    agent = Agent("bank", model=model, tools=[wire])
    watch = ParkWatch()
    async with agent_app(db_url, agent, hooks=[watch]) as app:
        stream = agent.stream(app, "wire 10", run_id="b")
        first = await anext(stream)
        second = await anext(stream)
        await watch.parked("b")
        await app.send("b", "approval", True)
        rest = [e async for e in stream]
    assert isinstance(first, ToolCallEvent)
    assert isinstance(second, ApprovalRequested)
    assert (second.tool_call_id, second.name, second.arguments) == ("w", "wire",
                                                                    '{"amount": 10}')
    assert [type(e) for e in rest] == [ToolResultEvent, TextDelta, FinalOutput]


async def test_retried_streamed_call_shows_the_text_once(db_url: str) -> None:
    model = StreamingScript([(["Hello ", "wor"], unavailable("streamer")),
                             (["Hello ", "world"], None)])
    agent = calc_agent(model, retry=Retry(max_attempts=2, base=0))
    async with agent_app(db_url, agent) as app:
        events = [e async for e in agent.stream(app, "greet", run_id="dup")]
    assert model.requests == 2
    assert not any(isinstance(e, StreamReset) for e in events)
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "Hello world"
    final = events[-1]
    assert isinstance(final, FinalOutput)
    assert final.result.output == "Hello world"


async def test_retried_call_that_answers_differently_resets_the_stream(db_url: str) -> None:
    model = StreamingScript([(["Hello ", "wor"], unavailable("streamer")),
                             (["Goodbye ", "now"], None)])
    agent = calc_agent(model, retry=Retry(max_attempts=2, base=0))
    async with agent_app(db_url, agent) as app:
        events = [e async for e in agent.stream(app, "greet", run_id="reset")]
    kinds = [type(e) for e in events]
    assert kinds == [TextDelta, TextDelta, StreamReset, TextDelta, TextDelta, FinalOutput]
    assert shown_text(events) == "Goodbye now"
    final = events[-1]
    assert isinstance(final, FinalOutput)
    assert final.result.output == "Goodbye now"


async def test_retry_that_repeats_a_shorter_prefix_then_diverges(db_url: str) -> None:
    model = StreamingScript([(["The answer ", "is 4"], unavailable("streamer")),
                             (["The ", "answer ", "was 5"], None)])
    agent = calc_agent(model, retry=Retry(max_attempts=2, base=0))
    async with agent_app(db_url, agent) as app:
        events = [e async for e in agent.stream(app, "q", run_id="div")]
    assert shown_text(events) == "The answer was 5"
    assert sum(isinstance(e, StreamReset) for e in events) == 1


async def test_stream_of_a_failed_run_raises_its_error_after_the_events(db_url: str) -> None:
    agent = Agent("down", model=ScriptedModel([unavailable("x", retryable=False)], name="x"))
    seen: list[AgentEvent] = []
    async with agent_app(db_url, agent) as app:
        with pytest.raises(ProviderUnavailable):
            async for event in agent.stream(app, "hi", run_id="s"):
                seen.append(event)
    assert seen == []


async def test_streamed_text_is_shown_once_after_a_crash_before_commit(db_url: str) -> None:
    model = ScriptedModel(default="one two three")
    agent = Agent("talk", model=model)
    crash = CrashAt("completed", 1)  # the model answered; the process dies before commit
    async with agent_app(db_url, agent, hooks=[crash]) as app:
        await agent.start(app, "hi", run_id="c", stream=True)
        await crash.crashed.wait()
    async with agent_app(db_url, agent) as app2:
        events = [e async for e in agent.stream(app2, "hi", run_id="c")]
    assert len(model.calls) == 2  # the model call ran again after the crash
    assert [e.text for e in events if isinstance(e, TextDelta)] == ["one ", "two ", "three"]
    assert isinstance(events[-1], FinalOutput)
