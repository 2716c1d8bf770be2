"""The `Model` seam: what an agent calls for each turn, and how a name finds one.

`"openai:NAME"` is an `OpenAIModel` configured from `OPENAI_BASE_URL` and
`OPENAI_API_KEY`; `"anthropic:NAME"` an `AnthropicModel` from `ANTHROPIC_BASE_URL` and
`ANTHROPIC_API_KEY`. Any object with this protocol works too (`ScriptedModel` in tests).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from garrison.agents._messages import Message, ModelResponse, ModelSettings
from garrison.errors import ConfigurationError

__all__ = ["DeltaHandler", "Model", "resolve_model"]

DeltaHandler = Callable[[str], Awaitable[None]]


@runtime_checkable
class Model(Protocol):
    """A chat model. `name` identifies it in the journal (e.g. "openai:gpt-4o-mini")."""

    name: str
    provider: str
    model_name: str

    async def request(self, messages: Sequence[Message], *,
                      tools: Sequence[Mapping[str, Any]] = (),
                      settings: ModelSettings | None = None,
                      output_schema: Mapping[str, Any] | None = None,
                      on_delta: DeltaHandler | None = None) -> ModelResponse:
        """One call: the conversation and the tools offered, to one answer.

        With `on_delta`, the answer streams and each text piece is awaited through it
        as it arrives. Raises a `garrison.errors.ProviderError` subclass on failure.
        """
        ...


def resolve_model(spec: str | Model) -> Model:
    """A model from `"provider:name"` or a `Model` (returned as is).

    Raises `ConfigurationError` for an unknown provider or a malformed name.
    """
    if not isinstance(spec, str):
        if isinstance(spec, Model):
            return spec
        raise ConfigurationError(
            f"model={spec!r}: give 'openai:NAME', 'anthropic:NAME' or a Model object "
            "(OpenAIModel(...), AnthropicModel(...), garrison.testing.ScriptedModel(...))")
    provider, sep, name = spec.partition(":")
    if not sep or not name:
        raise ConfigurationError(
            f"model={spec!r}: write 'provider:model', e.g. 'openai:gpt-4o-mini' or "
            "'anthropic:claude-haiku-4-5'")
    if provider == "openai":
        from garrison.agents.providers.openai import OpenAIModel

        return OpenAIModel(name)
    if provider == "anthropic":
        from garrison.agents.providers.anthropic import AnthropicModel

        return AnthropicModel(name)
    raise ConfigurationError(
        f"model={spec!r}: unknown provider {provider!r}; Garrison speaks 'openai' (any "
        "OpenAI-compatible server: vLLM, Ollama, llama.cpp) and 'anthropic'. For another, "
        "pass a Model object")
