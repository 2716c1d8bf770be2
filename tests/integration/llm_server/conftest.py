"""One `LLMServer` for the whole folder (its own thread and loop), reset before each test;
clients are the official `openai.AsyncOpenAI` and `anthropic.AsyncAnthropic` over HTTP."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import anthropic
import httpx2
import openai
import pytest

from garrison.testing import LLMServer
from tests.integration.llm_server._http import openai_http_client


@pytest.fixture(scope="session")
def llm_server_session() -> Iterator[LLMServer]:
    with LLMServer() as server:
        yield server


@pytest.fixture
def server(llm_server_session: LLMServer) -> LLMServer:
    llm_server_session.set_script({})
    llm_server_session.set_faults(None)
    llm_server_session.reset()
    return llm_server_session


@pytest.fixture
async def openai_client(server: LLMServer) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=server.openai_base_url, api_key="test",
                                max_retries=0, http_client=openai_http_client())
    yield client
    await client.close()


@pytest.fixture
async def anthropic_client(server: LLMServer) -> AsyncIterator[anthropic.AsyncAnthropic]:
    client = anthropic.AsyncAnthropic(
        base_url=server.anthropic_base_url, api_key="test", max_retries=0,
        http_client=anthropic.DefaultAsyncHttpxClient(verify=False))
    yield client
    await client.close()


@pytest.fixture
async def http(server: LLMServer) -> AsyncIterator[httpx2.AsyncClient]:
    async with httpx2.AsyncClient(base_url=server.url, verify=False) as client:
        yield client
