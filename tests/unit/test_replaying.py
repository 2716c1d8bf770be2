"""`garrison.engine.replaying()`: workflow code knows when it goes over what its run
already did (a wake-up, `app.replay`), so a side effect of its own (a log line) happens
once; the agents' warnings use it."""

from __future__ import annotations

from garrison import Context, Garrison
from garrison.engine import replaying

from ._support import ParkWatch


async def test_workflow_code_is_replaying_after_a_wake_up_and_under_app_replay(
        db_url: str) -> None:
    watch = ParkWatch()
    app = Garrison(db_url, hooks=[watch])
    seen: list[tuple[str, bool]] = []
    in_step: list[bool] = []

    @app.step()
    async def work(i: int) -> int:
        in_step.append(replaying())
        return i

    @app.workflow(name="twice")
    async def twice(ctx: Context) -> int:
        first = await work(1)
        seen.append(("before the wait", replaying()))
        await ctx.wait_for("go")
        seen.append(("after the wait", replaying()))
        return first + await work(2)

    assert replaying() is False  # outside runs
    async with app:
        handle = await app.start(twice, run_id="t")
        await watch.parked("t")
        await app.send("t", "go")
        assert await handle.result(timeout=10) == 3
        live = list(seen)
        seen.clear()
        await app.replay("t")
    # The wake-up replays the code before the wait (journaled); the rest is live.
    assert live == [("before the wait", False), ("before the wait", True),
                    ("after the wait", False)]
    assert seen == [("before the wait", True), ("after the wait", True)]
    assert in_step == [False, False]  # step bodies run live (replays do not run them)


async def test_an_agents_model_failure_is_logged_once_not_at_every_replay(
        db_url: str) -> None:
    import io
    import json

    import structlog

    from garrison.agents import Agent, ScriptedModel
    from garrison.errors import ProviderUnavailable
    from garrison.observability import configure_logging
    from garrison.resilience import Retry

    down = ProviderUnavailable("primary down", provider="test", model="p", status=503,
                               kind="server", retryable=True, retry_after=None)
    app = Garrison(db_url)
    agent = Agent("support", model=ScriptedModel([down], name="primary-m"),
                  fallback_models=[ScriptedModel(["ok"], name="backup-m")],
                  retry=Retry(max_attempts=1))
    app.add_agent(agent)
    out = io.StringIO()
    configure_logging(json=True, file=out, level="warning", stdlib=False)
    try:
        async with app:
            await agent.run(app, "hi", run_id="conv")
            live = [json.loads(line)["event"] for line in out.getvalue().splitlines()]
            for _ in range(2):
                await app.replay("conv")
    finally:
        structlog.reset_defaults()
    events = [json.loads(line)["event"] for line in out.getvalue().splitlines()]
    assert live == ["agent.model_failed"] and events == live
