"""An agent used as a tool: the `execute_tool` span TracingHooks makes around the child
run, from the agent loop's two events (engine hooks driven directly)."""

from __future__ import annotations

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from garrison.observability._content import no_redaction
from garrison.observability._tracing import TracingHooks
from garrison.store import RunRecord, RunStatus

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
