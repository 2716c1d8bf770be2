"""Providers: SDK exceptions (built by hand, as the SDKs build them from a response)
classified into ProviderError subclasses, and the conversation in each API's form."""

from __future__ import annotations

import asyncio
import json
import pickle
from collections.abc import Callable
from typing import Any

import anthropic
import httpx2
import openai
import pytest

from garrison.agents import AnthropicModel, Message, ModelSettings, OpenAIModel, ToolCall
from garrison.agents.providers.anthropic import to_anthropic_messages
from garrison.agents.providers.openai import to_openai_messages
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

OPENAI_URL = "https://api.openai.com/v1/chat/completions"
ANTHROPIC_URL = "https://api.anthropic.com/v1/messages"


def http_response(url: str, status: int, body: Any,
                  headers: dict[str, str] | None = None) -> httpx2.Response:
    return httpx2.Response(status, headers=headers or {}, json=body,
                           request=httpx2.Request("POST", url))


def openai_status(cls: type[openai.APIStatusError], status: int, *, message: str = "failed",
                  code: str | None = None, headers: dict[str, str] | None = None
                  ) -> openai.APIStatusError:
    """As `AsyncOpenAI._make_status_error` builds it: the body is the inner error."""
    body = {"error": {"message": message, "type": "invalid_request_error", "code": code}}
    response = http_response(OPENAI_URL, status, body, headers)
    return cls(f"Error code: {status} - {body}", response=response, body=body["error"])


def anthropic_status(cls: type[anthropic.APIStatusError], status: int, *,
                     error_type: str = "api_error", message: str = "failed",
                     headers: dict[str, str] | None = None) -> anthropic.APIStatusError:
    body = {"type": "error", "error": {"type": error_type, "message": message}}
    response = http_response(ANTHROPIC_URL, status, body, headers)
    return cls(f"Error code: {status} - {body}", response=response, body=body)


@pytest.fixture
def classify_openai() -> Callable[[BaseException], Exception]:
    return OpenAIModel("gpt-4o-mini", api_key="sk-test", base_url="http://127.0.0.1:9")._error


@pytest.fixture
def classify_anthropic() -> Callable[[BaseException], Exception]:
    return AnthropicModel("claude-haiku-4-5", api_key="sk-test",
                          base_url="http://127.0.0.1:9")._error


# -- OpenAI ----------------------------------------------------------------------------


def test_openai_429_with_retry_after_is_rate_limited(
        classify_openai: Callable[[BaseException], Exception]) -> None:
    error = classify_openai(openai_status(openai.RateLimitError, 429,
                                          headers={"retry-after": "7"}))
    assert isinstance(error, ProviderRateLimited)
    assert (error.provider, error.model, error.kind) == ("openai", "gpt-4o-mini",
                                                         "rate_limit")
    assert error.retryable is True
    assert error.status == 429
    assert error.retry_after == 7.0
    assert "retry after 7 s" in str(error)


def test_openai_429_without_header_has_no_retry_after(
        classify_openai: Callable[[BaseException], Exception]) -> None:
    error = classify_openai(openai_status(openai.RateLimitError, 429))
    assert isinstance(error, ProviderRateLimited)
    assert error.retry_after is None


@pytest.mark.parametrize(("cls", "status"), [(openai.AuthenticationError, 401),
                                             (openai.PermissionDeniedError, 403)])
def test_openai_refused_credentials_are_auth_errors_not_retryable(
        classify_openai: Callable[[BaseException], Exception],
        cls: type[openai.APIStatusError], status: int) -> None:
    error = classify_openai(openai_status(cls, status, message="Incorrect API key"))
    assert isinstance(error, ProviderAuthError)
    assert error.retryable is False
    assert error.status == status
    assert "OPENAI_API_KEY" in str(error)
    assert "sk-test" not in str(error)


def test_openai_context_length_exceeded_is_context_too_long(
        classify_openai: Callable[[BaseException], Exception]) -> None:
    error = classify_openai(openai_status(
        openai.BadRequestError, 400, code="context_length_exceeded",
        message="This model's maximum context length is 128000 tokens."))
    assert isinstance(error, ContextTooLong)
    assert (error.kind, error.retryable, error.status) == ("context_length", False, 400)


def test_openai_content_filter_is_content_filtered(
        classify_openai: Callable[[BaseException], Exception]) -> None:
    error = classify_openai(openai_status(openai.BadRequestError, 400, code="content_filter"))
    assert isinstance(error, ContentFiltered)
    assert error.retryable is False


def test_openai_other_400_is_an_invalid_request(
        classify_openai: Callable[[BaseException], Exception]) -> None:
    error = classify_openai(openai_status(openai.NotFoundError, 404,
                                          message="The model does not exist"))
    assert isinstance(error, InvalidModelRequest)
    assert (error.kind, error.retryable, error.status) == ("invalid_request", False, 404)


@pytest.mark.parametrize("status", [500, 502, 503])
def test_openai_server_errors_are_unavailable_and_retryable(
        classify_openai: Callable[[BaseException], Exception], status: int) -> None:
    error = classify_openai(openai_status(openai.InternalServerError, status))
    assert isinstance(error, ProviderUnavailable)
    assert (error.kind, error.retryable, error.status) == ("server", True, status)


