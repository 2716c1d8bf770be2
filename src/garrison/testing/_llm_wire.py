"""The LLM server's two wire formats: OpenAI chat completions and Anthropic messages.

Each wire parses a request body into a `Call` (the neutral OpenAI chat shape the script
reads; Anthropic messages and tools are converted), and renders a `ScriptedReply` as a
completion, as server-sent events (split into pieces, as a real stream arrives), or as
its API's error body.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from garrison.testing._script import ScriptedReply, ScriptedToolCall, fingerprint, flatten_text

__all__ = ["AnthropicWire", "BadRequest", "Call", "OpenAIWire", "Wire", "break_arguments"]


@dataclass(frozen=True, slots=True)
class Call:
    """One chat request, in the neutral (OpenAI chat) shape the script reads."""

    api: str
    model: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]]
    stream: bool
    include_usage: bool
    fingerprint: str
    last_user: str

    @classmethod
    def of(cls, api: str, model: str, messages: list[dict[str, Any]],
           tools: list[dict[str, Any]], *, stream: bool, include_usage: bool) -> Call:
        last_user = next((flatten_text(m.get("content")) for m in reversed(messages)
                          if m.get("role") == "user"), "")
        return cls(api, model, messages, tools, stream, include_usage,
                   fingerprint(model, messages), last_user)


class BadRequest(Exception):
    """The request body is not a chat request; the message says what is wrong."""


class OpenAIWire:
    """OpenAI chat completions: `POST /v1/chat/completions`, `data:` events, `[DONE]`."""

    api = "openai"

    @staticmethod
    def parse(body: Any) -> Call:
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise BadRequest("'model' must be a non-empty string")
        messages = body.get("messages")
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m
                                                     for m in messages):
            raise BadRequest("'messages' must be a list of message objects with a 'role'")
        tools = body.get("tools") or []
        if not isinstance(tools, list):
            raise BadRequest("'tools' must be a list")
        options = body.get("stream_options")
        return Call.of("openai", model, messages, [t for t in tools if isinstance(t, dict)],
                        stream=bool(body.get("stream")),
                        include_usage=isinstance(options, dict)
                        and bool(options.get("include_usage")))

    @staticmethod
    def response_id(fingerprint: str, n: int) -> str:
        return f"chatcmpl-{fingerprint[:16]}{n:04d}"

    @staticmethod
    def completion(reply: ScriptedReply, call: Call, rid: str) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": reply.content,
                                   "refusal": None}
        if reply.tool_calls:
            message["tool_calls"] = [
                {"id": c.id, "type": "function",
                 "function": {"name": c.name, "arguments": c.arguments}}
                for c in reply.tool_calls]
        return {
            "id": rid, "object": "chat.completion", "created": int(time.time()),
            "model": call.model, "system_fingerprint": "garrison-llm-server",
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": reply.finish_reason}],
            "usage": _openai_usage(reply),
        }

    @staticmethod
    def stream_events(reply: ScriptedReply, call: Call, rid: str) -> list[bytes]:
        created = int(time.time())

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            data: dict[str, Any] = {
                "id": rid, "object": "chat.completion.chunk", "created": created,
                "model": call.model, "system_fingerprint": "garrison-llm-server",
                "choices": [{"index": 0, "delta": delta, "logprobs": None,
                             "finish_reason": finish}]}
            if call.include_usage:
                data["usage"] = None
            return _data_line(data)

        events = [chunk({"role": "assistant", "content": "", "refusal": None})]
        events += [chunk({"content": piece}) for piece in _pieces(reply.content or "")]
        for index, tool_call in enumerate(reply.tool_calls):
            events.append(chunk({"tool_calls": [{
                "index": index, "id": tool_call.id, "type": "function",
                "function": {"name": tool_call.name, "arguments": ""}}]}))
            events += [chunk({"tool_calls": [{"index": index, "function": {"arguments": p}}]})
                       for p in _pieces(tool_call.arguments, words=False)]
        events.append(chunk({}, reply.finish_reason))
        if call.include_usage:
            events.append(_data_line({
                "id": rid, "object": "chat.completion.chunk", "created": created,
                "model": call.model, "system_fingerprint": "garrison-llm-server",
                "choices": [], "usage": _openai_usage(reply)}))
        events.append(b"data: [DONE]\n\n")
        return events

    @staticmethod
    def broken_event() -> bytes:
        return b'data: {"id": "chatcmpl-broken", "choices": [{"delta": {"content": \n\n'

    @staticmethod
    def error(status: int, message: str, code: str | None) -> dict[str, Any]:
        kind, default_code = _OPENAI_ERRORS.get(status, (
            "server_error" if status >= 500 else "invalid_request_error", None))
        return {"error": {"message": message, "type": kind, "param": None,
                          "code": code or default_code}}


class AnthropicWire:
    """Anthropic messages: `POST /v1/messages`, named events from `message_start` on."""

    api = "anthropic"

    @staticmethod
    def parse(body: Any) -> Call:
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise BadRequest("model: Field required (a non-empty string)")
        raw = body.get("messages")
        if not isinstance(raw, list) or not all(isinstance(m, dict) and "role" in m
                                                for m in raw):
            raise BadRequest("messages: must be a list of {role, content} objects")
        messages: list[dict[str, Any]] = []
        system = body.get("system")
        if system:
            messages.append({"role": "system", "content": flatten_text(system)})
        for message in raw:
            messages += _anthropic_message(message)
        tools = body.get("tools") or []
        if not isinstance(tools, list):
            raise BadRequest("tools: must be a list")
        neutral_tools = [{"type": "function", "function": {
            "name": str(t.get("name", "")), "description": t.get("description", ""),
            "parameters": t.get("input_schema", {})}} for t in tools if isinstance(t, dict)]
        return Call.of("anthropic", model, messages, neutral_tools,
                        stream=bool(body.get("stream")), include_usage=False)

    @staticmethod
    def response_id(fingerprint: str, n: int) -> str:
        return f"msg_{fingerprint[:16]}{n:04d}"

    @staticmethod
    def completion(reply: ScriptedReply, call: Call, rid: str) -> dict[str, Any]:
        content: list[dict[str, Any]] = []
        if reply.content or not reply.tool_calls:
            content.append({"type": "text", "text": reply.content or ""})
        content += [{"type": "tool_use", "id": c.id, "name": c.name,
                     "input": _tool_input(c.arguments)} for c in reply.tool_calls]
        return {"id": rid, "type": "message", "role": "assistant", "model": call.model,
                "content": content, "stop_reason": _STOP_REASONS[reply.finish_reason],
                "stop_sequence": None,
                "usage": {"input_tokens": reply.input_tokens,
                          "output_tokens": reply.output_tokens}}

    @staticmethod
    def stream_events(reply: ScriptedReply, call: Call, rid: str) -> list[bytes]:
        events = [_event("message_start", {"type": "message_start", "message": {
            "id": rid, "type": "message", "role": "assistant", "model": call.model,
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": reply.input_tokens, "output_tokens": 1}}}),
            _event("ping", {"type": "ping"})]
        index = 0
        if reply.content or not reply.tool_calls:
            events.append(_event("content_block_start", {
                "type": "content_block_start", "index": index,
                "content_block": {"type": "text", "text": ""}}))
            events += [_event("content_block_delta", {
                "type": "content_block_delta", "index": index,
                "delta": {"type": "text_delta", "text": piece}})
                for piece in _pieces(reply.content or "")]
            events.append(_event("content_block_stop",
                                 {"type": "content_block_stop", "index": index}))
            index += 1
        for tool_call in reply.tool_calls:
            events.append(_event("content_block_start", {
                "type": "content_block_start", "index": index,
                "content_block": {"type": "tool_use", "id": tool_call.id,
                                  "name": tool_call.name, "input": {}}}))
            events += [_event("content_block_delta", {
                "type": "content_block_delta", "index": index,
                "delta": {"type": "input_json_delta", "partial_json": piece}})
                for piece in _pieces(tool_call.arguments, words=False)]
            events.append(_event("content_block_stop",
                                 {"type": "content_block_stop", "index": index}))
            index += 1
        events.append(_event("message_delta", {
            "type": "message_delta",
            "delta": {"stop_reason": _STOP_REASONS[reply.finish_reason], "stop_sequence": None},
            "usage": {"output_tokens": reply.output_tokens}}))
        events.append(_event("message_stop", {"type": "message_stop"}))
        return events

    @staticmethod
    def broken_event() -> bytes:
        return (b'event: content_block_delta\n'
                b'data: {"type": "content_block_delta", "index": 0, "delta": {\n\n')

    @staticmethod
    def error(status: int, message: str, code: str | None) -> dict[str, Any]:
        kind = _ANTHROPIC_ERRORS.get(status, "api_error" if status >= 500
                                     else "invalid_request_error")
        return {"type": "error", "error": {"type": kind, "message": message}}


# A wire is its class: every method is static, the app picks one per route.
Wire = type[OpenAIWire] | type[AnthropicWire]

_OPENAI_ERRORS: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "unsupported_country_region_territory"),
    404: ("invalid_request_error", "model_not_found"),
    429: ("requests", "rate_limit_exceeded"),
    500: ("server_error", None),
    502: ("server_error", "bad_gateway"),
    503: ("server_error", "service_unavailable"),
}
_ANTHROPIC_ERRORS = {400: "invalid_request_error", 401: "authentication_error",
                     403: "permission_error", 404: "not_found_error",
                     413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
                     503: "overloaded_error", 529: "overloaded_error"}
_STOP_REASONS = {"stop": "end_turn", "tool_calls": "tool_use", "length": "max_tokens",
                 "content_filter": "refusal"}


def _anthropic_message(message: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One Anthropic message as OpenAI-shaped messages (tool results become tool messages)."""
    role = str(message.get("role"))
    content = message.get("content")
    if not isinstance(content, list):
        return [{"role": role, "content": flatten_text(content)}]
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for block in content:
        if not isinstance(block, Mapping):
            continue
        kind = block.get("type")
        if kind == "text":
            texts.append(str(block.get("text", "")))
        elif kind == "tool_use":
            calls.append({"id": str(block.get("id", "")), "type": "function", "function": {
                "name": str(block.get("name", "")),
                "arguments": json.dumps(block.get("input", {}))}})
        elif kind == "tool_result":
            results.append({"role": "tool", "tool_call_id": str(block.get("tool_use_id", "")),
                            "content": flatten_text(block.get("content"))})
    if role == "assistant":
        entry: dict[str, Any] = {"role": "assistant", "content": "\n".join(texts) or None}
        if calls:
            entry["tool_calls"] = calls
        return [entry]
    return results + ([{"role": role, "content": "\n".join(texts)}] if texts else [])


