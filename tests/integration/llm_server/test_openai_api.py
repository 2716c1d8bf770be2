"""The OpenAI chat completions API, through the official client."""

from __future__ import annotations

import json
from typing import Any

import openai

from garrison.testing import LLMServer

WEATHER_SCRIPT: dict[str, Any] = {"rules": [
    {"last_tool": "get_weather", "content": "It is {last_tool_result} in Paris."},
    {"last_user_contains": "weather", "has_tool": "get_weather",
     "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]},
]}
WEATHER_TOOL: Any = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object",
                                          "properties": {"city": {"type": "string"}}}}}


async def test_default_script_answers_ok_with_usage(openai_client: openai.AsyncOpenAI) -> None:
    reply = await openai_client.chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "hello there"}])

    assert reply.choices[0].message.content == "ok"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.model == "gpt-test"
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == 3  # ceil(11 chars / 4)
    assert reply.usage.completion_tokens == 1
    assert reply.usage.total_tokens == 4


async def test_tool_call_then_answer_from_tool_result(server: LLMServer,
                                                      openai_client: openai.AsyncOpenAI) -> None:
    server.set_script(WEATHER_SCRIPT)
    messages: list[Any] = [{"role": "user", "content": "What is the weather?"}]

    first = await openai_client.chat.completions.create(model="gpt-test", messages=messages,
                                                        tools=[WEATHER_TOOL])
    again = await openai_client.chat.completions.create(model="gpt-test", messages=messages,
                                                        tools=[WEATHER_TOOL])

    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert call.type == "function"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert call.id.startswith("call_") and call.id.endswith("_0")
    assert again.choices[0].message.tool_calls is not None
    assert again.choices[0].message.tool_calls[0].id == call.id  # deterministic ids

    messages += [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function",
             "function": {"name": "get_weather", "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
    ]
    final = await openai_client.chat.completions.create(model="gpt-test", messages=messages,
                                                        tools=[WEATHER_TOOL])
    assert final.choices[0].message.content == "It is sunny in Paris."
    assert final.choices[0].finish_reason == "stop"


async def test_times_rule_answers_at_most_n_times(server: LLMServer,
                                                  openai_client: openai.AsyncOpenAI) -> None:
    server.set_script({"rules": [{"times": 2, "content": "first two"}],
                       "default": {"content": "later"}})

    answers = [(await openai_client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}])).choices[0].message.content
        for _ in range(3)]

    assert answers == ["first two", "first two", "later"]


async def test_template_inserts_user_text_without_expanding_it(
        server: LLMServer, openai_client: openai.AsyncOpenAI) -> None:
    server.set_script({"rules": [{"content": "you said: {last_user}"}]})

    reply = await openai_client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "{last_tool_result} {0}"}])

    assert reply.choices[0].message.content == "you said: {last_tool_result} {0}"


async def test_rules_match_model_glob_system_and_tool_results(
        server: LLMServer, openai_client: openai.AsyncOpenAI) -> None:
    server.set_script({"rules": [
        {"model": "gpt-4*", "system_contains": "PIRATE", "content": "arr"},
        {"tool_results": 1, "last_role": "tool", "last_tool_result_contains": "SUNNY",
         "content": "one result"},
        {"model": "gpt-4*", "content": "plain four"},
    ]})

    pirate = await openai_client.chat.completions.create(model="gpt-4o", messages=[
        {"role": "system", "content": "you are a pirate"}, {"role": "user", "content": "hi"}])
    other = await openai_client.chat.completions.create(model="gpt-3.5", messages=[
        {"role": "system", "content": "you are a pirate"}, {"role": "user", "content": "hi"}])
    plain = await openai_client.chat.completions.create(model="gpt-4o", messages=[
        {"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    result = await openai_client.chat.completions.create(model="x", messages=[
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}])

    assert pirate.choices[0].message.content == "arr"
    assert other.choices[0].message.content == "ok"
    assert plain.choices[0].message.content == "plain four"
    assert result.choices[0].message.content == "one result"


async def test_scripted_usage_and_finish_reason(server: LLMServer,
                                                openai_client: openai.AsyncOpenAI) -> None:
    server.set_script({"rules": [{"content": "cut", "finish_reason": "length",
                                  "usage": {"input_tokens": 1000, "output_tokens": 7}}]})

    reply = await openai_client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=7)

    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens,
            reply.usage.total_tokens) == (1000, 7, 1007)


async def test_unknown_parameters_are_ignored(openai_client: openai.AsyncOpenAI) -> None:
    reply = await openai_client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], temperature=0.2,
        max_tokens=50, top_p=0.9, seed=3, user="u1", tool_choice="auto", tools=[WEATHER_TOOL],
        response_format={"type": "json_object"}, extra_body={"made_up": {"x": 1}})

    assert reply.choices[0].message.content == "ok"


async def test_stream_text_arrives_in_several_deltas_with_usage(
        server: LLMServer, openai_client: openai.AsyncOpenAI) -> None:
    text = "The quick brown fox jumps over the lazy dog."
    server.set_script({"rules": [{"content": text}]})

    stream = await openai_client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]

    deltas = [c.choices[0].delta.content for c in chunks
              if c.choices and c.choices[0].delta.content]
    assert len(deltas) >= 4
    assert "".join(deltas) == text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 11  # ceil(44 / 4)
    assert all(c.model == "m" for c in chunks)


async def test_short_stream_text_is_still_split(server: LLMServer,
                                                openai_client: openai.AsyncOpenAI) -> None:
    server.set_script({"rules": [{"content": "Hello"}]})

    stream = await openai_client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], stream=True)
    deltas = [c.choices[0].delta.content async for c in stream
              if c.choices and c.choices[0].delta.content]

    assert len(deltas) >= 3
    assert "".join(deltas) == "Hello"


async def test_stream_tool_calls_reassemble(server: LLMServer,
                                            openai_client: openai.AsyncOpenAI) -> None:
    server.set_script({"rules": [{"tool_calls": [
        {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}},
        {"name": "get_time", "arguments": "{\"tz\": \"Europe/Paris\"}"}]}]})

    stream = await openai_client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], stream=True)
    calls: dict[int, dict[str, str]] = {}
    finish = None
    async for chunk in stream:
        choice = chunk.choices[0]
        finish = choice.finish_reason or finish
        for piece in choice.delta.tool_calls or ():
            call = calls.setdefault(piece.index, {"id": "", "name": "", "arguments": ""})
            call["id"] += piece.id or ""
            if piece.function is not None:
                call["name"] += piece.function.name or ""
                call["arguments"] += piece.function.arguments or ""

    assert finish == "tool_calls"
    assert [c["name"] for c in calls.values()] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris", "unit": "celsius"}
    assert json.loads(calls[1]["arguments"]) == {"tz": "Europe/Paris"}
    assert calls[0]["id"].endswith("_0") and calls[1]["id"].endswith("_1")


async def test_models_lists_the_script_models(server: LLMServer,
                                              openai_client: openai.AsyncOpenAI) -> None:
    server.set_script({"rules": [{"model": "gpt-primary", "content": "a"},
                                 {"model": "gpt-*", "content": "b"}]})

    models = [m.id async for m in openai_client.models.list()]

    assert models == ["gpt-primary", "garrison-test"]
