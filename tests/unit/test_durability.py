"""A completed step never runs again; a run resumes from its journal after a crash."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from garrison import Context, Garrison, NonDeterminismError, RunStatus, WorkflowFailed, current_step
from garrison.engine import EngineHooks

from ._support import Crash, CrashAt


def build(
    url: str, effects: Counter[str], hooks: tuple[EngineHooks, ...] = ()
) -> tuple[Garrison, Any]:
    app = Garrison(url, hooks=hooks)

    @app.step()
    async def work(i: int) -> int:
        effects[current_step().idempotency_key] += 1
        return i * 10

    @app.workflow(name="seq")
    async def seq(ctx: Context, n: int) -> list[int]:
        return [await work(i) for i in range(n)]

    return app, seq


async def crash_then_resume(url: str, point: str, n: int) -> tuple[Counter[str], list[int]]:
    effects: Counter[str] = Counter()
    crash = CrashAt(point, n)
    app, seq = build(url, effects, (crash,))
    async with app:
        await app.start(seq, 6, run_id="r1")
        await crash.crashed.wait()
        assert await app.handle("r1").status() is RunStatus.RUNNING
    app2, _ = build(url, effects)
    async with app2:
        result = await app2.handle("r1").result(timeout=5)
    return effects, result


@pytest.mark.parametrize("n", [1, 3, 6])
async def test_crash_before_step_body_runs_every_step_once(db_url: str, n: int) -> None:
    effects, result = await crash_then_resume(db_url, "started", n)
    assert result == [0, 10, 20, 30, 40, 50]
    assert set(effects.values()) == {1}
    assert len(effects) == 6


@pytest.mark.parametrize("n", [1, 4, 6])
async def test_step_interrupted_before_commit_runs_again_with_same_key(db_url: str, n: int) -> None:
    effects, result = await crash_then_resume(db_url, "completed", n)
    assert result == [0, 10, 20, 30, 40, 50]
    assert effects[f"r1:{n}"] == 2
    assert [k for k, v in effects.items() if v != 1] == [f"r1:{n}"]


@pytest.mark.parametrize("n", [1, 5])
async def test_committed_step_never_runs_again_after_crash(db_url: str, n: int) -> None:
    effects, result = await crash_then_resume(db_url, "committed", n)
    assert result == [0, 10, 20, 30, 40, 50]
    assert set(effects.values()) == {1}


async def test_failed_step_reraises_same_error_type_on_replay(db_url: str) -> None:
    effects: Counter[str] = Counter()
    caught: list[str] = []

    def make(hooks: tuple[EngineHooks, ...]) -> tuple[Garrison, Any]:
        app = Garrison(db_url, hooks=hooks)

        @app.step()
        async def flaky() -> None:
            effects["flaky"] += 1
            raise KeyError("no such order")

        @app.step()
        async def after() -> str:
            return "after"

        @app.workflow(name="handles")
        async def handles(ctx: Context) -> str:
            try:
                await flaky()
            except KeyError as exc:
                caught.append(type(exc).__name__)
            return await after()

        return app, handles

    crash = CrashAt("started", 2)  # crash when `after` starts: flaky's failure is journaled
    app, handles = make((crash,))
    async with app:
        await app.start(handles, run_id="h")
        await crash.crashed.wait()
    app2, _ = make(())
    async with app2:
        assert await app2.handle("h").result(timeout=5) == "after"
    assert effects["flaky"] == 1
    assert caught == ["KeyError", "KeyError"]


async def test_changed_step_name_fails_run_with_nondeterminism_error(db_url: str) -> None:
    crash = CrashAt("started", 2)
    app = Garrison(db_url, hooks=(crash,))

    @app.step(name="reserve_stock")
    async def reserve() -> int:
        return 1

    @app.step(name="ship")
    async def ship() -> int:
        return 2

    @app.workflow(name="order")
    async def order(ctx: Context) -> int:
        return await reserve() + await ship()

    async with app:
        await app.start(order, run_id="o1")
        await crash.crashed.wait()

    app2 = Garrison(db_url)

    @app2.step(name="charge_card")
    async def charge() -> int:
        return 1

    @app2.workflow(name="order")
    async def order2(ctx: Context) -> int:
        try:
            return await charge()
        except NonDeterminismError:
            return -1  # swallowing it must not save the run

    async with app2:
        with pytest.raises(WorkflowFailed) as info:
            await app2.handle("o1").result(timeout=5)
        assert await app2.handle("o1").status() is RunStatus.QUARANTINED
    error = info.value
    assert error.error_type == "garrison.errors:NonDeterminismError"
    assert "position 1" in error.error_message
    assert "'reserve_stock'" in error.error_message and "'charge_card'" in error.error_message


async def test_changed_arity_is_nondeterminism(db_url: str) -> None:
    crash = CrashAt("started", 2)
    app = Garrison(db_url, hooks=(crash,))

    @app.step(name="s")
    async def s(*xs: int) -> int:
        return sum(xs)

    @app.workflow(name="w")
    async def w(ctx: Context) -> int:
        return await s(1) + await s(2)

    async with app:
        await app.start(w, run_id="a")
        await crash.crashed.wait()

    app2 = Garrison(db_url)

    @app2.step(name="s")
    async def s2(*xs: int) -> int:
        return sum(xs)

    @app2.workflow(name="w")
    async def w2(ctx: Context) -> int:
        return await s2(1, 1)

    async with app2:
        with pytest.raises(WorkflowFailed, match=r"\(1 args\), code called step 's' \(2 args\)"):
            await app2.handle("a").result(timeout=5)


async def test_journaled_values_are_stable_across_replay(db_url: str) -> None:
    seen: list[tuple[Any, ...]] = []

    def make(hooks: tuple[EngineHooks, ...]) -> tuple[Garrison, Any]:
        app = Garrison(db_url, hooks=hooks)

        @app.step()
        async def noop() -> None:
            return None

        @app.workflow(name="vals")
        async def vals(ctx: Context) -> str:
            values = (ctx.now(), ctx.uuid(), ctx.random())
            seen.append(values)
            await noop()
            return str(values[1])

        return app, vals

    crash = CrashAt("completed", 1)
    app, vals = make((crash,))
    async with app:
        await app.start(vals, run_id="v")
        await crash.crashed.wait()
    app2, _ = make(())
    async with app2:
        result = await app2.handle("v").result(timeout=5)
    assert len(seen) == 2 and seen[0] == seen[1]
    assert result == str(seen[0][1])


async def test_process_crash_between_hooks_leaves_run_running_not_failed(db_url: str) -> None:
    effects: Counter[str] = Counter()
    crash = CrashAt("started", 2)
    app, seq = build(db_url, effects, (crash,))
    async with app:
        await app.start(seq, 3, run_id="x")
        await crash.crashed.wait()
        assert await app.handle("x").status() is RunStatus.RUNNING
    assert issubclass(Crash, BaseException) and not issubclass(Crash, Exception)
