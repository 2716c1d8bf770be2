"""The Anthropic messages API, through the official client: one script drives both APIs."""

from __future__ import annotations

from typing import Any

import anthropic
import openai

from garrison.testing import LLMServer

SCRIPT: dict[str, Any] = {"rules": [
    {"last_tool": "get_weather", "system_contains": "forecaster",
     "content": "Forecast: {last_tool_result}, as you asked about {last_user}"},
    {"last_role": "user", "last_user_contains": "weather", "has_tool": "get_weather",
     "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]},
]}
TOOLS: Any = [{"name": "get_weather", "description": "Weather for a city.",
               "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]


async def test_text_reply_with_usage(anthropic_client: anthropic.AsyncAnthropic) -> None:
    message = await anthropic_client.messages.create(
        model="claude-test", max_tokens=100, messages=[{"role": "user", "content": "hello"}])

    assert message.type == "message"
    assert message.role == "assistant"
    assert message.model == "claude-test"
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].type == "text" and message.content[0].text == "ok"
    assert message.stop_reason == "end_turn"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (2, 1)


async def test_tool_use_then_tool_result(server: LLMServer,
                                         anthropic_client: anthropic.AsyncAnthropic) -> None:
    server.set_script(SCRIPT)
    messages: list[Any] = [{"role": "user", "content": "weather in Paris?"}]

    first = await anthropic_client.messages.create(
        model="claude-test", max_tokens=100, system="You are a forecaster.",
        messages=messages, tools=TOOLS)

    assert first.stop_reason == "tool_use"
    block = first.content[0]
    assert block.type == "tool_use"
    assert block.name == "get_weather"
    assert block.input == {"city": "Paris"}

    messages += [
        {"role": "assistant", "content": [{"type": "tool_use", "id": block.id,
                                           "name": block.name, "input": block.input}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": block.id,
                                      "content": [{"type": "text", "text": "rain"}]}]},
    ]
    final = await anthropic_client.messages.create(
        model="claude-test", max_tokens=100,
        system=[{"type": "text", "text": "You are a forecaster."}], messages=messages,
        tools=TOOLS)

    assert final.stop_reason == "end_turn"
    assert final.content[0].type == "text"
    assert final.content[0].text == "Forecast: rain, as you asked about weather in Paris?"


async def test_stream_text_through_the_stream_helper(
        server: LLMServer, anthropic_client: anthropic.AsyncAnthropic) -> None:
    text = "Streaming works in many small pieces here."
    server.set_script({"rules": [{"content": text}]})

    async with anthropic_client.messages.stream(
            model="claude-test", max_tokens=100,
            messages=[{"role": "user", "content": "hi"}]) as stream:
        pieces = [piece async for piece in stream.text_stream]
        final = await stream.get_final_message()

    assert len(pieces) >= 4
    assert "".join(pieces) == text
    assert final.content[0].type == "text" and final.content[0].text == text
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 11  # ceil(42 / 4)


async def test_stream_tool_use_is_reassembled(server: LLMServer,
                                              anthropic_client: anthropic.AsyncAnthropic) -> None:
    server.set_script({"rules": [{"content": "Let me look.", "tool_calls": [
        {"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2]}}]}]})

    async with anthropic_client.messages.stream(
            model="claude-test", max_tokens=100, tools=TOOLS,
            messages=[{"role": "user", "content": "weather?"}]) as stream:
        final = await stream.get_final_message()

    assert [block.type for block in final.content] == ["text", "tool_use"]
    assert final.content[0].type == "text" and final.content[0].text == "Let me look."
    tool_use = final.content[1]
    assert tool_use.type == "tool_use"
    assert tool_use.input == {"city": "Paris", "days": [1, 2]}
    assert final.stop_reason == "tool_use"


async def test_raw_stream_events_in_order(server: LLMServer,
                                          anthropic_client: anthropic.AsyncAnthropic) -> None:
    server.set_script({"rules": [{"content": "a b c d e", "finish_reason": "length"}]})

    stream = await anthropic_client.messages.create(
        model="claude-test", max_tokens=5, stream=True,
        messages=[{"role": "user", "content": "hi"}])
    kinds = [event.type async for event in stream]

    assert kinds[0] == "message_start"
    assert kinds[-2:] == ["message_delta", "message_stop"]
    assert kinds.count("content_block_delta") >= 4
    assert kinds.count("content_block_start") == kinds.count("content_block_stop") == 1


async def test_max_tokens_stop_reason(server: LLMServer,
                                      anthropic_client: anthropic.AsyncAnthropic) -> None:
    server.set_script({"rules": [{"content": "cut", "finish_reason": "length"}]})

    message = await anthropic_client.messages.create(
        model="claude-test", max_tokens=1, messages=[{"role": "user", "content": "hi"}])

    assert message.stop_reason == "max_tokens"


async def test_same_conversation_has_one_fingerprint_on_both_apis(
        server: LLMServer, anthropic_client: anthropic.AsyncAnthropic,
        openai_client: openai.AsyncOpenAI) -> None:
    await openai_client.chat.completions.create(model="same", messages=[
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
    await anthropic_client.messages.create(model="same", max_tokens=10, system="be brief",
                                           messages=[{"role": "user", "content": "hi"}])

    first, second = server.requests()
    assert (first["api"], second["api"]) == ("openai", "anthropic")
    assert first["fingerprint"] == second["fingerprint"]
