"""Telemetry never changes a run's outcome, and leaves the context as it found it:
content that cannot be captured is dropped (not the step), a step's span made current
inside the application's own span is not restored after it, and a retry policy that
raises or is cancelled still ends the attempt's span."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace

from garrison import Context, Garrison, RunStatus
from garrison.engine import annotate
from garrison.errors import WorkflowCancelled, WorkflowFailed
from garrison.observability import Instrumentation
from garrison.resilience import Retry
from tests.integration.observability.conftest import Telemetry


def _attrs(span: Any) -> dict[str, Any]:
    return dict(span.attributes or {})


def _no_leftovers(instrumentation: Instrumentation) -> None:
    tracing = instrumentation.tracing
    assert not (tracing._segments or tracing._steps or tracing._quiet or tracing._tool_calls
                or tracing._tool_spans or tracing._tool_waiting)


@pytest.mark.parametrize("step_spans", ["all", "notable"])
async def test_a_redactor_that_raises_drops_the_content_not_the_step(
        tmp_path: Path, telemetry: Telemetry, step_spans: str) -> None:
    app = Garrison(f"sqlite:///{tmp_path}/g.db")
    calls: list[str] = []

    def redact(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{**m, "parts": [{**p, "content": p["content"].upper()} for p in m["parts"]]}
                for m in messages]  # KeyError on a part without "content"

    @app.step(name="model")
    async def model() -> str:
        annotate(**{"gen_ai.operation.name": "chat", "gen_ai.request.model": "m",
                    "gen_ai.input.messages": [{"role": "user", "content": "hi"}]})
        calls.append("answered")  # the provider has answered (and been paid)
        annotate(**{"gen_ai.output.messages": [
            {"role": "assistant", "tool_calls": [{"id": "c1", "name": "f", "arguments": "{}"}]}]})
        return "ok"

    @app.workflow(name="ask")
    async def ask(ctx: Context) -> str:
        return await model()

    instrumentation = telemetry.attach(app, capture_content=True, redact=redact,
                                       step_spans=step_spans)
    async with app:
        handle = await app.start(ask, run_id="r")
        assert await handle.result(timeout=10) == "ok"
        assert await handle.status() is RunStatus.COMPLETED
    assert calls == ["answered"]
    chat = _attrs(telemetry.one("chat m"))
    assert json.loads(chat["gen_ai.input.messages"]) == [
        {"role": "user", "parts": [{"type": "text", "content": "HI"}]}]
    assert "gen_ai.output.messages" not in chat
    assert chat["garrison.content.dropped"] == ("gen_ai.output.messages: KeyError",)
    _no_leftovers(instrumentation)


async def test_every_content_attribute_is_captured_in_its_own_shape(
        tmp_path: Path, telemetry: Telemetry) -> None:
    seen: list[list[dict[str, Any]]] = []

    def redact(messages: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
        seen.append(messages)
        if messages[0]["role"] == "tool":
            return None  # the tool's result is never recorded
        return messages

    for capture in (False, True):
        app = Garrison(f"sqlite:///{tmp_path}/{capture}.db")

        @app.step(name="tool")
        async def tool() -> str:
            annotate(**{"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "weather",
                        "gen_ai.system_instructions": "You are a weather bot",
                        "gen_ai.tool.call.arguments": {"city": "Paris"},
                        "gen_ai.tool.call.result": "sunny"})
            return "sunny"

        @app.workflow(name="use")
        async def use(ctx: Context) -> str:
            return await tool()

        telemetry.attach(app, capture_content=capture, redact=redact)
        async with app:
            assert await (await app.start(use, run_id=f"r{capture}")).result(
                timeout=10) == "sunny"
    quiet, loud = (_attrs(s) for s in telemetry.named("step tool"))
    content = ("gen_ai.system_instructions", "gen_ai.tool.call.arguments",
               "gen_ai.tool.call.result")
    assert not any(key in quiet for key in content)
    assert json.loads(loud["gen_ai.system_instructions"]) == [
        {"type": "text", "content": "You are a weather bot"}]
    assert json.loads(loud["gen_ai.tool.call.arguments"]) == {"city": "Paris"}
    assert "gen_ai.tool.call.result" not in loud and "garrison.content.dropped" not in loud
    assert [m[0]["role"] for m in seen] == ["system", "assistant", "tool"]  # one redactor


@pytest.mark.parametrize("step_spans", ["all", "notable"])
async def test_a_step_annotating_inside_its_own_span_leaves_the_run_span_current(
        tmp_path: Path, telemetry: Telemetry, step_spans: str) -> None:
    app = Garrison(f"sqlite:///{tmp_path}/g.db")
    tracer = telemetry.tracer_provider.get_tracer("shop")
    current: list[str] = []

    @app.step(name="fetch")
    async def fetch() -> int:
        with tracer.start_as_current_span("shop.query"):
            annotate(**{"shop.rows": 5, "gen_ai.operation.name": "chat",
                        "gen_ai.request.model": "m"})  # a client span, made current too
        return 5

    @app.workflow(name="child")
    async def child(ctx: Context) -> int:
        return 1

    @app.workflow(name="parent")
    async def parent(ctx: Context) -> int:
        await fetch()
        current.append(getattr(trace.get_current_span(), "name", "?"))
        return await (await ctx.start_child(child)).result()

    instrumentation = telemetry.attach(app, step_spans=step_spans)
    async with app:
        assert await (await app.start(parent, run_id="p")).result(timeout=10) == 1
    assert current == ["invoke_workflow parent"]
    run = telemetry.one("invoke_workflow parent")
    child_run = telemetry.one("invoke_workflow child")
    assert child_run.parent is not None and child_run.parent.span_id == run.context.span_id
    _no_leftovers(instrumentation)


@dataclasses.dataclass(frozen=True)
class _SlowBudget(Retry):
    async def admit(self, error: BaseException) -> bool:  # a fleet budget: a store trip
        await asyncio.sleep(30)
        return True


def _broken_predicate(error: BaseException) -> bool:
    raise KeyError("bug in retry_on")


@pytest.mark.parametrize("step_spans", ["all", "notable"])
async def test_a_retry_policy_that_raises_or_is_cancelled_ends_the_attempt(
        tmp_path: Path, telemetry: Telemetry, step_spans: str) -> None:
    app = Garrison(f"sqlite:///{tmp_path}/g.db")
    attempts: list[str] = []
    failing = asyncio.Event()

    @app.step(name="budgeted", retry=_SlowBudget(max_attempts=3, base=0.0, cap=0.0))
    async def budgeted() -> None:
        attempts.append("budgeted")
        failing.set()
        raise ConnectionError("reset")

    @app.step(name="predicated",
              retry=Retry(max_attempts=3, base=0.0, cap=0.0, retry_on=_broken_predicate))
    async def predicated() -> None:
        attempts.append("predicated")
        raise ConnectionError("reset")

    @app.workflow(name="wa")
    async def wa(ctx: Context) -> None:
        await budgeted()

    @app.workflow(name="wb")
    async def wb(ctx: Context) -> None:
        await predicated()

    instrumentation = telemetry.attach(app, step_spans=step_spans)
    async with app:
        cancelled = await app.start(wa, run_id="a")
        failed = await app.start(wb, run_id="b")
        # the policy's bug fails the step with its own error, once, journaled
        with pytest.raises(WorkflowFailed, match="ConnectionError"):
            await failed.result(timeout=10)
        await failing.wait()
        await asyncio.sleep(0.05)  # in admit()
        await cancelled.cancel()
        with pytest.raises(WorkflowCancelled):
            await cancelled.result(timeout=10)
        steps = await app.store.load_journal("b")
    assert attempts.count("predicated") == 1
    assert [(s.name, s.status.value, s.attempts) for s in steps] == [
        ("predicated", "failed", 1)]
    (predicated_span,) = telemetry.named("step predicated")
    assert _attrs(predicated_span)["garrison.step.will_retry"] is False
    (budgeted_span,) = telemetry.named("step budgeted")
    assert [e.name for e in budgeted_span.events] == ["garrison.step.interrupted"]
    _no_leftovers(instrumentation)
