"""Message content on spans: off by default, and through a redaction hook when on.

Prompts and completions leave the process only with `instrument(capture_content=True)`,
as `gen_ai.input.messages` / `gen_ai.output.messages` (JSON text in the OpenTelemetry
GenAI message format), after `redact`. The other content attributes
(`gen_ai.system_instructions`, `gen_ai.tool.call.arguments`, `gen_ai.tool.call.result`)
reach `redact` in the same format, as one message (a system message of text parts, an
assistant message with one `tool_call` part, a tool message with one
`tool_call_response` part), so one redactor sees every piece of content; what it
returns is recorded in the attribute's own shape (the parts, the arguments, the
result). Governance will supply a PII redactor here; until then the default is the
identity, so turn capture on only where the content may be seen.

Content is telemetry, never the run's business: a value that cannot be read as
messages, or a `redact` that raises, drops that attribute (the span says why, in
`garrison.content.dropped`) and the step goes on.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["CONTENT_ATTRIBUTES", "Redactor", "content_json", "no_redaction"]

Redactor = Callable[[list[dict[str, Any]]], list[dict[str, Any]] | None]
"""Takes the messages (GenAI format: `{"role", "parts": [...]}`) and returns what may
be recorded: a copy with personal data masked, fewer messages, or none (an empty list,
or None: the attribute is left out)."""

_MESSAGES = frozenset({"gen_ai.input.messages", "gen_ai.output.messages"})
_SYSTEM = "gen_ai.system_instructions"
_ARGUMENTS = "gen_ai.tool.call.arguments"
_RESULT = "gen_ai.tool.call.result"
CONTENT_ATTRIBUTES = _MESSAGES | {_SYSTEM, _ARGUMENTS, _RESULT}


def no_redaction(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The default `redact`: records the messages as they are."""
    return messages


def _text(content: Any) -> dict[str, Any]:
    return {"type": "text", "content": content}


def _message(value: Any) -> dict[str, Any]:
    data = value.to_dict() if hasattr(value, "to_dict") else value
    if not isinstance(data, Mapping):  # a bare prompt string, or anything else
        return {"role": "user", "parts": [_text(str(data))]}
    if isinstance(data.get("parts"), list):  # already in the GenAI format
        return {"role": data.get("role"), "parts": list(data["parts"])}
    role = data.get("role")
    content = data.get("content")
    parts: list[dict[str, Any]] = []
    if role == "tool":
        parts.append({"type": "tool_call_response", "id": data.get("tool_call_id"),
                      "response": content})
    elif content:
        parts.append(_text(content))
    for call in data.get("tool_calls") or ():
        if isinstance(call, Mapping):
            parts.append({"type": "tool_call", "id": call.get("id"),
                          "name": call.get("name"), "arguments": call.get("arguments")})
    return {"role": role, "parts": parts}


def _as_messages(key: str, value: Any) -> list[dict[str, Any]]:
    if key == _SYSTEM:
        parts = value if isinstance(value, list) else [value]
        return [{"role": "system", "parts": [
            dict(part) if isinstance(part, Mapping) else _text(str(part)) for part in parts]}]
    if key == _ARGUMENTS:
        return [{"role": "assistant", "parts": [{"type": "tool_call", "arguments": value}]}]
    if key == _RESULT:
        return [{"role": "tool", "parts": [{"type": "tool_call_response",
                                            "response": value}]}]
    if isinstance(value, str | bytes | Mapping) or not hasattr(value, "__iter__"):
        value = [value]  # one message, or a bare prompt
    return [_message(m) for m in value]


def _unwrapped(key: str, messages: list[dict[str, Any]]) -> Any:
    if key in _MESSAGES:
        return messages
    parts = [part for m in messages for part in (m.get("parts") or ())]
    if key == _SYSTEM:
        return parts
    field = "arguments" if key == _ARGUMENTS else "response"
    values = [part[field] for part in parts if isinstance(part, Mapping) and field in part]
    return values[0] if len(values) == 1 else values


def content_json(key: str, value: Any, redact: Redactor) -> str | None:
    """A content attribute's value as recorded (JSON text), after `redact`; None when
    `redact` left nothing. Raises what reading the value or `redact` raised: the caller
    drops the attribute then."""
    redacted = redact(_as_messages(key, value))
    if not redacted:
        return None
    return json.dumps(_unwrapped(key, list(redacted)), default=str)
