"""Supervision trees: strategies, restart types, intensity, nesting, restarts of the process."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from garrison import ConfigurationError, Context, Garrison, RunStatus, WorkflowFailed
from garrison.resilience import Child, Supervisor
from garrison.resilience._supervisor import decide, restarts
from garrison.testing import FakeClock


def build(url: str) -> tuple[Garrison, Any]:
    app = Garrison(url)

    @app.workflow(name="agent")
    async def agent(ctx: Context, label: str) -> str:
        command = await ctx.wait_for("cmd")
        if command == "crash":
            raise RuntimeError(f"{label} crashed")
        return f"{label}:{command}"

    return app, agent


async def status(app: Garrison, run_id: str, timeout: float = 10.0) -> RunStatus:
    """Wait until `run_id` exists; its status."""
    async with asyncio.timeout(timeout):
        while (run := await app.store.get_run(run_id)) is None:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    return run.status


async def ended(app: Garrison, run_id: str) -> RunStatus:
    async with asyncio.timeout(10):
        while not (await status(app, run_id)).is_terminal:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    return await status(app, run_id)


async def test_one_for_one_restarts_only_the_child_that_ended(db_url: str) -> None:
    app, agent = build(db_url)
    tree = Supervisor("desk", [Child(agent, ("a",), name="a"), Child(agent, ("b",), name="b")])
    async with app:
        await app.start(tree, run_id="t")  # type: ignore[arg-type]
        await status(app, "t/b#1")
        await app.send("t/a#1", "cmd", "crash")
        assert await status(app, "t/a#2") in {RunStatus.RUNNING, RunStatus.WAITING}
        assert await ended(app, "t/a#1") is RunStatus.QUARANTINED
        assert not (await status(app, "t/b#1")).is_terminal  # untouched
        assert await app.store.get_run("t/b#2") is None


async def test_restart_types_permanent_transient_temporary(db_url: str) -> None:
    app, agent = build(db_url)
    tree = Supervisor("types", [Child(agent, ("p",), name="p", restart="permanent"),
                                Child(agent, ("t",), name="t", restart="transient"),
                                Child(agent, ("x",), name="x", restart="temporary")])
    async with app:
        handle = await app.start(tree, run_id="t")  # type: ignore[arg-type]
        await status(app, "t/x#1")
        await app.send("t/t#1", "cmd", "done")  # transient, normal end: not restarted
        await app.send("t/x#1", "cmd", "crash")  # temporary: never restarted
        await app.send("t/p#1", "cmd", "done")  # permanent: restarted even after success
        await status(app, "t/p#2")
        await app.send("t/p#2", "cmd", "crash")
        await status(app, "t/p#3")
        await asyncio.sleep(0.2)
        assert await app.store.get_run("t/t#2") is None
        assert await app.store.get_run("t/x#2") is None
        await app.send("t/p#3", "cmd", "stop")
        await status(app, "t/p#4")
        assert not (await handle.status()).is_terminal


async def test_one_for_all_restarts_every_child_stopping_the_others_in_reverse(
    db_url: str,
) -> None:
    app, agent = build(db_url)
    tree = Supervisor("all", [Child(agent, (n,), name=n) for n in "abc"],
                      strategy="one_for_all")
    async with app:
        await app.start(tree, run_id="t")  # type: ignore[arg-type]
        await status(app, "t/c#1")
        await app.send("t/a#1", "cmd", "crash")
        for name in "abc":
            await status(app, f"t/{name}#2")
        runs = {r.run_id: r for r in await app.store.list_runs(limit=100)}
    assert runs["t/b#1"].status is RunStatus.CANCELLED
    assert runs["t/c#1"].status is RunStatus.CANCELLED
    assert runs["t/c#1"].completed_at <= runs["t/b#1"].completed_at  # type: ignore[operator]


async def test_rest_for_one_restarts_the_child_and_those_started_after_it(db_url: str) -> None:
    app, agent = build(db_url)
    tree = Supervisor("rest", [Child(agent, (n,), name=n) for n in "abc"],
                      strategy="rest_for_one")
    async with app:
        await app.start(tree, run_id="t")  # type: ignore[arg-type]
        await status(app, "t/c#1")
        await app.send("t/b#1", "cmd", "crash")
        await status(app, "t/b#2")
        await status(app, "t/c#2")
        assert await app.store.get_run("t/a#2") is None
        assert not (await status(app, "t/a#1")).is_terminal
        assert await ended(app, "t/c#1") is RunStatus.CANCELLED


async def test_intensity_exceeded_stops_the_children_and_escalates(db_url: str) -> None:
    app, agent = build(db_url)
    tree = Supervisor("hot", [Child(agent, ("a",), name="a"), Child(agent, ("b",), name="b")],
                      intensity=2, period=60)
    async with app:
        handle = await app.start(tree, run_id="t")  # type: ignore[arg-type]
        await status(app, "t/b#1")
        for generation in (1, 2, 3):
            await status(app, f"t/a#{generation}")
            await app.send(f"t/a#{generation}", "cmd", "crash")
        with pytest.raises(WorkflowFailed, match=r"SupervisorEscalated.*more than 2 restarts"):
            await handle.result(timeout=10)
        assert await ended(app, "t/b#1") is RunStatus.CANCELLED
        assert await app.store.get_run("t/a#4") is None


async def test_a_nested_supervisor_that_escalates_is_restarted_by_its_parent(
    db_url: str,
) -> None:
    app, agent = build(db_url)
    inner = Supervisor("inner", [Child(agent, ("x",), name="x")], intensity=0)
    outer = Supervisor("outer", [Child(inner, name="inner")])
    async with app:
        await app.start(outer, run_id="o")  # type: ignore[arg-type]
        await status(app, "o/inner#1/x#1")
        await app.send("o/inner#1/x#1", "cmd", "crash")  # inner gives up at once
        assert await ended(app, "o/inner#1") is RunStatus.FAILED
        await status(app, "o/inner#2/x#1")  # the parent restarted the whole subtree


async def test_a_tree_resumes_after_a_restart_with_its_restart_count(db_url: str) -> None:
    app, agent = build(db_url)

    def tree() -> Supervisor:
        return Supervisor("durable", [Child(agent, ("a",), name="a")], intensity=1,
                          period=3600)

    async with app:
        handle = await app.start(tree(), run_id="t")  # type: ignore[arg-type]
        await status(app, "t/a#1")
        await app.send("t/a#1", "cmd", "crash")
        await status(app, "t/a#2")  # one restart spent
    again, agent = build(db_url)
    again.add_supervisor(Supervisor("durable", [Child(agent, ("a",), name="a")], intensity=1,
                                    period=3600))
    async with again:
        await again.send("t/a#2", "cmd", "crash")  # the second within the period
        with pytest.raises(WorkflowFailed, match="SupervisorEscalated"):
            await again.handle(handle.run_id).result(timeout=10)


def test_supervisor_and_child_refuse_bad_settings() -> None:
    with pytest.raises(ConfigurationError, match="strategy"):
        Supervisor("s", [Child(object())], strategy="one_for_some")
    with pytest.raises(ConfigurationError, match="restart="):
        Child(object(), restart="sometimes")
    with pytest.raises(ConfigurationError, match="named alike"):
        Supervisor("s", [Child(object(), name="a"), Child(object(), name="a")])


# -- the decision core against a reference model (hypothesis) ---------------------------



def model(strategy: str, types: list[str], intensity: int, period: float,
          running: set[int], history: list[float], index: int, abnormal: bool,
          now: float) -> tuple[set[int], list[float], str]:
    """OTP's rules in words: a child restarts by its type; more than `intensity`
    restarts within `period` escalate (everything stops); else the strategy says which
    children restart with it."""
    running = running - {index}
    if types[index] == "temporary" or (types[index] == "transient" and not abnormal):
        return running, history, "none"
    history = [t for t in history if t > now - period] + [now]
    if len(history) > intensity:
        return set(), history, "escalate"
    if strategy == "one_for_one":
        stopped: set[int] = set()
    elif strategy == "one_for_all":
        stopped = set(running)
    else:
        stopped = {i for i in running if i > index}
    again = {i for i in stopped if types[i] != "temporary"} | {index}
    return (running - stopped) | again, history, "restart"


@settings(max_examples=300, deadline=None)
@given(strategy=st.sampled_from(["one_for_one", "one_for_all", "rest_for_one"]),
       types=st.lists(st.sampled_from(["permanent", "transient", "temporary"]),
                      min_size=1, max_size=4),
       intensity=st.integers(0, 4), period=st.sampled_from([1.0, 5.0, 60.0]),
       events=st.lists(st.tuples(st.integers(0, 3), st.booleans(),
                                 st.sampled_from([0.0, 0.5, 2.0, 10.0])), max_size=25))
def test_supervisor_decisions_match_a_reference_model(
    strategy: str, types: list[str], intensity: int, period: float,
    events: list[tuple[int, bool, float]],
) -> None:
    spec = Supervisor("m", [Child(object(), name=str(i), restart=t) for i, t in enumerate(types)],
                      strategy=strategy, intensity=intensity, period=period)
    running, history, now = set(range(len(types))), (), 0.0
    expected_running, expected_history = set(running), list(history)
    for pick, abnormal, advance in events:
        if not running:
            break
        index = sorted(running)[pick % len(running)]
        now += advance
        want_running, expected_history, outcome = model(
            strategy, types, intensity, period, expected_running, expected_history, index,
            abnormal, now)
        rest = frozenset(running - {index})
        if not restarts(spec.children[index], abnormal):
            assert outcome == "none"
            running = set(rest)
        else:
            decision = decide(spec, rest, index, history, now)
            assert list(decision.stop) == sorted(decision.stop, reverse=True)
            assert list(decision.start) == sorted(decision.start)
            assert decision.escalate == (outcome == "escalate")
            assert list(decision.restarts) == expected_history
            history = decision.restarts
            running = (set(rest) - set(decision.stop)) | set(decision.start)
            if decision.escalate:
                assert set(decision.stop) == rest
                running = set()
        assert running == want_running
        expected_running = want_running


async def test_a_child_that_ignores_its_stop_is_killed_after_its_shutdown_time(
    db_url: str,
) -> None:
    app, agent = build(db_url)

    @app.workflow(name="stubborn")
    async def stubborn(ctx: Context) -> str:
        try:
            await ctx.wait_for("never")
        except asyncio.CancelledError:
            await ctx.wait_for("still-never")  # ignores the stop
        return "unreachable"

    tree = Supervisor("kill", [Child(agent, ("a",), name="a"),
                               Child(stubborn, name="s", shutdown=0.3)],
                      strategy="one_for_all")
    async with app:
        await app.start(tree, run_id="t")  # type: ignore[arg-type]
        await status(app, "t/s#1")
        await app.send("t/a#1", "cmd", "crash")
        await status(app, "t/s#2")  # restarted after the kill
        await status(app, "t/a#2")
        assert await ended(app, "t/s#1") is RunStatus.CANCELLED
        killed = await app.store.get_run("t/s#1")
        assert killed is not None and killed.fence >= 2  # its holder's writes are refused


async def test_restart_backoff_waits_a_durable_jittered_time(db_url: str,
                                                             clock: FakeClock) -> None:
    app = Garrison(db_url, clock=clock)

    @app.workflow(name="agent")
    async def agent(ctx: Context, label: str) -> str:
        if await ctx.wait_for("cmd") == "crash":
            raise RuntimeError("crashed")
        return label

    tree = Supervisor("slow", [Child(agent, ("a",), name="a")], backoff=(10.0, 60.0),
                      intensity=5, period=3600)
    async with app:
        await app.start(tree, run_id="t")  # type: ignore[arg-type]
        await status(app, "t/a#1")
        await app.send("t/a#1", "cmd", "crash")
        await ended(app, "t/a#1")
        await asyncio.sleep(0.3)
        assert await app.store.get_run("t/a#2") is None  # waiting out its backoff
        clock.advance(10.0)  # the first backoff is at most min * 2**0 = 10 s
        await status(app, "t/a#2")
