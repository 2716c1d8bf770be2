"""The typed events `Agent.stream` yields, read from the run's durable stream.

Every event carries `offset`: pass the last one seen to `Agent.stream(..., after=)` or
`app.stream(run_id, after=)` after a reconnect to go on from exactly there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from garrison.store import StreamRecord

__all__ = [
    "AgentEvent", "ApprovalRequested", "FinalOutput", "HandoffEvent", "StreamReset",
    "TextDelta", "ToolCallEvent", "ToolResultEvent", "event_from_record",
]


@dataclass(frozen=True, slots=True)
class TextDelta:
    """A piece of the model's answer, as it arrived."""

    offset: int
    agent: str
    text: str


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The model call being streamed was interrupted (a crash, a retry) and its new
    attempt answers differently: drop the text shown since the last `ToolResultEvent`
    (or the start) for this agent; the new text follows."""

    offset: int
    agent: str


@dataclass(frozen=True, slots=True)
class ToolCallEvent:
    """The model asked for a tool call (`arguments`: its raw JSON text)."""

    offset: int
    agent: str
    tool_call_id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class ToolResultEvent:
    """A tool call's result as the model will read it."""

    offset: int
    agent: str
    tool_call_id: str
    name: str
    result: str
    is_error: bool


@dataclass(frozen=True, slots=True)
class HandoffEvent:
    """The conversation passed from one agent to another."""

    offset: int
    from_agent: str
    to_agent: str


@dataclass(frozen=True, slots=True)
class ApprovalRequested:
    """A tool call waits for `app.send(run_id, "approval", ...)`."""

    offset: int
    agent: str
    tool_call_id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class FinalOutput:
    """The run ended with an answer; `result` is the `AgentResult`."""

    offset: int
    result: Any


AgentEvent = (TextDelta | StreamReset | ToolCallEvent | ToolResultEvent | HandoffEvent
              | ApprovalRequested | FinalOutput)


def event_from_record(record: StreamRecord) -> AgentEvent | None:
    """The typed event of one stream record (None for kinds agents do not publish)."""
    data: dict[str, Any] = json.loads(record.data) if record.data else {}
    if not isinstance(data, dict):
        return None
    o = record.offset
    kind = record.kind
    if kind == "agent.text":
        return TextDelta(o, data["agent"], data["text"])
    if kind == "agent.reset":
        return StreamReset(o, data["agent"])
    if kind == "agent.tool_call":
        return ToolCallEvent(o, data["agent"], data["id"], data["name"], data["arguments"])
    if kind == "agent.tool_result":
        return ToolResultEvent(o, data["agent"], data["id"], data["name"], data["result"],
                               bool(data.get("is_error")))
    if kind == "agent.handoff":
        return HandoffEvent(o, data["from"], data["to"])
    if kind == "agent.approval":
        return ApprovalRequested(o, data["agent"], data["id"], data["name"],
                                 data["arguments"])
    return None
