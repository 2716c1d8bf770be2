"""Agents over real HTTP: the official openai and anthropic clients against the local
LLM server, with its faults. The provider code paths under test are the production ones.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from garrison import Garrison, RunStatus
from garrison.agents import (
    Agent,
    AnthropicModel,
    FinalOutput,
    OpenAIModel,
    TextDelta,
    ToolCallEvent,
    ToolResultEvent,
    tool,
)
from garrison.errors import (
    ContextTooLong,
    InvalidModelRequest,
    ProviderAuthError,
    ProviderRateLimited,
    ProviderUnavailable,
)
from garrison.resilience import CircuitBreaker, Retry
from garrison.store import StepKind
from garrison.testing import LLMServer

SCRIPT: dict[str, Any] = {
    "rules": [
        {"last_tool": "lookup_order", "last_tool_result_contains": "Error:",  # a repair
         "tool_calls": [{"name": "lookup_order", "arguments": {"order_id": "7"}}]},
        {"last_role": "user", "last_user_contains": "order",
         "tool_calls": [{"name": "lookup_order", "arguments": {"order_id": "7"}}]},
        {"last_tool": "lookup_order", "content": "Order 7 is {last_tool_result}."},
        {"last_user_contains": "json", "content": '{"order_id": "7", "status": "shipped"}'},
    ],
    "default": {"content": "Hello from the test server, answering in a few words."},
}


@tool
async def lookup_order(order_id: str) -> str:
    """Look up an order's status.

    Args:
        order_id: the order's id.
    """
    return "shipped"


class Status(BaseModel):
    order_id: str
    status: str


def fast_retry(attempts: int = 3) -> Retry:
    """The agents' default classification (retryable provider errors and timeouts),
    without the backoff."""
    return Retry(max_attempts=attempts, base=0.0, cap=0.0,
                 retry_on=lambda e: bool(getattr(e, "retryable", False))
                 or isinstance(e, TimeoutError))


@pytest.fixture(scope="module")
def server() -> Iterator[LLMServer]:
    with LLMServer(SCRIPT) as running:
        yield running


@pytest.fixture(autouse=True)
def clean(server: LLMServer) -> Iterator[None]:
    server.set_faults(None)
    server.reset()
    yield
    server.set_faults(None)


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[Garrison]:
    application = Garrison(f"sqlite:///{tmp_path}/g.db")
    async with application:
        yield application


def openai_model(server: LLMServer, name: str = "gpt-test", **kw: Any) -> OpenAIModel:
    return OpenAIModel(name, base_url=server.openai_base_url, api_key="sk-test-secret", **kw)


def anthropic_model(server: LLMServer, name: str = "claude-test") -> AnthropicModel:
    return AnthropicModel(name, base_url=server.anthropic_base_url, api_key="sk-ant-secret")


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_tool_call_then_answer_over_each_sdk(app: Garrison, server: LLMServer,
                                                   provider: str) -> None:
    model = openai_model(server) if provider == "openai" else anthropic_model(server)
    agent = Agent(f"support-{provider}", model=model, tools=[lookup_order])
    res = await agent.run(app, "where is order 7?", run_id="r1")
    assert res.output == "Order 7 is shipped."
    assert res.model == model.name and res.usage.model_calls == 2
    assert res.usage.input_tokens > 0 and res.usage.output_tokens > 0
    assert [r["api"] for r in server.requests()] == [provider, provider]


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_streamed_run_yields_deltas_tool_events_and_the_final_output(
        app: Garrison, server: LLMServer, provider: str) -> None:
    model = openai_model(server) if provider == "openai" else anthropic_model(server)
    agent = Agent(f"stream-{provider}", model=model, tools=[lookup_order])
    events = [e async for e in agent.stream(app, "where is order 7?", run_id="s1")]
    kinds = [type(e) for e in events]
    assert kinds[:2] == [ToolCallEvent, ToolResultEvent] and kinds[-1] is FinalOutput
    deltas = [e.text for e in events if isinstance(e, TextDelta)]
    assert len(deltas) >= 2 and "".join(deltas) == "Order 7 is shipped."
    assert all(r["stream"] for r in server.requests())
    offsets = [e.offset for e in events[:-1]]
    assert offsets == sorted(offsets)
    rest = [r.offset async for r in app.stream("s1", after=offsets[1])]
    assert rest == offsets[2:]  # a reconnect after the tool result sees exactly the rest


async def test_a_429_storm_is_retried_honouring_retry_after(app: Garrison,
                                                            server: LLMServer) -> None:
    server.set_faults("429:1x2@0.05")
    agent = Agent("storm", model=openai_model(server), retry=Retry(max_attempts=4, base=0.0,
                  retry_on=lambda e: bool(getattr(e, "retryable", False))))
    res = await agent.run(app, "hello", run_id="r1")
    assert res.output.startswith("Hello from the test server")
    assert [r["outcome"] for r in server.requests()] == ["status:429", "status:429", "ok"]
    [step] = [s for s in await app.store.load_journal("r1") if s.kind is StepKind.STEP]
    assert step.attempts == 3  # the retry waits were journaled: two failures, one answer


async def test_primary_down_falls_back_to_the_second_model_and_records_it(
        app: Garrison, server: LLMServer) -> None:
    server.set_faults("503:1/model=primary")
    agent = Agent("fallback", model=openai_model(server, "primary"),
                  fallback_models=[anthropic_model(server, "backup")], retry=fast_retry(2),
                  tools=[lookup_order])
    res = await agent.run(app, "where is order 7?", run_id="r1")
    assert res.output == "Order 7 is shipped."
    assert res.model == "anthropic:backup" and res.models_used == ["anthropic:backup"]
    assert res.fallbacks == ["openai:primary"]  # the rest of the run stayed on the backup
    outcomes = [(r["model"], r["outcome"]) for r in server.requests()]
    assert outcomes.count(("primary", "status:503")) == 2  # its first call's 2 attempts


async def test_without_a_fallback_the_run_fails_with_the_classified_error(
        app: Garrison, server: LLMServer) -> None:
    server.set_faults("500:1")
    agent = Agent("nofallback", model=openai_model(server), retry=fast_retry(2))
    with pytest.raises(ProviderUnavailable) as caught:
        await agent.run(app, "hello", run_id="r1")
    assert caught.value.retryable and caught.value.status == 500  # type: ignore[attr-defined]
    assert "openai model 'gpt-test'" in str(caught.value)
    assert await app.handle("r1").status() is RunStatus.QUARANTINED  # kept for a redrive


async def test_rate_limited_error_carries_retry_after_when_retries_run_out(
        app: Garrison, server: LLMServer) -> None:
    server.set_faults("429:1@7")
    agent = Agent("ratelimited", model=openai_model(server), retry=None)
    with pytest.raises(ProviderRateLimited) as caught:
        await agent.run(app, "hello", run_id="r1")
    assert caught.value.retry_after == 7.0  # type: ignore[attr-defined]


async def test_context_too_long_is_not_retried_and_moves_to_the_fallback(
        app: Garrison, server: LLMServer) -> None:
    server.set_faults("400:1/model=small/code=context_length_exceeded")
    agent = Agent("context", model=openai_model(server, "small"),
                  fallback_models=[openai_model(server, "large")], retry=fast_retry(3))
    res = await agent.run(app, "hello", run_id="r1")
    assert res.model == "openai:large"
    assert [r["model"] for r in server.requests()] == ["small", "large"]  # no retry of 400

    alone = Agent("context-alone", model=openai_model(server, "small"), retry=fast_retry(3))
    with pytest.raises(ContextTooLong):
        await alone.run(app, "hello", run_id="r2")


@pytest.mark.parametrize("spec", ["malformed:1x1", "reset:1x1", "truncate:1x1"])
async def test_unreadable_or_dropped_answers_are_retried(app: Garrison, server: LLMServer,
                                                         spec: str) -> None:
    server.set_faults(spec)
    agent = Agent(f"flaky-{spec.split(':')[0]}", model=openai_model(server),
                  retry=fast_retry(3))
    res = await agent.run(app, "hello", run_id="r1")
    assert res.output.startswith("Hello from the test server")
    assert len(server.requests()) == 2


async def test_a_stalled_stream_times_out_and_is_retried(app: Garrison,
                                                         server: LLMServer) -> None:
    server.set_faults("stall:1x1@30")
    agent = Agent("stalled", model=openai_model(server), model_timeout_s=0.5,
                  retry=fast_retry(2))
    events = [e async for e in agent.stream(app, "hello", run_id="r1")]
    final = events[-1]
    assert isinstance(final, FinalOutput)
    assert final.result.output.startswith("Hello from the test server")
    shown = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert shown == final.result.output  # the stalled attempt's text is not shown twice


async def test_invalid_tool_arguments_from_the_model_are_repaired(
        app: Garrison, server: LLMServer) -> None:
    server.set_faults("bad_args:1x1")
    agent = Agent("repair", model=openai_model(server), tools=[lookup_order])
    res = await agent.run(app, "where is order 7?", run_id="r1")
    assert res.output == "Order 7 is shipped."
    errors = [m for m in res.messages if m.role == "tool" and m.is_error]
    assert len(errors) == 1 and "not valid JSON" in (errors[0].content or "")


async def test_structured_output_over_http(app: Garrison, server: LLMServer) -> None:
    agent = Agent("structured", model=openai_model(server), output_type=Status)
    res = await agent.run(app, "answer in json", run_id="r1")
    assert res.output == Status(order_id="7", status="shipped")


async def test_credentials_never_reach_the_journal(app: Garrison, server: LLMServer) -> None:
    agent = Agent("secret", model=openai_model(server), tools=[lookup_order])
    await agent.run(app, "where is order 7?", run_id="r1")
    journal = await app.store.load_journal("r1")
    text = json.dumps([[s.inputs, s.output, s.error] for s in journal])
    assert "sk-test-secret" not in text and "openai:gpt-test" in text
    assert "sk-test-secret" not in repr(agent.models[0])


async def test_auth_and_bad_requests_are_not_retried(app: Garrison, server: LLMServer) -> None:
    server.set_faults("401:1")
    agent = Agent("auth", model=openai_model(server), retry=fast_retry(3))
    with pytest.raises(ProviderAuthError, match="check the API key"):
        await agent.run(app, "hello", run_id="r1")
    server.set_faults("404:1")
    other = Agent("notfound", model=openai_model(server), retry=fast_retry(3))
    with pytest.raises(InvalidModelRequest):
        await other.run(app, "hello", run_id="r2")
    assert len(server.requests()) == 2  # one attempt each


async def test_an_open_breaker_sends_calls_straight_to_the_fallback(
        app: Garrison, server: LLMServer) -> None:
    server.set_faults("503:1/model=primary")
    breaker = CircuitBreaker("llm", window=2, min_calls=2, failure_rate=0.5,
                             wait_open=3600)
    agent = Agent("breaker", model=openai_model(server, "primary"),
                  fallback_models=[openai_model(server, "backup")], retry=fast_retry(3),
                  breaker=breaker)
    for n in range(3):
        res = await agent.run(app, "hello", run_id=f"r{n}")
        assert res.model == "openai:backup"
    assert breaker.for_key("openai:primary").state == "OPEN"
    assert breaker.for_key("openai:backup").state == "CLOSED"
    # Two failures opened it; the third attempt and the later runs never reached it.
    assert [r["model"] for r in server.requests()].count("primary") == 2


async def test_a_configured_client_is_used_as_given(app: Garrison, server: LLMServer) -> None:
    import openai

    client = openai.AsyncOpenAI(base_url=server.openai_base_url, api_key="own",
                                max_retries=0, default_headers={"x-team": "support"})
    agent = Agent("ownclient", model=OpenAIModel("gpt-test", client=client))
    res = await agent.run(app, "hello", run_id="r1")
    assert res.output.startswith("Hello from the test server")
    assert len(server.requests()) == 1


async def test_a_429_storm_over_many_conversations_loses_none(
        app: Garrison, server: LLMServer) -> None:
    server.set_faults("429:0.4@0.01,latency:1-5ms")
    agent = Agent("crowd", model=openai_model(server, "primary"),
                  fallback_models=[openai_model(server, "backup")], tools=[lookup_order],
                  retry=Retry(max_attempts=6, base=0.01, cap=0.05,
                              retry_on=lambda e: bool(getattr(e, "retryable", False))))
    handles = [await agent.start(app, f"where is order 7? ({n})", run_id=f"c{n}")
               for n in range(30)]
    results = [await agent.result(h) for h in handles]
    assert all(r.output == "Order 7 is shipped." for r in results)
    outcomes = [r["outcome"] for r in server.requests()]
    assert outcomes.count("status:429") > 10  # it was a storm
    assert outcomes.count("ok") == 60  # two answered calls per conversation, none twice
