"""In-process models for fast, deterministic tests: `ScriptedModel`, `FunctionModel`.

No HTTP: they answer from a list or a function. For the real client code paths, use
`garrison.testing.LLMServer` with `OpenAIModel` / `AnthropicModel` instead.
"""

from __future__ import annotations

import inspect
import itertools
import json
import math
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from garrison.agents._messages import Message, ModelResponse, ModelSettings, ToolCall, Usage
from garrison.agents._model import DeltaHandler
from garrison.errors import ConfigurationError

__all__ = ["FunctionModel", "ModelCall", "ScriptedModel"]


@dataclass(frozen=True, slots=True)
class ModelCall:
    """What a fake model was asked (kept in `model.calls`)."""

    messages: tuple[Message, ...]
    tools: tuple[str, ...]
    settings: ModelSettings
    output_schema: Mapping[str, Any] | None


def _estimate_tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / 4))


def _as_response(value: Any, model: str, messages: Sequence[Message]) -> ModelResponse:
    """A reply given as text, a tool call dict / list of them, a Message or a response."""
    if isinstance(value, ModelResponse):
        return value
    if isinstance(value, Exception):
        raise value
    counter = itertools.count()
    if isinstance(value, Message):
        message = value
    elif isinstance(value, str):
        message = Message("assistant", value)
    else:
        items = [value] if isinstance(value, Mapping | ToolCall) else list(value)
        calls = []
        for item in items:
            if isinstance(item, ToolCall):
                calls.append(item)
                continue
            arguments = item.get("arguments", {})
            calls.append(ToolCall(str(item.get("id") or f"call_{len(messages)}_{next(counter)}"),
                                  str(item["name"]), arguments if isinstance(arguments, str)
                                  else json.dumps(arguments)))
        message = Message("assistant", None, tuple(calls))
    prompt = sum(len(m.content or "") for m in messages)
    answer = len(message.content or "") + sum(len(c.arguments) for c in message.tool_calls)
    return ModelResponse(message, Usage(_estimate_tokens("x" * prompt),
                                        _estimate_tokens("x" * answer), 1, 0), model, "test",
                         "tool_calls" if message.tool_calls else "stop")


class _FakeBase:
    provider = "test"

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.name = f"test:{model_name}"
        self.calls: list[ModelCall] = []
        self._lock = threading.Lock()

    def _record(self, messages: Sequence[Message], tools: Sequence[Mapping[str, Any]],
                settings: ModelSettings | None, output_schema: Mapping[str, Any] | None
                ) -> None:
        with self._lock:
            self.calls.append(ModelCall(tuple(messages), tuple(t["name"] for t in tools),
                                        settings or ModelSettings(), output_schema))

    @staticmethod
    async def _stream(response: ModelResponse, on_delta: DeltaHandler | None) -> None:
        if on_delta is None or not response.message.content:
            return
        words = response.message.content.split(" ")
        for i, word in enumerate(words):
            await on_delta(word if i == len(words) - 1 else word + " ")


class ScriptedModel(_FakeBase):
    """Answers with the next reply of a list, in order; each reply is text, a tool call
    (`{"name": ..., "arguments": {...}}`), a list of them, a `Message`, a
    `ModelResponse`, an exception to raise, or a callable `(messages) -> reply`.
    Past the end it answers `default` (or raises if there is none).

    ```python
    model = ScriptedModel([{"name": "lookup_order", "arguments": {"order_id": "7"}},
                           "Order 7 has shipped."])
    ```
    """

    def __init__(self, replies: Sequence[Any] = (), *, default: Any = None,
                 name: str = "scripted") -> None:
        super().__init__(name)
        self.replies = list(replies)
        self.default = default
        self._next = 0

    async def request(self, messages: Sequence[Message], *,
                      tools: Sequence[Mapping[str, Any]] = (),
                      settings: ModelSettings | None = None,
                      output_schema: Mapping[str, Any] | None = None,
                      on_delta: DeltaHandler | None = None) -> ModelResponse:
        self._record(messages, tools, settings, output_schema)
        with self._lock:
            index = self._next
            self._next += 1
        if index < len(self.replies):
            reply = self.replies[index]
        elif self.default is not None:
            reply = self.default
        else:
            raise ConfigurationError(
                f"ScriptedModel {self.model_name!r}: asked for reply {index + 1} of a script "
                f"of {len(self.replies)}; add replies or a default=")
        if callable(reply) and not isinstance(reply, type):
            reply = reply(list(messages))
            if inspect.isawaitable(reply):
                reply = await reply
        response = _as_response(reply, self.model_name, messages)
        await self._stream(response, on_delta)
        return response


class FunctionModel(_FakeBase):
    """Answers with `fn(messages, tools) -> reply` (sync or async; a reply as for
    `ScriptedModel`): the model is your function."""

    def __init__(self, fn: Callable[[list[Message], list[Mapping[str, Any]]], Any |
                                    Awaitable[Any]], *, name: str = "function") -> None:
        super().__init__(name)
        self.fn = fn

    async def request(self, messages: Sequence[Message], *,
                      tools: Sequence[Mapping[str, Any]] = (),
                      settings: ModelSettings | None = None,
                      output_schema: Mapping[str, Any] | None = None,
                      on_delta: DeltaHandler | None = None) -> ModelResponse:
        self._record(messages, tools, settings, output_schema)
        reply = self.fn(list(messages), list(tools))
        if inspect.isawaitable(reply):
            reply = await reply
        response = _as_response(reply, self.model_name, messages)
        await self._stream(response, on_delta)
        return response
