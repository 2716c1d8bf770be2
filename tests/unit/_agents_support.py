"""Shared helpers for the agents tests: apps on a tmp SQLite file, provider errors,
exact-usage replies, and a streaming fake that fails mid-stream."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from garrison import Garrison
from garrison.agents import Agent, Message, ModelResponse, ModelSettings, ToolCall, Usage
from garrison.engine import EngineHooks
from garrison.errors import ProviderUnavailable
from garrison.testing import FakeClock

DeltaHandler = Callable[[str], Awaitable[None]]


def agent_app(db_url: str, *agents: Agent, clock: FakeClock | None = None,
              hooks: Sequence[EngineHooks] = ()) -> Garrison:
    """An app on `db_url` with `agents` registered before it opens."""
    app = Garrison(db_url, clock=clock, hooks=hooks)
    for agent in agents:
        app.add_agent(agent)
    return app


def unavailable(model: str = "scripted", *, retryable: bool = True,
                status: int | None = 503) -> ProviderUnavailable:
    """The error a provider raises for a 5xx (as `providers/_errors.py` builds it)."""
    return ProviderUnavailable(f"test model {model!r}: server error {status}",
                               provider="test", model=model, kind="server",
                               retryable=retryable, status=status, retry_after=None)


def call(name: str, arguments: Mapping[str, Any] | None = None, *,
         call_id: str | None = None) -> dict[str, Any]:
    """A tool call as a `ScriptedModel` reply."""
    data: dict[str, Any] = {"name": name, "arguments": dict(arguments or {})}
    if call_id is not None:
        data["id"] = call_id
    return data


def response(content: str | None = None, calls: Sequence[tuple[str, str, Mapping[str, Any]]]
             = (), *, input_tokens: int, output_tokens: int,
             model: str = "priced") -> ModelResponse:
    """A reply with exact usage: `calls` are (id, name, arguments)."""
    tool_calls = tuple(ToolCall(i, n, json.dumps(dict(a))) for i, n, a in calls)
    return ModelResponse(Message("assistant", content, tool_calls),
                         Usage(input_tokens, output_tokens, 1, 0), model, "test",
                         "tool_calls" if tool_calls else "stop")


class StreamingScript:
    """A `Model` whose n-th request streams `pieces[n]` through `on_delta` and then
    either answers their concatenation or raises `fail[n]` (a dropped stream)."""

    provider = "test"

    def __init__(self, attempts: Sequence[tuple[Sequence[str], BaseException | None]],
                 *, name: str = "streamer") -> None:
        self.model_name = name
        self.name = f"test:{name}"
        self.attempts = list(attempts)
        self.requests = 0

    async def request(self, messages: Sequence[Message], *,
                      tools: Sequence[Mapping[str, Any]] = (),
                      settings: ModelSettings | None = None,
                      output_schema: Mapping[str, Any] | None = None,
                      on_delta: DeltaHandler | None = None) -> ModelResponse:
        pieces, failure = self.attempts[min(self.requests, len(self.attempts) - 1)]
        self.requests += 1
        for piece in pieces:
            if on_delta is not None:
                await on_delta(piece)
        if failure is not None:
            raise failure
        return ModelResponse(Message("assistant", "".join(pieces)), Usage(5, 5, 1, 0),
                             self.model_name, "test")
