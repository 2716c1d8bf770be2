"""HTTP clients for the tests: the SDKs' defaults, minus what plain HTTP does not need."""

from __future__ import annotations

import openai


def openai_http_client() -> openai.DefaultAsyncHttpxClient:
    """The SDK's default HTTP client, without loading CA certificates (≈ 50 ms a client;
    the server speaks plain HTTP)."""
    return openai.DefaultAsyncHttpxClient(verify=False)