def test_openai_503_keeps_its_retry_after(
        classify_openai: Callable[[BaseException], Exception]) -> None:
    error = classify_openai(openai_status(openai.InternalServerError, 503,
                                          headers={"Retry-After": "2.5"}))
    assert isinstance(error, ProviderUnavailable)
    assert error.retry_after == 2.5


def test_openai_timeout_is_unavailable(
        classify_openai: Callable[[BaseException], Exception]) -> None:
    error = classify_openai(openai.APITimeoutError(httpx2.Request("POST", OPENAI_URL)))
    assert isinstance(error, ProviderUnavailable)
    assert (error.kind, error.retryable, error.status) == ("timeout", True, None)


def test_openai_connection_error_is_unavailable(
        classify_openai: Callable[[BaseException], Exception]) -> None:
    error = classify_openai(openai.APIConnectionError(
        request=httpx2.Request("POST", OPENAI_URL)))
    assert isinstance(error, ProviderUnavailable)
    assert (error.kind, error.retryable) == ("connection", True)
    assert "check the base URL" in str(error)


def test_openai_unreadable_answer_is_malformed(
        classify_openai: Callable[[BaseException], Exception]) -> None:
    response = http_response(OPENAI_URL, 200, {"unexpected": True})
    error = classify_openai(openai.APIResponseValidationError(response, {"unexpected": True}))
    assert isinstance(error, MalformedResponse)
    assert error.retryable is True


# -- Anthropic -------------------------------------------------------------------------


@pytest.mark.parametrize(("cls", "status"), [
    (anthropic.InternalServerError, 500), (anthropic.ServiceUnavailableError, 503),
    (anthropic.OverloadedError, 529)])
def test_anthropic_server_errors_are_unavailable_and_retryable(
        classify_anthropic: Callable[[BaseException], Exception],
        cls: type[anthropic.APIStatusError], status: int) -> None:
    error = classify_anthropic(anthropic_status(cls, status, error_type="overloaded_error"))
    assert isinstance(error, ProviderUnavailable)
    assert (error.provider, error.model) == ("anthropic", "claude-haiku-4-5")
    assert (error.kind, error.retryable, error.status) == ("server", True, status)


def test_anthropic_429_with_retry_after_is_rate_limited(
        classify_anthropic: Callable[[BaseException], Exception]) -> None:
    error = classify_anthropic(anthropic_status(anthropic.RateLimitError, 429,
                                                error_type="rate_limit_error",
                                                headers={"retry-after": "30"}))
    assert isinstance(error, ProviderRateLimited)
    assert error.retry_after == 30.0
    assert error.retryable is True


def test_anthropic_401_is_an_auth_error(
        classify_anthropic: Callable[[BaseException], Exception]) -> None:
    error = classify_anthropic(anthropic_status(anthropic.AuthenticationError, 401,
                                                error_type="authentication_error"))
    assert isinstance(error, ProviderAuthError)
    assert error.retryable is False
    assert "ANTHROPIC_API_KEY" in str(error)


def test_anthropic_prompt_too_long_is_context_too_long(
        classify_anthropic: Callable[[BaseException], Exception]) -> None:
    error = classify_anthropic(anthropic_status(
        anthropic.BadRequestError, 400, error_type="invalid_request_error",
        message="prompt is too long: 210000 tokens > 200000 maximum"))
    assert isinstance(error, ContextTooLong)
    assert error.retryable is False


def test_anthropic_timeout_and_connection_are_unavailable(
        classify_anthropic: Callable[[BaseException], Exception]) -> None:
    request = httpx2.Request("POST", ANTHROPIC_URL)
    timeout = classify_anthropic(anthropic.APITimeoutError(request))
    connection = classify_anthropic(anthropic.APIConnectionError(request=request))
    assert isinstance(timeout, ProviderUnavailable)
    assert isinstance(connection, ProviderUnavailable)
    assert (timeout.kind, connection.kind) == ("timeout", "connection")
    assert timeout.retryable and connection.retryable


def test_classified_errors_are_provider_errors_that_pickle() -> None:
    model = OpenAIModel("gpt-4o-mini", api_key="sk-test")
    error = model._error(openai_status(openai.RateLimitError, 429,
                                       headers={"retry-after": "3"}))
    copy = pickle.loads(pickle.dumps(error))
    assert isinstance(copy, ProviderError)
    assert type(copy) is type(error)
    assert (copy.retry_after, copy.status, copy.kind) == (3.0, 429, "rate_limit")


# -- requests through the SDK (a local transport, no network) --------------------------


def openai_with_transport(handler: Callable[[httpx2.Request], httpx2.Response]
                          ) -> OpenAIModel:
    model = OpenAIModel("gpt-4o-mini", api_key="sk-test", base_url="http://llm.test/v1")
    client = openai.AsyncOpenAI(api_key="sk-test", base_url="http://llm.test/v1",
                                max_retries=0,
                                http_client=httpx2.AsyncClient(
                                    transport=httpx2.MockTransport(handler)))
    model._clients[id(asyncio.get_running_loop())] = client  # no http_client= seam
    return model


