"""Spans of agent runs over real HTTP (the local LLM server): GenAI names and attributes,
handoffs, tools, agents as tools (child runs), a crash and resume, the outbound
`traceparent`, and content capture."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind

from garrison import Garrison
from garrison.agents import Agent, OpenAIModel, tool
from garrison.testing import LLMServer
from tests.integration.observability.conftest import Telemetry

SCRIPT: dict[str, Any] = {
    "rules": [
        {"system_contains": "researcher", "content": "Research says: all good."},
        {"system_contains": "triage", "last_role": "user",
         "tool_calls": [{"name": "transfer_to_support", "arguments": {}}]},
        {"system_contains": "support", "last_tool": "transfer_to_support",
         "tool_calls": [{"name": "lookup_order", "arguments": {"order_id": "7"}}]},
        {"system_contains": "support", "last_tool": "lookup_order",
         "tool_calls": [{"name": "researcher", "arguments": {"input": "Is order 7 ok?"}}]},
        {"system_contains": "support", "last_tool": "researcher",
         "content": "Order 7 is {last_tool_result}"},
    ],
    "default": {"content": "Hello, secret-customer-42."},
}

gate: dict[str, asyncio.Event] = {}


@tool
async def lookup_order(order_id: str) -> str:
    """Look up an order.

    Args:
        order_id: the order's id.
    """
    gate["entered"].set()
    await gate["release"].wait()
    return "shipped"


@pytest.fixture(scope="module")
def server() -> Iterator[LLMServer]:
    with LLMServer(SCRIPT) as running:
        yield running


@pytest.fixture(autouse=True)
def fresh(server: LLMServer) -> None:
    server.reset()
    gate["entered"], gate["release"] = asyncio.Event(), asyncio.Event()


class Outbound:
    """Requests the openai SDK sends, seen through an httpx event hook."""

    def __init__(self) -> None:
        self.headers: list[httpx.Headers] = []

    async def record(self, request: httpx.Request) -> None:
        self.headers.append(request.headers)

    def model(self, server: LLMServer) -> OpenAIModel:
        http = httpx.AsyncClient(event_hooks={"request": [self.record]})
        client = openai.AsyncOpenAI(api_key="sk-test", base_url=server.openai_base_url,
                                    max_retries=0, http_client=http)
        return OpenAIModel("gpt-test", client=client)


def agents(model: OpenAIModel) -> Agent:
    researcher = Agent("researcher", model=model, instructions="You are the researcher.")
    support = Agent("support", model=model, instructions="You are support.",
                    tools=[lookup_order, researcher.as_tool()])
    return Agent("triage", model=model, instructions="You are triage.", handoffs=[support])


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


# An agent's steps are model and tool calls, which annotate themselves: with
# step_spans="notable" its trace is the same span for span.
@pytest.mark.parametrize("step_spans", ["all", "notable"])
async def test_multi_agent_run_with_a_crash_is_one_trace_with_genai_spans(
        tmp_path: Path, server: LLMServer, telemetry: Telemetry, step_spans: str) -> None:
    outbound = Outbound()
    triage = agents(outbound.model(server))
    url = f"sqlite:///{tmp_path}/g.db"
    first = Garrison(url, worker_id="w-first")
    telemetry.attach(first, step_spans=step_spans)
    async with first:
        await triage.start(first, "where is order 7?", run_id="conv")
        await asyncio.wait_for(gate["entered"].wait(), 10)
    gate["release"].set()  # the tool was interrupted by the close; it runs again
    second = Garrison(url, worker_id="w-second")
    second.add_agent(triage)  # registered before the worker starts, so it resumes the run
    telemetry.attach(second, step_spans=step_spans)
    async with second:
        result = await asyncio.wait_for(triage.result(second.handle("conv")), 20)
    assert result.output == "Order 7 is Research says: all good."

    spans = telemetry.spans()
    assert len({s.context.trace_id for s in spans}) == 1  # crash, resume, child: one trace
    by_id = {s.context.span_id: s for s in spans}
    segments = sorted(telemetry.named("invoke_agent triage"), key=lambda s: s.start_time or 0)
    assert len(segments) >= 2
    crashed, resumed = segments[0], segments[1]
    assert attrs(crashed)["garrison.worker"] == "w-first"
    assert attrs(crashed)["gen_ai.operation.name"] == "invoke_agent"
    assert attrs(crashed)["gen_ai.agent.name"] == "triage"
    assert attrs(crashed)["garrison.run.outcome"] == "released"
    assert attrs(resumed)["garrison.worker"] == "w-second"
    assert attrs(resumed)["garrison.run.resumed"] is True
    assert attrs(resumed)["garrison.run.replayed_entries"] >= 2
    assert resumed.links and resumed.links[0].context.span_id == crashed.parent.span_id  # type: ignore[union-attr]

    chats = telemetry.named("chat gpt-test")
    assert chats and all(c.kind is SpanKind.CLIENT for c in chats)
    first_chat = min(chats, key=lambda s: s.start_time or 0)
    a = attrs(first_chat)
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.provider.name"] == "openai"
    assert a["gen_ai.request.model"] == "gpt-test" and a["gen_ai.response.model"]
    assert a["gen_ai.usage.input_tokens"] > 0 and a["gen_ai.usage.output_tokens"] > 0
    assert a["gen_ai.response.finish_reasons"] == ("tool_calls",)
    assert "gen_ai.input.messages" not in a and "gen_ai.output.messages" not in a
    step = by_id[first_chat.parent.span_id]  # type: ignore[union-attr]
    assert step.name == "step agent.triage.model" and by_id[step.parent.span_id] is crashed  # type: ignore[union-attr]

    tools = sorted(telemetry.named("execute_tool lookup_order"), key=lambda s: s.start_time or 0)
    assert len(tools) == 2  # interrupted by the close, then run again after the resume
    assert [e.name for e in tools[0].events] == ["garrison.step.interrupted"]
    assert by_id[tools[0].parent.span_id] is crashed  # type: ignore[union-attr]
    assert by_id[tools[1].parent.span_id] is resumed  # type: ignore[union-attr]
    assert attrs(tools[1])["gen_ai.tool.name"] == "lookup_order"
    assert attrs(tools[1])["gen_ai.tool.call.id"]

    [child] = telemetry.named("invoke_agent researcher")  # the agent used as a tool
    delegated = by_id[child.parent.span_id]  # type: ignore[union-attr]
    assert delegated.name.startswith("execute_tool ") and delegated.end_time is not None
    d = attrs(delegated)
    assert d["gen_ai.operation.name"] == "execute_tool" and d["gen_ai.tool.type"] == "agent"
    assert d["gen_ai.tool.call.id"] and delegated.name == f"execute_tool {d['gen_ai.tool.name']}"
    assert by_id[delegated.parent.span_id] in segments  # type: ignore[union-attr]
    assert (delegated.end_time or 0) >= (child.end_time or 0)  # it spans the child's work
    assert attrs(child)["garrison.run.parent_id"] == "conv"
    [child_chat] = [c for c in chats if by_id[by_id[c.parent.span_id].parent.span_id]  # type: ignore[union-attr]
                    is child]
    assert attrs(child_chat)["gen_ai.agent.name"] == "researcher"

    # Every model request carried the W3C traceparent of its chat span.
    sent = [h.get("traceparent") for h in outbound.headers]
    assert len(sent) == len(chats) and all(sent)
    expected = {f"00-{c.context.trace_id:032x}-{c.context.span_id:016x}-"
                f"{int(c.context.trace_flags):02x}" for c in chats}
    assert set(sent) == expected


async def test_prompts_are_not_captured_unless_asked_and_then_redacted(
        tmp_path: Path, server: LLMServer, telemetry: Telemetry) -> None:
    seen: list[list[dict[str, Any]]] = []

    def redact(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        seen.append(messages)
        text = json.dumps(messages).replace("secret-customer-42", "[REDACTED]")
        redacted: list[dict[str, Any]] = json.loads(text)
        return redacted

    model = OpenAIModel("gpt-test", base_url=server.openai_base_url, api_key="sk-test")
    for capture, name in ((False, "quiet"), (True, "loud")):
        app = Garrison(f"sqlite:///{tmp_path}/{name}.db")
        telemetry.attach(app, capture_content=capture, redact=redact)
        agent = Agent(name, model=model, instructions="Be brief.")
        async with app:
            await agent.run(app, "hi, I am secret-customer-42", run_id="r")
    quiet, loud = (next(s for s in telemetry.named("chat gpt-test")
                    if attrs(s)["gen_ai.agent.name"] == name) for name in ("quiet", "loud"))
    assert not any(k in attrs(quiet) for k in ("gen_ai.input.messages",
                                               "gen_ai.output.messages"))
    assert len(seen) == 2  # input and output of the one captured call
    inputs = json.loads(attrs(loud)["gen_ai.input.messages"])
    outputs = json.loads(attrs(loud)["gen_ai.output.messages"])
    assert inputs[0] == {"role": "system", "parts": [{"type": "text", "content": "Be brief."}]}
    assert inputs[1]["parts"][0]["content"] == "hi, I am [REDACTED]"
    assert outputs == [{"role": "assistant",
                        "parts": [{"type": "text", "content": "Hello, [REDACTED]."}]}]
    assert "secret-customer-42" not in json.dumps([attrs(s) for s in telemetry.spans()])


async def test_an_anthropic_call_is_a_chat_span_and_sends_its_traceparent(
        tmp_path: Path, server: LLMServer, telemetry: Telemetry) -> None:
    import anthropic

    from garrison.agents import AnthropicModel

    outbound = Outbound()
    http = httpx.AsyncClient(event_hooks={"request": [outbound.record]})
    client = anthropic.AsyncAnthropic(api_key="sk-ant-test", base_url=server.anthropic_base_url,
                                      max_retries=0, http_client=http)
    agent = Agent("helper", model=AnthropicModel("claude-test", client=client),
                  instructions="Be brief.")
    app = Garrison(f"sqlite:///{tmp_path}/g.db")
    telemetry.attach(app)
    async with app:
        result = await agent.run(app, "hello", run_id="a")
    assert result.output == "Hello, secret-customer-42."

    [chat] = telemetry.named("chat claude-test")
    a = attrs(chat)
    assert chat.kind is SpanKind.CLIENT
    assert (a["gen_ai.operation.name"], a["gen_ai.provider.name"]) == ("chat", "anthropic")
    assert a["gen_ai.request.model"] == "claude-test" and a["gen_ai.response.model"]
    assert a["gen_ai.usage.input_tokens"] > 0 and a["gen_ai.usage.output_tokens"] > 0
    assert a["gen_ai.response.finish_reasons"] == ("stop",)  # end_turn, normalised
    [agent_span] = telemetry.named("invoke_agent helper")
    assert chat.context.trace_id == agent_span.context.trace_id
    [sent] = [h.get("traceparent") for h in outbound.headers]
    assert sent == (f"00-{chat.context.trace_id:032x}-{chat.context.span_id:016x}-"
                    f"{int(chat.context.trace_flags):02x}")
