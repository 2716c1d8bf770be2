"""The conversation, provider-neutral: messages, tool calls, usage, model responses.

In the journal these are plain JSON objects (`to_dict` / `from_dict`), not class
paths, so renaming a class never makes an old journal unreadable.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

__all__ = ["Message", "ModelResponse", "ModelSettings", "Role", "ToolCall", "Usage"]

Role = Literal["system", "user", "assistant", "tool"]


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A tool call the model asked for. `arguments` is the model's raw JSON text."""

    id: str
    name: str
    arguments: str

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "arguments": self.arguments}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ToolCall:
        return cls(str(data["id"]), str(data["name"]), str(data.get("arguments") or ""))


@dataclass(frozen=True, slots=True)
class Message:
    """One message of a conversation.

    `tool_calls` on an assistant message; `tool_call_id` and `name` (the tool) on a
    tool result; `agent` names the agent that spoke (after handoffs, several do).
    """

    role: Role
    content: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    name: str | None = None
    agent: str | None = None
    is_error: bool = False

    @classmethod
    def user(cls, text: str) -> Message:
        return cls("user", text)

    @classmethod
    def system(cls, text: str) -> Message:
        return cls("system", text)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            data["tool_calls"] = [c.to_dict() for c in self.tool_calls]
        for key in ("tool_call_id", "name", "agent"):
            value = getattr(self, key)
            if value is not None:
                data[key] = value
        if self.is_error:
            data["is_error"] = True
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Message:
        role = data.get("role")
        if role not in ("system", "user", "assistant", "tool"):
            raise ValueError(f"message role {role!r}: one of system, user, assistant, tool")
        return cls(role, data.get("content"),
                   tuple(ToolCall.from_dict(c) for c in data.get("tool_calls") or ()),
                   data.get("tool_call_id"), data.get("name"), data.get("agent"),
                   bool(data.get("is_error", False)))


def messages_from(items: Sequence[Message | Mapping[str, Any]] | None) -> list[Message]:
    """Messages from messages or their dict form (a history given by a caller)."""
    return [m if isinstance(m, Message) else Message.from_dict(m) for m in items or ()]


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens and calls. Adds with `+`."""

    input_tokens: int = 0
    output_tokens: int = 0
    model_calls: int = 0
    tool_calls: int = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.input_tokens + other.input_tokens,
                     self.output_tokens + other.output_tokens,
                     self.model_calls + other.model_calls,
                     self.tool_calls + other.tool_calls)

    def to_dict(self) -> dict[str, int]:
        return {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
                "model_calls": self.model_calls, "tool_calls": self.tool_calls}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Usage:
        return cls(int(data.get("input_tokens", 0)), int(data.get("output_tokens", 0)),
                   int(data.get("model_calls", 0)), int(data.get("tool_calls", 0)))


@dataclass(frozen=True, slots=True)
class ModelResponse:
    """What one model call returned: the assistant message, usage, who served it."""

    message: Message
    usage: Usage
    model: str  # the model name the provider reported
    provider: str
    finish_reason: str = "stop"


@dataclass(frozen=True, slots=True)
class ModelSettings:
    """Sampling settings passed to the provider (None: the provider's default).

    `extra` is passed through as provider request fields.
    """

    temperature: float | None = None
    max_tokens: int | None = None
    top_p: float | None = None
    stop: tuple[str, ...] | None = None
    seed: int | None = None
    timeout_s: float | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def capped(self, max_tokens: int | None) -> ModelSettings:
        """These settings with `max_tokens` at most `max_tokens` (a budget's remainder)."""
        if max_tokens is None:
            return self
        current = self.max_tokens
        return replace(self, max_tokens=max_tokens if current is None
                       else min(current, max_tokens))

    def to_dict(self) -> dict[str, Any]:
        data = {k: getattr(self, k) for k in
                ("temperature", "max_tokens", "top_p", "seed", "timeout_s")
                if getattr(self, k) is not None}
        if self.stop is not None:
            data["stop"] = list(self.stop)
        if self.extra:
            data["extra"] = dict(self.extra)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> ModelSettings:
        data = data or {}
        stop = data.get("stop")
        return cls(data.get("temperature"), data.get("max_tokens"), data.get("top_p"),
                   tuple(stop) if stop is not None else None, data.get("seed"),
                   data.get("timeout_s"), dict(data.get("extra") or {}))
