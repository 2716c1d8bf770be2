"""What every SDK-backed model shares: its names, credentials, one client per event
loop, and the classification of the SDK's errors."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import SecretStr

from garrison.agents._messages import Message, ModelResponse, ModelSettings
from garrison.agents._model import DeltaHandler
from garrison.agents.providers._errors import classify, provider_error
from garrison.agents.providers._trace import trace_headers
from garrison.errors import MalformedResponse, ProviderError

__all__ = ["SDKModel"]

C = TypeVar("C")


class SDKModel(Generic[C]):
    """Base of `OpenAIModel` and `AnthropicModel`. Subclasses name their environment
    variables and SDK exception types, build a client in `_new_client`, the request in
    `_params`, and make the call in `_complete` / `_stream`."""

    base_url_env: ClassVar[str]
    api_key_env: ClassVar[str]
    # The SDK's exception types, for `classify`: status, timeout, connection, response.
    sdk_errors: ClassVar[tuple[type[BaseException], type[BaseException],
                               type[BaseException], type[BaseException] | None]]
    sdk_root_error: ClassVar[type[BaseException]]  # every error the SDK raises

    def __init__(self, model_name: str, *, provider: str, base_url: str | None,
                 api_key: str | SecretStr | None, timeout_s: float, client: C | None) -> None:
        self.model_name = model_name
        self.provider = provider
        self.name = f"{provider}:{model_name}"
        self.base_url = base_url or os.environ.get(self.base_url_env)
        key = api_key if api_key is not None else os.environ.get(self.api_key_env)
        self._api_key = key if isinstance(key, SecretStr) or key is None else SecretStr(key)
        self.timeout_s = timeout_s
        self._own_client = client
        self._clients: dict[int, C] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.model_name!r}, base_url={self.base_url!r})"

    def _new_client(self, api_key: str) -> C:
        raise NotImplementedError

    def _params(self, messages: Sequence[Message], tools: Sequence[Mapping[str, Any]],
                settings: ModelSettings, output_schema: Mapping[str, Any] | None
                ) -> dict[str, Any]:
        raise NotImplementedError

    async def _complete(self, params: dict[str, Any]) -> ModelResponse:
        raise NotImplementedError

    async def _stream(self, params: dict[str, Any], on_delta: DeltaHandler) -> ModelResponse:
        raise NotImplementedError

    async def request(self, messages: Sequence[Message], *,
                      tools: Sequence[Mapping[str, Any]] = (),
                      settings: ModelSettings | None = None,
                      output_schema: Mapping[str, Any] | None = None,
                      on_delta: DeltaHandler | None = None) -> ModelResponse:
        """One call (streamed when `on_delta` is given); every failure is a
        `ProviderError` subclass that says whether to retry."""
        params = self._params(messages, tools, settings or ModelSettings(), output_schema)
        headers = trace_headers()  # the step's span, so the provider call joins the trace
        if headers is not None:
            params["extra_headers"] = {**params.get("extra_headers", {}), **headers}
        try:
            if on_delta is not None:
                return await self._stream(params, on_delta)
            return await self._complete(params)
        except ProviderError:
            raise
        except self.sdk_root_error as exc:
            raise self._error(exc) from exc
        except (ValueError, KeyError) as exc:  # a body the SDK could not decode
            raise self._malformed(f"unreadable answer ({exc})") from exc
        except Exception as exc:  # a transport error the SDK let through (a cut stream)
            raise self._malformed(f"{type(exc).__name__}: {exc}") from exc

    def _client(self) -> C:
        """The client given, else one per event loop: its connection pool belongs to it."""
        if self._own_client is not None:
            return self._own_client
        loop = id(asyncio.get_running_loop())
        client = self._clients.get(loop)
        if client is None:
            key = self._api_key.get_secret_value() if self._api_key is not None else None
            client = self._new_client(key or "unset")
            self._clients[loop] = client
        return client

    def _error(self, exc: BaseException) -> Exception:
        status, timeout, connection, response = self.sdk_errors
        return classify(exc, provider=self.provider, model=self.model_name,
                        status_error=status, timeout_error=timeout,
                        connection_error=connection, response_error=response)

    def _malformed(self, what: str) -> Exception:
        return provider_error(MalformedResponse, f"{self.provider} model {self.model_name!r}: "
                              f"{what}", provider=self.provider, model=self.model_name,
                              kind="malformed", retryable=True)