async def test_openai_request_raises_the_classified_error_from_the_sdk() -> None:
    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(429, headers={"retry-after": "4"},
                               json={"error": {"message": "slow down", "type": "requests",
                                               "code": "rate_limit_exceeded"}})

    model = openai_with_transport(handler)
    with pytest.raises(ProviderRateLimited) as caught:
        await model.request([Message.user("hi")])
    assert caught.value.retry_after == 4.0
    assert isinstance(caught.value.__cause__, openai.RateLimitError)


async def test_openai_request_sends_settings_tools_and_reads_the_answer() -> None:
    sent: list[dict[str, Any]] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        sent.append(json.loads(request.content))
        return httpx2.Response(200, json={
            "id": "x", "object": "chat.completion", "created": 0, "model": "gpt-4o-mini-2024",
            "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                "role": "assistant", "content": None, "tool_calls": [{
                    "id": "c1", "type": "function",
                    "function": {"name": "add", "arguments": '{"a": 1}'}}]}}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}})

    model = openai_with_transport(handler)
    tools = [{"name": "add", "description": "Add.", "parameters": {"type": "object"}}]
    result = await model.request([Message.system("sys"), Message.user("hi")], tools=tools,
                                 settings=ModelSettings(temperature=0.1, max_tokens=9,
                                                        seed=3, stop=("X",)))
    body = sent[0]
    assert body["model"] == "gpt-4o-mini"
    assert body["messages"] == [{"role": "system", "content": "sys"},
                                {"role": "user", "content": "hi"}]
    assert body["tools"] == [{"type": "function", "function": tools[0]}]
    assert (body["temperature"], body["max_tokens"], body["seed"], body["stop"]) == (
        0.1, 9, 3, ["X"])
    assert result.message.tool_calls == (ToolCall("c1", "add", '{"a": 1}'),)
    assert (result.usage.input_tokens, result.usage.output_tokens) == (12, 3)
    assert result.model == "gpt-4o-mini-2024"
    assert result.finish_reason == "tool_calls"


# -- message conversion ----------------------------------------------------------------


def conversation() -> list[Message]:
    return [
        Message.system("Be brief."),
        Message.user("refund order 7"),
        Message("assistant", "Checking.", (ToolCall("c1", "lookup", '{"id": 7}'),
                                           ToolCall("c2", "refund", "not json"))),
        Message("tool", "order 7: paid", tool_call_id="c1", name="lookup"),
        Message("tool", "Error: denied", tool_call_id="c2", name="refund", is_error=True),
        Message("assistant", "Refund denied."),
    ]


def test_to_openai_messages() -> None:
    assert to_openai_messages(conversation()) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "refund order 7"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "lookup", "arguments": '{"id": 7}'}},
            {"id": "c2", "type": "function",
             "function": {"name": "refund", "arguments": "not json"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "order 7: paid"},
        {"role": "tool", "tool_call_id": "c2", "content": "Error: denied"},
        {"role": "assistant", "content": "Refund denied."},
    ]


def test_to_openai_messages_assistant_with_only_tool_calls_keeps_null_content() -> None:
    [converted] = to_openai_messages([Message("assistant", None,
                                              (ToolCall("c", "f", "{}"),))])
    assert converted["content"] is None


def test_to_anthropic_messages_merges_tool_results_into_one_user_turn() -> None:
    system, messages = to_anthropic_messages(conversation())
    assert system == "Be brief."
    assert messages == [
        {"role": "user", "content": "refund order 7"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "c1", "name": "lookup", "input": {"id": 7}},
            {"type": "tool_use", "id": "c2", "name": "refund",
             "input": {"_unparsed": "not json"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "c1", "content": "order 7: paid",
             "is_error": False},
            {"type": "tool_result", "tool_use_id": "c2", "content": "Error: denied",
             "is_error": True}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Refund denied."}]},
    ]


def test_to_anthropic_messages_joins_system_prompts_and_handles_none() -> None:
    system, messages = to_anthropic_messages([Message.system("A"), Message.system("B"),
                                              Message.user("hi")])
    assert system == "A\n\nB"
    assert messages == [{"role": "user", "content": "hi"}]
    assert to_anthropic_messages([Message.user("x")])[0] is None


def test_anthropic_params_put_the_output_schema_in_the_system_prompt() -> None:
    model = AnthropicModel("claude-haiku-4-5", api_key="k", max_tokens=77)
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}}
    params = model._params([Message.system("Sys."), Message.user("hi")], [],
                           ModelSettings(stop=("END",)), schema)
    assert params["max_tokens"] == 77
    assert params["system"].startswith("Sys.\n\nAnswer with only a JSON value")
    assert json.dumps(schema) in params["system"]
    assert params["stop_sequences"] == ["END"]


def test_api_keys_are_secret() -> None:
    model = OpenAIModel("gpt-4o-mini", api_key="sk-very-secret")
    assert "sk-very-secret" not in repr(model)
    assert "sk-very-secret" not in repr(vars(model))
