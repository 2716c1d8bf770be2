"""Message content on spans: off by default, and through a redaction hook when on.

Prompts and completions leave the process only with `instrument(capture_content=True)`,
as `gen_ai.input.messages` / `gen_ai.output.messages` (JSON text in the OpenTelemetry
GenAI message format), after `redact`. Governance will supply a PII redactor here; until
then the default is the identity, so turn capture on only where the content may be seen.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = ["CONTENT_ATTRIBUTES", "Redactor", "content_json", "no_redaction"]

Redactor = Callable[[list[dict[str, Any]]], list[dict[str, Any]]]
"""Takes the messages (GenAI format: `{"role", "parts": [...]}`) and returns what may
be recorded: a copy with personal data masked, fewer messages, or none."""

CONTENT_ATTRIBUTES = frozenset({
    "gen_ai.input.messages", "gen_ai.output.messages", "gen_ai.system_instructions",
    "gen_ai.tool.call.arguments", "gen_ai.tool.call.result",
})


def no_redaction(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The default `redact`: records the messages as they are."""
    return messages


def _message(value: Any) -> dict[str, Any]:
    data: Mapping[str, Any] = value.to_dict() if hasattr(value, "to_dict") else value
    role = data.get("role")
    content = data.get("content")
    parts: list[dict[str, Any]] = []
    if role == "tool":
        parts.append({"type": "tool_call_response", "id": data.get("tool_call_id"),
                      "response": content})
    elif content:
        parts.append({"type": "text", "content": content})
    for call in data.get("tool_calls") or ():
        parts.append({"type": "tool_call", "id": call.get("id"), "name": call.get("name"),
                      "arguments": call.get("arguments")})
    return {"role": role, "parts": parts}


def content_json(messages: Iterable[Any], redact: Redactor) -> str:
    """Messages (agents' `Message`s or their dicts) as the GenAI attribute value."""
    return json.dumps(redact([_message(m) for m in messages]), default=str)
