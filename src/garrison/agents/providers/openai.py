"""`OpenAIModel`: chat completions over the official `openai` SDK (`AsyncOpenAI`).

Any OpenAI-compatible server works through `base_url` (vLLM, Ollama, llama.cpp,
the project's own `garrison llm-server`). The SDK's own retries are off: Garrison
retries durably, per step, with the classification in `_errors.py`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import SecretStr

from garrison.agents._messages import Message, ModelResponse, ModelSettings, ToolCall, Usage
from garrison.agents._model import DeltaHandler
from garrison.agents.providers._base import SDKModel
from garrison.agents.providers._errors import provider_error
from garrison.errors import ContentFiltered

try:
    import openai
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "OpenAIModel needs the openai SDK: pip install 'garrison[agents]'") from exc

__all__ = ["OpenAIModel", "to_openai_messages"]


def to_openai_messages(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """The conversation in chat-completions form."""
    out: list[dict[str, Any]] = []
    for m in messages:
        if m.role == "tool":
            out.append({"role": "tool", "tool_call_id": m.tool_call_id,
                        "content": m.content or ""})
        elif m.role == "assistant" and m.tool_calls:
            out.append({"role": "assistant", "content": m.content,
                        "tool_calls": [{"id": c.id, "type": "function",
                                        "function": {"name": c.name,
                                                     "arguments": c.arguments}}
                                       for c in m.tool_calls]})
        else:
            out.append({"role": m.role, "content": m.content or ""})
    return out


class OpenAIModel(SDKModel[openai.AsyncOpenAI]):
    """An OpenAI chat-completions model.

    Args:
        model_name: the provider's model name ("gpt-4o-mini").
        base_url: default `OPENAI_BASE_URL`, else the SDK's default.
        api_key: default `OPENAI_API_KEY`; kept as a `SecretStr`, never journaled or
            logged.
        timeout_s: per-call timeout (a step timeout bounds it too).
        native_output: ask for JSON output with `response_format` when the agent has an
            `output_type` (servers that do not support it ignore it or refuse it; turn
            it off for those).
        provider: the name in journals, traces and prices ("openai").
        client: a configured `AsyncOpenAI` to use instead (your own HTTP client,
            proxies, headers); give it `max_retries=0`: Garrison retries durably.
    """

    base_url_env = "OPENAI_BASE_URL"
    api_key_env = "OPENAI_API_KEY"
    sdk_root_error = openai.OpenAIError
    sdk_errors = (openai.APIStatusError, openai.APITimeoutError, openai.APIConnectionError,
                  openai.APIResponseValidationError)

    def __init__(self, model_name: str, *, base_url: str | None = None,
                 api_key: str | SecretStr | None = None, timeout_s: float = 60.0,
                 native_output: bool = True, provider: str = "openai",
                 client: openai.AsyncOpenAI | None = None) -> None:
        super().__init__(model_name, provider=provider, base_url=base_url, api_key=api_key,
                         timeout_s=timeout_s, client=client)
        self.native_output = native_output

    def _new_client(self, api_key: str) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(api_key=api_key, base_url=self.base_url, max_retries=0,
                                  timeout=self.timeout_s)

    def _params(self, messages: Sequence[Message], tools: Sequence[Mapping[str, Any]],
                settings: ModelSettings, output_schema: Mapping[str, Any] | None
                ) -> dict[str, Any]:
        params: dict[str, Any] = {"model": self.model_name,
                                  "messages": to_openai_messages(messages)}
        if tools:
            params["tools"] = [{"type": "function", "function": dict(t)} for t in tools]
        for key in ("temperature", "max_tokens", "top_p", "seed"):
            value = getattr(settings, key)
            if value is not None:
                params[key] = value
        if settings.stop is not None:
            params["stop"] = list(settings.stop)
        if settings.timeout_s is not None:
            params["timeout"] = settings.timeout_s
        if output_schema is not None and self.native_output:
            params["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "output", "schema": dict(output_schema), "strict": False}}
        params.update(settings.extra)
        return params

    async def _complete(self, params: dict[str, Any]) -> ModelResponse:
        completion = await self._client().chat.completions.create(**params)
        if not getattr(completion, "choices", None):
            raise self._malformed("an answer without choices")
        choice = completion.choices[0]
        calls = tuple(ToolCall(c.id, c.function.name, c.function.arguments or "")
                      for c in (choice.message.tool_calls or ())
                      if getattr(c, "function", None) is not None)
        usage = completion.usage
        return self._response(choice.message.content, calls, choice.finish_reason,
                              usage.prompt_tokens if usage else 0,
                              usage.completion_tokens if usage else 0,
                              completion.model or self.model_name)

    def _response(self, content: str | None, calls: tuple[ToolCall, ...],
                  finish_reason: str | None, input_tokens: int, output_tokens: int,
                  model: str) -> ModelResponse:
        if finish_reason == "content_filter":
            raise provider_error(
                ContentFiltered, f"{self.provider} model {self.model_name!r}: the answer was "
                "blocked by the provider's content filter", provider=self.provider,
                model=self.model_name, kind="content_filter", retryable=False)
        for call in calls:
            if not call.name:
                raise self._malformed("a tool call without a name")
        return ModelResponse(Message("assistant", content, calls),
                             Usage(input_tokens, output_tokens, 1, 0), model, self.provider,
                             finish_reason or "stop")

    async def _stream(self, params: dict[str, Any], on_delta: DeltaHandler) -> ModelResponse:
        params = {**params, "stream": True, "stream_options": {"include_usage": True}}
        stream = await self._client().chat.completions.create(**params)
        text: list[str] = []
        calls: dict[int, dict[str, str]] = {}
        finish: str | None = None
        model = self.model_name
        input_tokens = output_tokens = 0
        async with stream:
            async for chunk in stream:
                model = chunk.model or model
                if chunk.usage is not None:
                    input_tokens = chunk.usage.prompt_tokens
                    output_tokens = chunk.usage.completion_tokens
                for choice in chunk.choices:
                    delta = choice.delta
                    if delta.content:
                        text.append(delta.content)
                        await on_delta(delta.content)
                    for piece in delta.tool_calls or ():
                        call = calls.setdefault(piece.index,
                                                {"id": "", "name": "", "arguments": ""})
                        call["id"] = piece.id or call["id"]
                        if piece.function is not None:
                            call["name"] += piece.function.name or ""
                            call["arguments"] += piece.function.arguments or ""
                    finish = choice.finish_reason or finish
        if finish is None:
            raise self._malformed("the stream ended before its finish reason (cut short)")
        tool_calls = tuple(ToolCall(c["id"], c["name"], c["arguments"])
                           for _, c in sorted(calls.items()))
        return self._response("".join(text) or None, tool_calls, finish, input_tokens,
                              output_tokens, model)
