"""An agent used as a tool: the `execute_tool` span TracingHooks makes around the child
run, from the agent loop's two events (engine hooks driven directly)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from garrison.agents import Agent, ScriptedModel, _loop
from garrison.engine import EngineHooks, StepInfo
from garrison.errors import WorkflowFailed
from garrison.observability._content import no_redaction
from garrison.observability._tracing import TracingHooks
from garrison.store import RunRecord, RunStatus
from tests.unit._agents_support import agent_app, call

CALL = {"gen_ai.tool.name": "researcher", "gen_ai.tool.call.id": "call_1"}


def _setup() -> tuple[TracingHooks, InMemorySpanExporter, RunRecord]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    hooks = TracingHooks(provider.get_tracer("test"), worker_id="w", capture_content=False,
                         redact=no_redaction)
    child = RunRecord(run_id="p/1", workflow_name="agent:researcher", workflow_version="1",
                      status=RunStatus.PENDING, inputs="[]", created_at=1.0, updated_at=1.0,
                      parent_run_id="p")
    return hooks, exporter, child


def test_a_failed_agent_tool_call_is_an_error_span_the_child_run_is_under() -> None:
    hooks, exporter, child = _setup()
    hooks.run_event("p", None, "garrison.agent.tool_call", CALL)
    stored = hooks.trace_context(child)
    hooks.run_event("p", None, "garrison.agent.tool_result",
                    {**CALL, "error.type": "AgentToolError"})

    [span] = exporter.get_finished_spans()
    assert span.name == "execute_tool researcher"
    assert stored is not None
    assert stored.startswith(f"00-{span.context.trace_id:032x}-{span.context.span_id:016x}-")
    assert span.status.status_code is StatusCode.ERROR
    assert dict(span.attributes or {})["error.type"] == "AgentToolError"
    assert dict(span.attributes or {})["gen_ai.tool.call.id"] == "call_1"


def test_a_tool_span_ends_with_the_segment_and_a_plain_child_gets_none() -> None:
    hooks, exporter, child = _setup()
    hooks.run_event("p", None, "garrison.agent.tool_call", CALL)
    hooks.trace_context(child)
    hooks.run_detached("p")  # parked while the child runs: the span ends here
    assert [s.name for s in exporter.get_finished_spans()] == ["execute_tool researcher"]
    assert not hooks._tool_spans and not hooks._tool_calls
    hooks.trace_context(child)  # a child started without a tool call: no tool span
    assert len(exporter.get_finished_spans()) == 1


async def test_calls_made_at_once_in_several_tasks_get_a_span_each() -> None:
    hooks, exporter, child = _setup()
    first, second = asyncio.Event(), asyncio.Event()
    stored: dict[str, str | None] = {}

    async def delegate(call_id: str, mine: asyncio.Event, theirs: asyncio.Event,
                       error: str | None) -> None:
        call = {**CALL, "gen_ai.tool.call.id": call_id}
        hooks.run_event("p", None, "garrison.agent.tool_call", call)
        mine.set()
        await theirs.wait()  # both calls are made before either child starts
        stored[call_id] = hooks.trace_context(
            dataclasses.replace(child, run_id=f"p/{call_id}"))
        await asyncio.sleep(0)
        hooks.run_event("p", None, "garrison.agent.tool_result",
                        {**call, **({"error.type": error} if error else {})})

    await asyncio.gather(delegate("call_a", first, second, "AgentToolError"),
                         delegate("call_b", second, first, None))

    spans = {dict(s.attributes or {})["gen_ai.tool.call.id"]: s
             for s in exporter.get_finished_spans()}
    assert sorted(spans) == ["call_a", "call_b"]
    for call_id, span in spans.items():  # each child run is under its own call's span
        assert (stored[call_id] or "").startswith(
            f"00-{span.context.trace_id:032x}-{span.context.span_id:016x}-")
    assert spans["call_a"].status.status_code is StatusCode.ERROR
    assert spans["call_b"].status.status_code is StatusCode.UNSET
    assert not hooks._tool_spans and not hooks._tool_calls


def test_a_call_whose_child_never_started_leaves_nothing_behind() -> None:
    hooks, exporter, child = _setup()
    hooks.run_event("p", None, "garrison.agent.tool_call", CALL)
    hooks.run_event("p", None, "garrison.agent.tool_result", {**CALL, "error.type": "Boom"})
    assert not hooks._tool_calls and not hooks._tool_spans
    hooks.trace_context(child)  # a later plain child is not taken for the failed call
    assert exporter.get_finished_spans() == ()


class _Events(EngineHooks):
    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, object]]] = []

    def run_event(self, run_id: str, step: StepInfo | None, name: str,
                  attributes: Mapping[str, Any]) -> None:
        if name.startswith("garrison.agent."):
            self.seen.append((name, dict(attributes)))


async def test_an_agent_tool_whose_child_cannot_start_reports_the_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def cannot_start(*args: object) -> tuple[str, bool]:
        raise RuntimeError("the child could not be started")

    monkeypatch.setattr(_loop, "_run_child", cannot_start)
    researcher = Agent("researcher", model=ScriptedModel([]), instructions="You research.")
    lead = Agent("lead", model=ScriptedModel([call("researcher", {"input": "x?"},
                                                   call_id="d1")]),
                 tools=[researcher.as_tool()])
    events = _Events()
    async with agent_app(f"sqlite:///{tmp_path}/g.db", lead, hooks=[events]) as app:
        with pytest.raises(WorkflowFailed, match="could not be started"):
            await lead.run(app, "what is x?", run_id="lead-1")

    tool = {"gen_ai.tool.name": "researcher", "gen_ai.tool.call.id": "d1"}
    assert events.seen == [("garrison.agent.tool_call", tool),
                           ("garrison.agent.tool_result", {**tool, "error.type": "RuntimeError"})]


@pytest.mark.parametrize("ended_by", ["tool_result", "parent_detached"])
def test_a_tool_span_ends_after_the_child_segment_that_is_still_live_here(
        ended_by: str) -> None:
    # The child notifies its parent as its end becomes durable, then detaches: the
    # parent's tool result (or park) can come first. The call's span waits for the
    # child's segment, so it spans all the child's work.
    hooks, exporter, child = _setup()
    hooks.run_event("p", None, "garrison.agent.tool_call", CALL)
    child = dataclasses.replace(child, trace_context=hooks.trace_context(child))
    hooks.run_started(child)
    hooks.run_finished(child.run_id, RunStatus.COMPLETED)
    if ended_by == "tool_result":
        hooks.run_event("p", None, "garrison.agent.tool_result",
                        {**CALL, "error.type": "AgentToolError"})
    else:
        hooks.run_detached("p")
    assert exporter.get_finished_spans() == ()  # the child's segment is still open
    hooks.run_detached(child.run_id)
    segment, tool = exporter.get_finished_spans()
    assert (segment.name, tool.name) == ("invoke_agent researcher", "execute_tool researcher")
    assert segment.parent is not None and segment.parent.span_id == tool.context.span_id
    assert (tool.end_time or 0) >= (segment.end_time or 0)
    if ended_by == "tool_result":
        assert tool.status.status_code is StatusCode.ERROR
    assert not hooks._tool_spans and not hooks._tool_waiting