def _tool_input(arguments: str) -> Any:
    # Anthropic sends tool input as an object; text that is not JSON is sent as a string.
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments


def _openai_usage(reply: ScriptedReply) -> dict[str, int]:
    return {"prompt_tokens": reply.input_tokens, "completion_tokens": reply.output_tokens,
            "total_tokens": reply.input_tokens + reply.output_tokens}


def _data_line(data: Any) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def _event(name: str, data: Any) -> bytes:
    return (f"event: {name}\ndata: ".encode() + json.dumps(data, separators=(",", ":")).encode()
            + b"\n\n")


def _pieces(text: str, *, words: bool = True, minimum: int = 4) -> list[str]:
    """Split text for streaming: by words when there are enough, else in `minimum` slices."""
    if not text:
        return []
    if words:
        parts = [p for p in re.findall(r"\S*\s*", text) if p]
        if len(parts) >= minimum:
            return parts
    size = max(1, math.ceil(len(text) / minimum))
    return [text[i:i + size] for i in range(0, len(text), size)]


def break_arguments(reply: ScriptedReply) -> ScriptedReply:
    """Tool call arguments cut in half and ended by an invalid escape: invalid JSON for
    `json.loads` and for partial parsers (Anthropic's SDK reads tool input leniently)."""
    def broken(call: ScriptedToolCall) -> ScriptedToolCall:
        half = call.arguments[: len(call.arguments) // 2].rstrip("\\")
        return dataclasses.replace(call, arguments=half + "\\x")

    return dataclasses.replace(reply, tool_calls=tuple(broken(c) for c in reply.tool_calls))
