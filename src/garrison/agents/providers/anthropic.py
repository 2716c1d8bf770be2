"""`AnthropicModel`: the Messages API over the official `anthropic` SDK.

The SDK's own retries are off: Garrison retries durably, per step, with the
classification in `_errors.py`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import SecretStr

from garrison.agents._messages import Message, ModelResponse, ModelSettings, ToolCall, Usage
from garrison.agents._model import DeltaHandler
from garrison.agents.providers._base import SDKModel
from garrison.agents.providers._errors import provider_error
from garrison.errors import ContentFiltered

try:
    import anthropic
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "AnthropicModel needs the anthropic SDK: pip install 'garrison[agents]'") from exc

__all__ = ["AnthropicModel", "to_anthropic_messages"]

_STOP_REASONS = {"end_turn": "stop", "stop_sequence": "stop", "tool_use": "tool_calls",
                 "max_tokens": "length", "refusal": "content_filter"}


def to_anthropic_messages(messages: Sequence[Message]
                          ) -> tuple[str | None, list[dict[str, Any]]]:
    """(system prompt, messages) in Messages-API form; consecutive tool results are
    merged into one user turn, as the API requires."""
    system = "\n\n".join(m.content or "" for m in messages if m.role == "system") or None
    out: list[dict[str, Any]] = []
    for m in messages:
        if m.role == "system":
            continue
        if m.role == "tool":
            block = {"type": "tool_result", "tool_use_id": m.tool_call_id,
                     "content": m.content or "", "is_error": m.is_error}
            if out and out[-1]["role"] == "user" and isinstance(out[-1]["content"], list) \
                    and out[-1]["content"] and out[-1]["content"][0].get("type") == "tool_result":
                out[-1]["content"].append(block)
            else:
                out.append({"role": "user", "content": [block]})
        elif m.role == "assistant":
            blocks: list[dict[str, Any]] = []
            if m.content:
                blocks.append({"type": "text", "text": m.content})
            for call in m.tool_calls:
                try:
                    arguments = json.loads(call.arguments) if call.arguments else {}
                except json.JSONDecodeError:
                    arguments = {"_unparsed": call.arguments}
                blocks.append({"type": "tool_use", "id": call.id, "name": call.name,
                               "input": arguments})
            out.append({"role": "assistant", "content": blocks or ""})
        else:
            out.append({"role": "user", "content": m.content or ""})
    return system, out


class AnthropicModel(SDKModel[anthropic.AsyncAnthropic]):
    """An Anthropic Messages-API model.

    Args:
        model_name: "claude-haiku-4-5", ...
        base_url: default `ANTHROPIC_BASE_URL`, else the SDK's default.
        api_key: default `ANTHROPIC_API_KEY`; kept as a `SecretStr`, never journaled.
        max_tokens: the API requires one; used when the settings give none.
        timeout_s: per-call timeout.
        client: a configured `AsyncAnthropic` to use instead; give it `max_retries=0`.
    """

    base_url_env = "ANTHROPIC_BASE_URL"
    api_key_env = "ANTHROPIC_API_KEY"
    sdk_root_error = anthropic.AnthropicError
    sdk_errors = (anthropic.APIStatusError, anthropic.APITimeoutError,
                  anthropic.APIConnectionError, anthropic.APIResponseValidationError)

    def __init__(self, model_name: str, *, base_url: str | None = None,
                 api_key: str | SecretStr | None = None, max_tokens: int = 1024,
                 timeout_s: float = 60.0, provider: str = "anthropic",
                 client: anthropic.AsyncAnthropic | None = None) -> None:
        super().__init__(model_name, provider=provider, base_url=base_url, api_key=api_key,
                         timeout_s=timeout_s, client=client)
        self.max_tokens = max_tokens

    def _new_client(self, api_key: str) -> anthropic.AsyncAnthropic:
        return anthropic.AsyncAnthropic(api_key=api_key, base_url=self.base_url,
                                        max_retries=0, timeout=self.timeout_s)

    def _params(self, messages: Sequence[Message], tools: Sequence[Mapping[str, Any]],
                settings: ModelSettings, output_schema: Mapping[str, Any] | None
                ) -> dict[str, Any]:
        system, converted = to_anthropic_messages(messages)
        if output_schema is not None:
            note = ("Answer with only a JSON value matching this JSON schema, no prose: "
                    + json.dumps(dict(output_schema)))
            system = f"{system}\n\n{note}" if system else note
        params: dict[str, Any] = {"model": self.model_name, "messages": converted,
                                  "max_tokens": settings.max_tokens or self.max_tokens}
        if system:
            params["system"] = system
        if tools:
            params["tools"] = [{"name": t["name"], "description": t.get("description", ""),
                                "input_schema": t.get("parameters") or {"type": "object"}}
                               for t in tools]
        for key in ("temperature", "top_p"):
            value = getattr(settings, key)
            if value is not None:
                params[key] = value
        if settings.stop is not None:
            params["stop_sequences"] = list(settings.stop)
        if settings.timeout_s is not None:
            params["timeout"] = settings.timeout_s
        params.update(settings.extra)
        return params

    async def _complete(self, params: dict[str, Any]) -> ModelResponse:
        message = await self._client().messages.create(**params)
        text: list[str] = []
        calls: list[ToolCall] = []
        for block in message.content or ():
            if block.type == "text":
                text.append(block.text)
            elif block.type == "tool_use":
                calls.append(ToolCall(block.id, block.name, json.dumps(block.input)))
        usage = message.usage
        return self._response("".join(text) or None, tuple(calls), message.stop_reason,
                              usage.input_tokens if usage else 0,
                              usage.output_tokens if usage else 0,
                              message.model or self.model_name)

    def _response(self, content: str | None, calls: tuple[ToolCall, ...],
                  stop_reason: str | None, input_tokens: int, output_tokens: int,
                  model: str) -> ModelResponse:
        finish = _STOP_REASONS.get(stop_reason or "", stop_reason or "stop")
        if finish == "content_filter":
            raise provider_error(
                ContentFiltered, f"{self.provider} model {self.model_name!r}: the model "
                "refused (stop_reason=refusal)", provider=self.provider,
                model=self.model_name, kind="content_filter", retryable=False)
        return ModelResponse(Message("assistant", content, calls),
                             Usage(input_tokens, output_tokens, 1, 0), model, self.provider,
                             finish)

    async def _stream(self, params: dict[str, Any], on_delta: DeltaHandler) -> ModelResponse:
        stream = await self._client().messages.create(**params, stream=True)
        text: list[str] = []
        blocks: dict[int, dict[str, str]] = {}
        stop_reason: str | None = None
        model = self.model_name
        input_tokens = output_tokens = 0
        ended = False
        async for event in stream:
            if event.type == "message_start":
                model = event.message.model or model
                input_tokens = event.message.usage.input_tokens
                output_tokens = event.message.usage.output_tokens
            elif event.type == "content_block_start":
                block = event.content_block
                if block.type == "tool_use":
                    blocks[event.index] = {"id": block.id, "name": block.name,
                                           "arguments": ""}
            elif event.type == "content_block_delta":
                delta = event.delta
                if delta.type == "text_delta":
                    text.append(delta.text)
                    await on_delta(delta.text)
                elif delta.type == "input_json_delta" and event.index in blocks:
                    blocks[event.index]["arguments"] += delta.partial_json
            elif event.type == "message_delta":
                stop_reason = event.delta.stop_reason or stop_reason
                if event.usage is not None:
                    output_tokens = event.usage.output_tokens
            elif event.type == "message_stop":
                ended = True
        if not ended:
            raise self._malformed("the stream ended before message_stop (cut short)")
        calls = tuple(ToolCall(b["id"], b["name"], b["arguments"] or "{}")
                      for _, b in sorted(blocks.items()))
        return self._response("".join(text) or None, calls, stop_reason, input_tokens,
                              output_tokens, model)
