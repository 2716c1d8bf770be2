"""`record_event`: model fallbacks and supervisor restarts as span events and counters;
events from workflow code are not reported again when the run replays its journal."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prometheus_client import generate_latest

from garrison import Context, Garrison
from garrison.agents import Agent, ScriptedModel
from garrison.engine import EngineHooks, StepInfo, record_event
from garrison.resilience import Child, Supervisor
from tests.integration.observability.conftest import Telemetry
from tests.unit._agents_support import unavailable


def events(span: Any, name: str) -> list[dict[str, Any]]:
    return [dict(e.attributes or {}) for e in span.events if e.name == name]


def counted(telemetry: Telemetry, name: str) -> int:
    return sum(int(p.value) for p in telemetry.points("garrison.events")  # type: ignore[attr-defined]
               if dict(p.attributes)["garrison.event.name"] == name)  # type: ignore[attr-defined]


async def test_a_model_fallback_is_an_event_on_the_agent_span(tmp_path: Path,
                                                              telemetry: Telemetry) -> None:
    primary = ScriptedModel([unavailable("primary", retryable=False)], name="primary")
    backup = ScriptedModel(["served"], name="backup")
    agent = Agent("fb", model=primary, fallback_models=[backup])
    app = Garrison(f"sqlite:///{tmp_path}/g.db")
    app.add_agent(agent)
    instrumentation = telemetry.attach(app)
    async with app:
        assert (await agent.run(app, "hi", run_id="r")).output == "served"
    [span] = telemetry.named("invoke_agent fb")
    [fallback] = events(span, "garrison.model.fallback")
    assert fallback == {"gen_ai.agent.name": "fb", "garrison.fallback.from": "test:primary",
                        "garrison.fallback.to": "test:backup",
                        "garrison.fallback.reason": "error", "error.type": "server"}
    assert counted(telemetry, "garrison.model.fallback") == 1
    scrape = generate_latest(instrumentation.registry).decode()
    assert 'garrison_events_total{event="garrison.model.fallback"} 1.0' in scrape


async def test_a_supervisor_restart_is_an_event_on_the_supervisor_span(
        tmp_path: Path, telemetry: Telemetry) -> None:
    app = Garrison(f"sqlite:///{tmp_path}/g.db")

    @app.workflow(name="desk_worker")
    async def desk_worker(ctx: Context, label: str) -> str:
        if ctx.run_id.endswith("#1"):
            raise RuntimeError("first generation fails")
        return label

    tree = Supervisor("desk", [Child(desk_worker, ("a",), name="a", restart="transient")])
    telemetry.attach(app)
    async with app:
        handle = await app.start(tree, run_id="t")  # type: ignore[arg-type]
        await handle.result(timeout=20)
    restarts = [e for span in telemetry.named("invoke_workflow supervisor:desk")
                for e in events(span, "garrison.supervisor.restart")]
    assert restarts == [{
        "garrison.supervisor.name": "desk", "garrison.supervisor.strategy": "one_for_one",
        "garrison.child.label": "a", "garrison.child.run_id": "t/a#1",
        "garrison.child.status": "QUARANTINED", "garrison.supervisor.restarting": ("a",),
        "garrison.supervisor.restarts_in_period": 1}]
    assert counted(telemetry, "garrison.supervisor.restart") == 1


async def test_workflow_events_are_reported_once_across_a_replay(tmp_path: Path,
                                                                 telemetry: Telemetry) -> None:
    app = Garrison(f"sqlite:///{tmp_path}/g.db")

    @app.step(name="note")
    async def note() -> None:
        record_event("shop.in_step", where="step")

    @app.workflow(name="parked")
    async def parked(ctx: Context) -> str:
        record_event("shop.before_sleep", n=1)
        await note()
        await ctx.sleep(dt.timedelta(seconds=0.05))  # parks: the next segment replays
        record_event("shop.after_sleep", n=2)
        return "ok"

    telemetry.attach(app)
    async with app:
        assert await (await app.start(parked, run_id="p")).result(timeout=10) == "ok"
    segments = sorted(telemetry.named("invoke_workflow parked"),
                      key=lambda s: s.start_time or 0)
    assert len(segments) == 2  # the run parked once
    assert [[e.name for e in s.events if e.name.startswith("shop.")] for s in segments] == [
        ["shop.before_sleep"], ["shop.after_sleep"]]
    [step] = telemetry.named("step note")
    assert events(step, "shop.in_step") == [{"where": "step"}]
    assert counted(telemetry, "shop.before_sleep") == 0  # application names: not counted


async def test_record_event_outside_a_run_reaches_no_hook(tmp_path: Path) -> None:
    seen: list[str] = []

    class Recorder(EngineHooks):
        def run_event(self, run_id: str, step: StepInfo | None, name: str,
                      attributes: Mapping[str, Any]) -> None:
            seen.append(name)

    app = Garrison(f"sqlite:///{tmp_path}/g.db", hooks=[Recorder()])

    @app.workflow(name="w")
    async def w(ctx: Context) -> None:
        record_event("shop.inside")

    async with app:
        record_event("shop.outside", x=1)
        await (await app.start(w)).result(timeout=10)
    assert seen == ["shop.inside"]
