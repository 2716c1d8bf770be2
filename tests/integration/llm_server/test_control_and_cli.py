"""The request log, the control endpoints, the CLI process, bursts and one-write answers."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest

from garrison.testing import LLMServer, fingerprint
from tests.integration.llm_server._http import openai_http_client

HI: Any = [{"role": "user", "content": "hi"}]


async def test_request_log_records_every_request_in_order(
        server: LLMServer, openai_client: openai.AsyncOpenAI) -> None:
    server.set_faults("429:1x1")
    messages: Any = [{"role": "system", "content": "s"}, {"role": "user", "content": "first"},
                     {"role": "assistant", "content": "ok"}, {"role": "user", "content": "last"}]

    with pytest.raises(openai.RateLimitError):
        await openai_client.chat.completions.create(model="gpt-a", messages=messages)
    stream = await openai_client.chat.completions.create(model="gpt-b", messages=HI,
                                                         stream=True)
    async for _ in stream:
        pass

    first, second = server.requests()
    assert {k: first[k] for k in ("n", "api", "model", "stream", "outcome", "last_user",
                                  "messages")} == {
        "n": 1, "api": "openai", "model": "gpt-a", "stream": False, "outcome": "status:429",
        "last_user": "last", "messages": 4}
    assert first["fingerprint"] == fingerprint("gpt-a", messages)
    assert re.fullmatch(r"[0-9a-f]{64}", first["fingerprint"])
    assert (second["n"], second["stream"], second["outcome"]) == (2, True, "ok")
    assert first["at"] <= second["at"]


async def test_requests_endpoint_matches_the_log(server: LLMServer,
                                                 openai_client: openai.AsyncOpenAI,
                                                 http: httpx2.AsyncClient) -> None:
    await openai_client.chat.completions.create(model="m", messages=HI)

    response = await http.get("/_garrison/requests")

    assert response.json() == {"requests": server.requests()}


async def test_faults_endpoint_replaces_and_clears_faults(
        server: LLMServer, openai_client: openai.AsyncOpenAI,
        http: httpx2.AsyncClient) -> None:
    set_spec = await http.post("/_garrison/faults", json={"spec": "503:1x1"})
    with pytest.raises(openai.InternalServerError):
        await openai_client.chat.completions.create(model="m", messages=HI)
    set_list = await http.post("/_garrison/faults",
                               json={"faults": [{"kind": "status", "status": 429}]})
    with pytest.raises(openai.RateLimitError):
        await openai_client.chat.completions.create(model="m", messages=HI)
    cleared = await http.post("/_garrison/faults", json={"faults": []})
    reply = await openai_client.chat.completions.create(model="m", messages=HI)

    assert set_spec.status_code == set_list.status_code == cleared.status_code == 200
    assert set_spec.json()["faults"][0]["status"] == 503
    assert cleared.json() == {"faults": []}
    assert reply.choices[0].message.content == "ok"


async def test_faults_endpoint_rejects_a_bad_spec_with_the_grammar(
        http: httpx2.AsyncClient) -> None:
    bad_spec = await http.post("/_garrison/faults", json={"spec": "429:2"})
    bad_body = await http.post("/_garrison/faults", json={"nothing": 1})
    not_json = await http.post("/_garrison/faults", content=b"{")

    assert bad_spec.status_code == 400
    assert "'429:2'" in bad_spec.json()["error"]["message"]
    assert "item   := kind" in bad_spec.json()["error"]["message"]
    assert bad_body.status_code == not_json.status_code == 400


async def test_script_endpoint_replaces_the_script(
        openai_client: openai.AsyncOpenAI, http: httpx2.AsyncClient) -> None:
    accepted = await http.post("/_garrison/script", json={
        "rules": [{"match": {"last_user_contains": "HI"}, "response": {"content": "hey"}}]})
    rejected = await http.post("/_garrison/script", json={"rules": [{"contnet": "typo"}]})
    reply = await openai_client.chat.completions.create(model="m", messages=HI)

    assert accepted.json() == {"rules": 1}
    assert rejected.status_code == 400
    assert "script rule 0: key 'contnet'" in rejected.json()["error"]["message"]
    assert reply.choices[0].message.content == "hey"


async def test_reset_endpoint_clears_the_log_and_the_times_counters(
        server: LLMServer, openai_client: openai.AsyncOpenAI, http: httpx2.AsyncClient) -> None:
    server.set_script({"rules": [{"times": 1, "content": "once"}]})
    first = await openai_client.chat.completions.create(model="m", messages=HI)

    reset = await http.post("/_garrison/reset")
    again = await openai_client.chat.completions.create(model="m", messages=HI)

    assert reset.status_code == 200
    assert first.choices[0].message.content == again.choices[0].message.content == "once"
    assert [r["n"] for r in server.requests()] == [1]


async def test_a_bad_request_gets_a_400_in_the_provider_shape(
        server: LLMServer, http: httpx2.AsyncClient) -> None:
    openai_bad = await http.post("/v1/chat/completions", json={"model": "m"})
    anthropic_bad = await http.post("/v1/messages", content=b"not json")

    assert openai_bad.status_code == anthropic_bad.status_code == 400
    assert "'messages'" in openai_bad.json()["error"]["message"]
    assert anthropic_bad.json()["type"] == "error"
    assert [r["outcome"] for r in server.requests()] == ["status:400", "status:400"]


async def test_a_burst_of_100_concurrent_requests_all_succeed(
        server: LLMServer, openai_client: openai.AsyncOpenAI) -> None:
    # The pool holds no idle connection yet: 100 connects land on the listen backlog at once.
    async def one(i: int) -> str | None:
        reply = await openai_client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": f"burst {i}"}])
        return reply.choices[0].message.content

    answers = await asyncio.gather(*(one(i) for i in range(100)))

    assert answers == ["ok"] * 100
    assert sorted(r["last_user"] for r in server.requests()) == sorted(
        f"burst {i}" for i in range(100))


def test_a_plain_answer_leaves_in_one_segment(server: LLMServer) -> None:
    # Head and body in one send: read once, get the whole answer (loopback, < 1 kB).
    body = json.dumps({"model": "m", "messages": HI}).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
                     b"content-type: application/json\r\n"
                     b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        first_read = sock.recv(65536)

    head, _, rest = first_read.partition(b"\r\n\r\n")
    declared = re.search(rb"content-length: (\d+)", head.lower())
    assert declared is not None
    assert len(rest) == int(declared.group(1))
    assert json.loads(rest)["choices"][0]["message"]["content"] == "ok"


def test_async_context_manager_and_restart_rules() -> None:
    async def scenario() -> str | None:
        async with LLMServer({"default": {"content": "own loop"}}) as own:
            client = openai.AsyncOpenAI(base_url=own.openai_base_url, api_key="test",
                                        max_retries=0, http_client=openai_http_client())
            reply = await client.chat.completions.create(model="m", messages=HI)
            await client.close()
            return reply.choices[0].message.content

    assert asyncio.run(scenario()) == "own loop"


@pytest.fixture
def cli_process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    script = tmp_path / "script.json"
    script.write_text(json.dumps({"rules": [{"model": "gpt-*", "content": "from the cli"}]}))
    process = subprocess.Popen(
        [sys.executable, "-m", "garrison", "llm-server", "--script", str(script),
         "--faults", "503:1x1", "--port", "0", "--seed", "3"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert process.stdout is not None
    line = process.stdout.readline()
    try:
        yield process, line
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


async def test_cli_prints_its_address_serves_and_stops_on_sigterm(
        cli_process: tuple[subprocess.Popen[str], str]) -> None:
    process, line = cli_process
    found = re.fullmatch(r"listening on (http://127\.0\.0\.1:(\d+))\n", line)
    assert found is not None, line
    client = openai.AsyncOpenAI(base_url=found.group(1) + "/v1", api_key="test",
                                max_retries=0, http_client=openai_http_client())
    try:
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(model="gpt-x", messages=HI)
        reply = await client.chat.completions.create(model="gpt-x", messages=HI)
    finally:
        await client.close()
    process.send_signal(signal.SIGTERM)
    out, _ = await asyncio.to_thread(process.communicate, timeout=10)

    assert reply.choices[0].message.content == "from the cli"
    assert process.returncode == 0
    assert out == ""  # the listening line was the only output


@pytest.mark.parametrize(("args", "message"), [
    (["--faults", "429:lots"], "fault spec item '429:lots'"),
    (["--script", "/nonexistent/script.json"], "cannot read it"),
])
def test_cli_rejects_bad_arguments_with_exit_code_2(args: list[str], message: str) -> None:
    done = subprocess.run([sys.executable, "-m", "garrison", "llm-server", *args],
                          capture_output=True, text=True, timeout=30)

    assert done.returncode == 2
    assert message in done.stdout + done.stderr
    assert "listening on" not in done.stdout
