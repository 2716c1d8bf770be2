"""A run whose worker was SIGKILLed mid-step is recovered by another: the resumed
segment says so (an event naming the claim reason and the dead worker), the recovery
is counted apart from wake-ups, and `runs show` names it. A wake-up is no recovery."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from typer.testing import CliRunner

from garrison import Context, Garrison
from garrison.cli import app as cli
from garrison.resilience import reliability
from garrison.store import ClaimReason
from tests.integration.observability._killed_worker import build
from tests.integration.observability.conftest import Telemetry

pytestmark = pytest.mark.crash  # a skip of these is a failure under CI=true

WORKER = Path(__file__).with_name("_killed_worker.py")


def kill_mid_step(url: str, ready: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[3])}
    process = subprocess.Popen([sys.executable, str(WORKER), url, str(ready)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert process.poll() is None, process.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the worker never reached its step"
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(30)


def recovered_samples(exposition: str) -> list[str]:
    return [line for line in exposition.splitlines()
            if line.startswith("garrison_runs_recovered_total{")]


async def test_a_run_of_a_killed_worker_is_recovered_and_says_so(
        db_url: str, tmp_path: Path, telemetry: Telemetry) -> None:
    kill_mid_step(db_url, tmp_path / "ready")

    rescuer = build(db_url, "w-rescuer", None)
    instrumentation = telemetry.attach(rescuer)
    async with rescuer:
        assert await rescuer.handle("r-1").result(timeout=30) == "held"
        stored = await rescuer.store.get_run("r-1")
        figures = await reliability(rescuer.store)

    assert stored is not None
    assert (stored.claim_reason, stored.previous_owner) == (ClaimReason.ABANDONED, "w-killed")
    assert stored.recoveries == 1 and figures.workflows["recover"].recovered == 1
    [segment] = telemetry.named("invoke_workflow recover")
    attributes = dict(segment.attributes or {})
    assert attributes["garrison.run.resumed"] is True
    assert attributes["garrison.run.claim_reason"] == "abandoned"
    [event] = [e for e in segment.events if e.name == "garrison.run.recovered"]
    assert dict(event.attributes or {}) == {"garrison.run.claim_reason": "abandoned",
                                            "garrison.run.previous_worker": "w-killed"}
    exposition = generate_latest(instrumentation.registry).decode()
    assert recovered_samples(exposition) == [
        'garrison_runs_recovered_total{reason="abandoned",workflow="recover"} 1.0']
    [point] = telemetry.points("garrison.runs.recovered")
    assert (point.attributes, point.value) == (  # type: ignore[attr-defined]
        {"garrison.workflow.name": "recover", "garrison.run.claim_reason": "abandoned"}, 1)

    shown = await asyncio.to_thread(CliRunner().invoke, cli,  # the CLI runs its own loop
                                    ["runs", "show", "r-1", "--db", db_url, "--json"])
    assert shown.exit_code == 0, shown.output
    body = json.loads(shown.output)
    assert (body["claim_reason"], body["previous_owner"], body["recoveries"]) == (
        "abandoned", "w-killed", 1)
    table = await asyncio.to_thread(CliRunner().invoke, cli,
                                    ["runs", "show", "r-1", "--db", db_url])
    caption = " ".join(table.output.split())
    assert "w1 = w-killed" in caption and "recovered 1x (last: abandoned by w1)" in caption


async def test_a_woken_run_is_resumed_but_not_recovered(db_url: str,
                                                        telemetry: Telemetry) -> None:
    app = Garrison(db_url, worker_id="w-1")

    @app.workflow(name="napper")
    async def napper(ctx: Context) -> str:
        await ctx.sleep(0.3)
        return "rested"

    instrumentation = telemetry.attach(app)
    async with app:
        assert await (await app.start(napper, run_id="n-1")).result(timeout=30) == "rested"
        stored = await app.store.get_run("n-1")
        figures = await reliability(app.store)

    assert stored is not None and stored.claim_reason is ClaimReason.WAKE_UP
    assert stored.fence == 2  # claimed twice, but never taken over while RUNNING
    assert stored.recoveries == 0 and figures.workflows["napper"].recovered == 0
    segments = sorted(telemetry.named("invoke_workflow napper"), key=lambda s: s.start_time or 0)
    assert [dict(s.attributes or {}).get("garrison.run.claim_reason") for s in segments] == [
        "start", "wake_up"]  # claimed as it was made, then woken
    assert [bool(s.links) for s in segments] == [False, True]  # a resume links, a start not
    assert not [e for s in segments for e in s.events if e.name == "garrison.run.recovered"]
    exposition = generate_latest(instrumentation.registry).decode()
    assert recovered_samples(exposition) == []
    assert 'garrison_runs_resumed_total{workflow="napper"} 1.0' in exposition


async def test_a_first_start_claimed_from_a_queue_is_a_start_with_no_link(
        tmp_path: Path, telemetry: Telemetry) -> None:
    app = Garrison(f"sqlite:///{tmp_path}/g.db", worker_id="w-1")
    app.queue("limited", concurrency=2)  # a limited queue's runs wait for a claim

    @app.workflow(name="queued")
    async def queued(ctx: Context) -> str:
        return "ok"

    telemetry.attach(app)
    async with app:
        handle = await app.start(queued, run_id="q-1", queue="limited")
        assert await handle.result(timeout=10) == "ok"

    segment = telemetry.one("invoke_workflow queued")
    attributes = dict(segment.attributes or {})
    assert (attributes["garrison.run.resumed"], attributes["garrison.run.claim_reason"]) == (
        False, "start")
    assert not segment.links and not [e for e in segment.events
                                      if e.name == "garrison.run.recovered"]
