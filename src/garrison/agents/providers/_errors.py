"""Provider failures as Garrison errors, classified from status codes and SDK types.

Retries, breakers and fallbacks decide on `ProviderError.retryable` and `retry_after`,
never on a message. Both official SDKs raise httpx-based errors with the same shape
(`status_code`, `response.headers`, `body`), so one classifier serves them.
"""

from __future__ import annotations

from typing import Any

from garrison.errors import (
    ContentFiltered,
    ContextTooLong,
    InvalidModelRequest,
    MalformedResponse,
    ProviderAuthError,
    ProviderError,
    ProviderRateLimited,
    ProviderUnavailable,
)
from garrison.resilience import retry_after_s

__all__ = ["classify", "provider_error"]

_CONTEXT_MARKERS = ("context_length", "context length", "maximum context", "too many tokens",
                    "prompt is too long")
_FILTER_MARKERS = ("content_filter", "content filter", "content_policy")


def provider_error(cls: type[ProviderError], message: str, *, provider: str, model: str,
                   kind: str, retryable: bool, status: int | None = None,
                   retry_after: float | None = None) -> ProviderError:
    return cls(message, provider=provider, model=model, kind=kind, retryable=retryable,
               status=status, retry_after=retry_after)


def _body_text(error: Any) -> str:
    body = getattr(error, "body", None)
    code = getattr(error, "code", None)
    return f"{code or ''} {body or ''} {error}".lower()


def classify(error: BaseException, *, provider: str, model: str,
             status_error: type[BaseException], timeout_error: type[BaseException],
             connection_error: type[BaseException],
             response_error: type[BaseException] | None) -> ProviderError:
    """Map one SDK exception to the `ProviderError` subclass that says what to do."""
    where = f"{provider} model {model!r}"
    text = _body_text(error)
    if isinstance(error, timeout_error):
        return provider_error(ProviderUnavailable, f"{where}: the call timed out; retried, "
                              "or served by a fallback model", provider=provider, model=model,
                              kind="timeout", retryable=True)
    if isinstance(error, connection_error):
        return provider_error(ProviderUnavailable, f"{where}: connection failed ({error}); "
                              "check the base URL and the network", provider=provider,
                              model=model, kind="connection", retryable=True)
    if response_error is not None and isinstance(error, response_error):
        return provider_error(MalformedResponse, f"{where}: unreadable answer ({error})",
                              provider=provider, model=model, kind="malformed",
                              retryable=True)
    if isinstance(error, status_error):
        status = int(getattr(error, "status_code", 0) or 0)
        after = retry_after_s(error)
        if status == 429:
            return provider_error(
                ProviderRateLimited, f"{where}: rate limited (429)"
                + (f", retry after {after:g} s" if after is not None else ""),
                provider=provider, model=model, kind="rate_limit", retryable=True,
                status=status, retry_after=after)
        if status in (401, 403):
            return provider_error(
                ProviderAuthError, f"{where}: credentials refused ({status}); check the API "
                "key (OPENAI_API_KEY / ANTHROPIC_API_KEY or api_key=)", provider=provider,
                model=model, kind="auth", retryable=False, status=status)
        if any(m in text for m in _CONTEXT_MARKERS):
            return provider_error(
                ContextTooLong, f"{where}: the conversation is longer than the model's "
                "context; shorten the history or fall back to a larger model",
                provider=provider, model=model, kind="context_length", retryable=False,
                status=status)
        if any(m in text for m in _FILTER_MARKERS):
            return provider_error(
                ContentFiltered, f"{where}: blocked by the provider's content filter",
                provider=provider, model=model, kind="content_filter", retryable=False,
                status=status)
        if status >= 500 or status in (408, 409, 529):
            return provider_error(
                ProviderUnavailable, f"{where}: server error {status}; retried, or served "
                "by a fallback model", provider=provider, model=model, kind="server",
                retryable=True, status=status, retry_after=after)
        return provider_error(
            InvalidModelRequest, f"{where}: request rejected ({status}): {error}",
            provider=provider, model=model, kind="invalid_request", retryable=False,
            status=status)
    return provider_error(MalformedResponse, f"{where}: unexpected failure "
                          f"{type(error).__name__}: {error}", provider=provider, model=model,
                          kind="malformed", retryable=True)
