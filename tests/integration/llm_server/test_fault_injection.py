"""Each injected fault surfaces in the official clients as the error a real outage gives."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx2
import openai
import pytest

from garrison.testing import Fault, LLMServer
from tests.integration.llm_server._http import openai_http_client

HI: Any = [{"role": "user", "content": "hi"}]
# Only the read is short: a connect slowed by a loaded CI machine must not time out.
READ_ONLY_SHORT = httpx2.Timeout(10.0, read=0.2)
TOOL_SCRIPT: dict[str, Any] = {"rules": [{"content": "one two three four five", "tool_calls": [
    {"name": "lookup", "arguments": {"order_id": "42", "fields": ["status", "eta"]}}]}]}


async def test_429_is_a_rate_limit_error_with_retry_after(
        server: LLMServer, openai_client: openai.AsyncOpenAI) -> None:
    server.set_faults("429:1@1.5")

    with pytest.raises(openai.RateLimitError) as caught:
        await openai_client.chat.completions.create(model="m", messages=HI)

    assert caught.value.status_code == 429
    assert caught.value.response.headers["retry-after"] == "1.5"
    assert caught.value.response.headers["retry-after-ms"] == "1500"
    assert caught.value.code == "rate_limit_exceeded"


async def test_429_on_anthropic_has_its_error_shape(
        server: LLMServer, anthropic_client: anthropic.AsyncAnthropic) -> None:
    server.set_faults("429:1@2")

    with pytest.raises(anthropic.RateLimitError) as caught:
        await anthropic_client.messages.create(model="c", max_tokens=5, messages=HI)

    assert caught.value.response.headers["retry-after"] == "2"
    assert caught.value.response.json() == {"type": "error", "error": {
        "type": "rate_limit_error",
        "message": "garrison llm-server: injected fault: HTTP 429 for model 'c'"}}


async def test_500_and_503_are_internal_server_errors(
        server: LLMServer, openai_client: openai.AsyncOpenAI,
        anthropic_client: anthropic.AsyncAnthropic) -> None:
    server.set_faults("500:1x1,503:1x2")

    with pytest.raises(openai.InternalServerError) as first:
        await openai_client.chat.completions.create(model="m", messages=HI)
    with pytest.raises(openai.InternalServerError) as second:
        await openai_client.chat.completions.create(model="m", messages=HI)
    with pytest.raises(anthropic.InternalServerError) as third:
        await anthropic_client.messages.create(model="c", max_tokens=5, messages=HI)

    assert (first.value.status_code, second.value.status_code) == (500, 503)
    assert third.value.status_code == 503
    assert third.value.response.json()["error"]["type"] == "overloaded_error"


async def test_context_length_exceeded_is_a_bad_request_with_its_code(
        server: LLMServer, openai_client: openai.AsyncOpenAI,
        anthropic_client: anthropic.AsyncAnthropic) -> None:
    server.set_faults([{"kind": "status", "status": 400,
                        "error_code": "context_length_exceeded"}])

    with pytest.raises(openai.BadRequestError) as caught:
        await openai_client.chat.completions.create(model="m", messages=HI)
    with pytest.raises(anthropic.BadRequestError) as anthropic_caught:
        await anthropic_client.messages.create(model="c", max_tokens=5, messages=HI)

    assert caught.value.code == "context_length_exceeded"
    error = anthropic_caught.value.response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert "prompt is too long" in error["message"]


async def test_reset_is_a_connection_error(server: LLMServer,
                                           openai_client: openai.AsyncOpenAI,
                                           anthropic_client: anthropic.AsyncAnthropic) -> None:
    server.set_faults("reset")

    with pytest.raises(openai.APIConnectionError) as caught:
        await openai_client.chat.completions.create(model="m", messages=HI)
    with pytest.raises(anthropic.APIConnectionError) as anthropic_caught:
        await anthropic_client.messages.create(model="c", max_tokens=5, messages=HI)

    assert not isinstance(caught.value, openai.APITimeoutError)
    assert not isinstance(anthropic_caught.value, anthropic.APITimeoutError)
    assert [r["outcome"] for r in server.requests()] == ["reset", "reset"]


async def test_timeout_trips_the_client_timeout(server: LLMServer) -> None:
    server.set_faults("timeout:1@30")
    client = openai.AsyncOpenAI(base_url=server.openai_base_url, api_key="test",
                                max_retries=0, timeout=READ_ONLY_SHORT,
                                http_client=openai_http_client())
    try:
        with pytest.raises(openai.APITimeoutError):
            await client.chat.completions.create(model="m", messages=HI)
    finally:
        await client.close()
    assert server.requests()[0]["outcome"] == "timeout"


async def test_malformed_body_and_stream_fail_to_decode(
        server: LLMServer, openai_client: openai.AsyncOpenAI,
        anthropic_client: anthropic.AsyncAnthropic) -> None:
    server.set_faults("malformed")

    with pytest.raises(json.JSONDecodeError):
        await openai_client.chat.completions.create(model="m", messages=HI)
    stream = await openai_client.chat.completions.create(model="m", messages=HI, stream=True)
    with pytest.raises(json.JSONDecodeError):
        async for _ in stream:
            pass
    with pytest.raises(json.JSONDecodeError):
        async with anthropic_client.messages.stream(model="c", max_tokens=5,
                                                    messages=HI) as anthropic_stream:
            await anthropic_stream.get_final_message()


async def test_truncated_answer_is_a_connection_error(
        server: LLMServer, openai_client: openai.AsyncOpenAI) -> None:
    server.set_faults("truncate")

    with pytest.raises(openai.APIConnectionError):
        await openai_client.chat.completions.create(model="m", messages=HI)


async def test_truncated_stream_never_finishes(server: LLMServer,
                                               openai_client: openai.AsyncOpenAI,
                                               anthropic_client: anthropic.AsyncAnthropic
                                               ) -> None:
    server.set_script({"rules": [{"content": "a long answer cut off in the middle"}]})
    server.set_faults("truncate")

    received: list[str] = []
    stream = await openai_client.chat.completions.create(model="m", messages=HI, stream=True)
    with pytest.raises((openai.APIConnectionError, httpx2.RemoteProtocolError)):
        async for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")
            assert chunk.choices[0].finish_reason is None
    with pytest.raises((anthropic.APIConnectionError, httpx2.RemoteProtocolError)):
        async with anthropic_client.messages.stream(model="c", max_tokens=5,
                                                    messages=HI) as anthropic_stream:
            await anthropic_stream.get_final_message()

    assert 0 < len("".join(received)) < len("a long answer cut off in the middle")


async def test_short_stall_delays_a_stream_that_then_completes(
        server: LLMServer, openai_client: openai.AsyncOpenAI) -> None:
    text = "it pauses midway and then goes on"
    server.set_script({"rules": [{"content": text}]})
    server.set_faults("stall:1@0.05")

    stream = await openai_client.chat.completions.create(model="m", messages=HI, stream=True)
    pieces = [c.choices[0].delta.content or "" async for c in stream]

    assert "".join(pieces) == text
    assert server.requests()[0]["outcome"] == "stall"


async def test_long_stall_trips_the_read_timeout(server: LLMServer) -> None:
    server.set_faults("stall:1@30")
    client = openai.AsyncOpenAI(base_url=server.openai_base_url, api_key="test",
                                max_retries=0, timeout=READ_ONLY_SHORT,
                                http_client=openai_http_client())
    try:
        stream = await client.chat.completions.create(model="m", messages=HI, stream=True)
        with pytest.raises((openai.APITimeoutError, httpx2.ReadTimeout)):
            async for _ in stream:
                pass
    finally:
        await client.close()


async def test_bad_args_makes_tool_arguments_invalid_json(
        server: LLMServer, openai_client: openai.AsyncOpenAI,
        anthropic_client: anthropic.AsyncAnthropic) -> None:
    server.set_script(TOOL_SCRIPT)
    server.set_faults("bad_args")

    plain = await openai_client.chat.completions.create(model="m", messages=HI)
    stream = await openai_client.chat.completions.create(model="m", messages=HI, stream=True)
    streamed = "".join([c.choices[0].delta.tool_calls[0].function.arguments or ""
                        async for c in stream if c.choices[0].delta.tool_calls
                        and c.choices[0].delta.tool_calls[0].function])
    message = await anthropic_client.messages.create(model="c", max_tokens=5, messages=HI)

    assert plain.choices[0].message.tool_calls is not None
    call = plain.choices[0].message.tool_calls[0]
    assert call.type == "function"
    for arguments in (call.function.arguments, streamed):
        with pytest.raises(json.JSONDecodeError):
            json.loads(arguments)
    tool_use = message.content[-1]
    assert tool_use.type == "tool_use"
    assert not isinstance(tool_use.input, dict)  # Anthropic's input: the text, not an object
    with pytest.raises(ValueError, match="Unable to parse tool parameter JSON"):
        async with anthropic_client.messages.stream(model="c", max_tokens=5,
                                                    messages=HI) as anthropic_stream:
            await anthropic_stream.get_final_message()
    assert {r["outcome"] for r in server.requests()} == {"bad_args"}


async def test_bad_args_leaves_a_reply_without_tool_calls_alone(
        server: LLMServer, openai_client: openai.AsyncOpenAI) -> None:
    server.set_faults("bad_args")

    reply = await openai_client.chat.completions.create(model="m", messages=HI)

    assert reply.choices[0].message.content == "ok"
    assert server.requests()[0]["outcome"] == "ok"


async def test_latency_combines_with_another_fault(server: LLMServer,
                                                   openai_client: openai.AsyncOpenAI) -> None:
    server.set_faults("latency:1-2ms,503:1x1")

    with pytest.raises(openai.InternalServerError):
        await openai_client.chat.completions.create(model="m", messages=HI)
    reply = await openai_client.chat.completions.create(model="m", messages=HI)

    assert reply.choices[0].message.content == "ok"
    assert [(r["outcome"], r["faults"]) for r in server.requests()] == [
        ("status:503", ["latency", "status:503"]), ("ok", ["latency"])]


async def test_count_limits_a_fault_then_requests_succeed(
        server: LLMServer, openai_client: openai.AsyncOpenAI) -> None:
    server.set_faults("503:1x3")

    outcomes = []
    for _ in range(5):
        try:
            await openai_client.chat.completions.create(model="m", messages=HI)
            outcomes.append("ok")
        except openai.InternalServerError:
            outcomes.append("503")

    assert outcomes == ["503", "503", "503", "ok", "ok"]


async def test_model_and_api_filters(server: LLMServer, openai_client: openai.AsyncOpenAI,
                                     anthropic_client: anthropic.AsyncAnthropic) -> None:
    server.set_faults([Fault("status", status=503, model="gpt-primary"),
                       Fault("status", status=429, api="anthropic")])

    with pytest.raises(openai.InternalServerError):
        await openai_client.chat.completions.create(model="gpt-primary", messages=HI)
    backup = await openai_client.chat.completions.create(model="gpt-backup", messages=HI)
    with pytest.raises(anthropic.RateLimitError):
        await anthropic_client.messages.create(model="gpt-backup", max_tokens=5, messages=HI)

    assert backup.choices[0].message.content == "ok"


async def test_a_reply_lost_to_a_fault_does_not_spend_a_times_rule(
        server: LLMServer, openai_client: openai.AsyncOpenAI) -> None:
    server.set_script({"rules": [{"times": 1, "content": "the one answer"}],
                       "default": {"content": "spent"}})
    server.set_faults("malformed:1x1,truncate:1x1,503:1x1")

    for _ in range(3):
        with pytest.raises((json.JSONDecodeError, openai.APIError)):
            await openai_client.chat.completions.create(model="m", messages=HI)
    first = await openai_client.chat.completions.create(model="m", messages=HI)
    second = await openai_client.chat.completions.create(model="m", messages=HI)

    assert first.choices[0].message.content == "the one answer"
    assert second.choices[0].message.content == "spent"
    assert [r["outcome"] for r in server.requests()] == [
        "malformed", "truncate", "status:503", "ok", "ok"]
