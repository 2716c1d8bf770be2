"""SIGKILL an agent's worker during a model call, inside a side-effecting tool and in the
middle of a streamed answer; the next process resumes the conversation.

What must hold, checked against the LLM server's own request log and the tools' effects
log: a model call whose answer was journaled is never sent again; only the call in
flight at the kill is; a completed tool call never runs again, the interrupted refund
runs again with the same idempotency key; a stream shows each piece of text once.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from garrison import Garrison
from garrison.testing import LLMServer
from tests.pg import drop_schemas, fresh_postgres_url

pytestmark = pytest.mark.crash  # a skip of these is a failure under CI=true

WORKLOAD = Path(__file__).with_name("_agent_workload.py")
SCRIPT = {
    "rules": [
        {"last_role": "user", "last_user_contains": "refund",
         "tool_calls": [{"name": "lookup_order", "arguments": {"order_id": "42"}}]},
        {"last_tool": "lookup_order",
         "tool_calls": [{"name": "refund", "arguments": {"order_id": "42", "cents": 1299}}]},
        {"last_tool": "refund",
         "content": "Your refund is done: {last_tool_result}. Thank you for your patience."},
    ],
}
ANSWER = ("Your refund is done: refunded 1299 cents on order 42. Thank you for your "
          "patience.")


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/g.db"
    else:
        yield fresh_postgres_url()
        drop_schemas()


@pytest.fixture
def server() -> Iterator[LLMServer]:
    with LLMServer(SCRIPT) as running:
        yield running


def run(tmp_path: Path, db_url: str, server: LLMServer,
        *flags: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    return subprocess.run(
        [sys.executable, str(WORKLOAD), "--url", db_url,
         "--base-url", server.openai_base_url, "--effects", str(tmp_path / "effects.log"),
         *flags], capture_output=True, text=True, timeout=60, env=env)


def answered(server: LLMServer) -> Counter[tuple[str, int]]:
    """How often the server answered each (conversation, turn)."""
    return Counter((r["last_user"], r["messages"]) for r in server.requests()
                   if r["outcome"] == "ok")


def effects(tmp_path: Path) -> Counter[str]:
    return Counter((tmp_path / "effects.log").read_text().splitlines())


def kill_then_resume(tmp_path: Path, db_url: str, server: LLMServer, point: str,
                     *flags: str) -> list[dict[str, Any]]:
    killed = run(tmp_path, db_url, server, "--point", point, *flags)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert [json.loads(line)["run_id"] for line in killed.stdout.splitlines()] == ["conv-1"]
    resumed = run(tmp_path, db_url, server, *flags)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    results = [json.loads(line) for line in resumed.stdout.splitlines()]
    assert results == [{"run_id": "conv-1", "answer": ANSWER},
                       {"run_id": "conv-2", "answer": ANSWER}]
    return results


def test_model_call_answered_but_not_journaled_is_the_only_one_sent_again(
        tmp_path: Path, db_url: str, server: LLMServer) -> None:
    kill_then_resume(tmp_path, db_url, server, "model")
    calls = answered(server)
    first, second = "Customer 1: please refund order 42", "Customer 2: please refund order 42"
    # conv-1 finished before the kill: each of its three calls was answered once.
    assert [calls[(first, n)] for n in (2, 4, 6)] == [1, 1, 1]
    # conv-2 died right after its second call was answered: that call, and only it,
    # went out again; its first call (journaled) did not.
    assert [calls[(second, n)] for n in (2, 4, 6)] == [1, 2, 1]
    lines = effects(tmp_path)
    assert sum(n for line, n in lines.items() if line.startswith("lookup")) == 2
    assert all(n == 1 for n in lines.values())  # no tool ran twice


def test_refund_interrupted_by_sigkill_runs_again_with_the_same_idempotency_key(
        tmp_path: Path, db_url: str, server: LLMServer) -> None:
    kill_then_resume(tmp_path, db_url, server, "tool")
    lines = effects(tmp_path)
    refunds = {line: n for line, n in lines.items() if line.startswith("refund")}
    assert sorted(refunds.values()) == [1, 2]  # conv-2's refund: at-least-once, same key
    [(twice, _)] = [(line, n) for line, n in refunds.items() if n == 2]
    assert twice.startswith("refund conv-2:")
    assert all(n == 1 for line, n in lines.items() if line.startswith("lookup"))
    calls = answered(server)
    assert all(n == 1 for n in calls.values())  # no model call was sent twice
    assert len(calls) == 6


def test_stream_killed_mid_answer_resumes_without_repeating_text(
        tmp_path: Path, db_url: str, server: LLMServer) -> None:
    kill_then_resume(tmp_path, db_url, server, "stream", "--stream")
    calls = answered(server)
    second = "Customer 2: please refund order 42"
    assert calls[(second, 6)] == 2  # the streamed call in flight went out again

    async def read_stream() -> list[tuple[str, str]]:
        app = Garrison(db_url, worker=False)
        async with app:
            return [(r.kind, r.data) async for r in app.stream("conv-2")]

    records = asyncio.run(read_stream())
    kinds = [kind for kind, _ in records]
    assert "agent.reset" not in kinds  # the re-run answered the same: nothing to take back
    text = "".join(json.loads(data)["text"] for kind, data in records
                   if kind == "agent.text")
    assert text == ANSWER  # each piece once, in order, across the kill
    assert kinds.count("agent.tool_call") == 2 and kinds.count("agent.tool_result") == 2
