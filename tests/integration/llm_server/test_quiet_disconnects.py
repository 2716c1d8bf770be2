"""Expected disconnects leave uvicorn's and starlette's logs quiet; a bug in the server does not.

Each test runs its own `LLMServer` and reads the records after it stopped: stopping waits
for every in-flight handler, so a record logged after the client saw its error is in.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import httpx2
import pytest

from garrison.testing import LLMServer, Script, ScriptedReply

BODY: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


class _ErrorRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def server_errors() -> Iterator[list[logging.LogRecord]]:
    """ERROR records of uvicorn (its `uvicorn.error` logger included) and starlette."""
    handler = _ErrorRecords()
    loggers = [logging.getLogger(name) for name in ("uvicorn", "starlette")]
    for logger in loggers:
        logger.addHandler(handler)
    yield handler.records
    for logger in loggers:
        logger.removeHandler(handler)


def _described(records: list[logging.LogRecord]) -> list[str]:
    return [f"{r.name}: {r.getMessage().strip()} {r.exc_info[1]!r}" if r.exc_info
            else f"{r.name}: {r.getMessage().strip()}" for r in records]


@pytest.mark.parametrize(("spec", "stream"), [("reset", False), ("reset", True),
                                              ("truncate", False), ("truncate", True)])
async def test_fault_cutting_the_connection_logs_no_server_error(
        server_errors: list[logging.LogRecord], spec: str, stream: bool) -> None:
    async with LLMServer(faults=spec) as server:
        async with httpx2.AsyncClient(base_url=server.url) as client:
            with pytest.raises(httpx2.TransportError):
                async with client.stream("POST", "/v1/chat/completions",
                                         json={**BODY, "stream": stream}) as response:
                    await response.aread()
        outcomes = [r["outcome"] for r in server.requests()]

    assert outcomes == [spec]
    assert _described(server_errors) == []


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages", "/_garrison/script"])
async def test_client_leaving_mid_body_logs_no_server_error(
        server_errors: list[logging.LogRecord], path: str) -> None:
    body = json.dumps(BODY).encode()
    async with LLMServer() as server:
        host, port = server.url.removeprefix("http://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(f"POST {path} HTTP/1.1\r\nhost: {host}\r\n"
                     f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
                     "expect: 100-continue\r\n\r\n".encode())
        # uvicorn sends 100 Continue when the handler first reads the body: it is waiting.
        assert (await reader.readline()).startswith(b"HTTP/1.1 100")
        writer.write(body[: len(body) // 2])
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        requests = server.requests()

    assert requests == []  # its body never arrived: not a request the server answered
    assert _described(server_errors) == []


async def test_client_timing_out_during_a_timeout_fault_logs_no_server_error(
        server_errors: list[logging.LogRecord]) -> None:
    async with LLMServer(faults="timeout@30") as server:
        # Only the read is short: a connect slowed by a loaded CI machine must not time out.
        timeout = httpx2.Timeout(10.0, read=0.1)
        async with httpx2.AsyncClient(base_url=server.url, timeout=timeout) as client:
            with pytest.raises(httpx2.ReadTimeout):
                await client.post("/v1/chat/completions", json=BODY)
        outcomes = [r["outcome"] for r in server.requests()]
        # Leaving the block stops the server, which ends the 30 s hold at once.

    assert outcomes == ["timeout"]
    assert _described(server_errors) == []


class _BrokenScript(Script):
    """A script with a bug: every reply raises."""

    def reply(self, model: str, messages: Sequence[Mapping[str, Any]],
              tools: Sequence[Mapping[str, Any]] | None = None, *,
              consume: bool = True) -> ScriptedReply:
        raise RuntimeError("bug in the script")


async def test_bug_in_the_server_is_still_logged_with_its_traceback(
        server_errors: list[logging.LogRecord]) -> None:
    async with (LLMServer(_BrokenScript()) as server,
                httpx2.AsyncClient(base_url=server.url) as client):
        response = await client.post("/v1/chat/completions", json=BODY)

    assert response.status_code == 500
    assert _described(server_errors) == [
        "uvicorn.error: Exception in ASGI application RuntimeError('bug in the script')"]
