"""HookSet: the engine calls a hook only for the events it overrides, in order."""

from __future__ import annotations

from pathlib import Path

from garrison import Context, Garrison
from garrison.engine import EngineHooks, StepInfo
from garrison.engine._hooks import HookSet
from garrison.store import RunRecord


class _Starts(EngineHooks):
    def __init__(self, seen: list[str], tag: str) -> None:
        self.seen = seen
        self.tag = tag

    def step_started(self, step: StepInfo) -> None:
        self.seen.append(f"{self.tag}:{step.step_name}")


def test_only_overridden_events_have_listeners() -> None:
    seen: list[str] = []
    first, second, quiet = _Starts(seen, "a"), _Starts(seen, "b"), EngineHooks()
    hooks = HookSet([first, quiet, second])
    assert hooks.step_started == (first.step_started, second.step_started)
    assert hooks.step_completed == () and hooks.run_started == ()
    assert len(hooks) == 3 and list(hooks) == [first, quiet, second] and hooks
    assert not HookSet()


def test_a_method_set_on_the_instance_listens_too() -> None:
    hook = EngineHooks()
    runs: list[str] = []

    def started(run: RunRecord) -> None:
        runs.append(run.run_id)

    hook.run_started = started  # type: ignore[method-assign]
    assert HookSet([hook]).run_started == (started,)


def test_added_keeps_the_order_and_the_engine_calls_the_listeners(tmp_path: Path) -> None:
    import asyncio

    seen: list[str] = []
    app = Garrison(f"sqlite:///{tmp_path}/h.db", hooks=[_Starts(seen, "a")])

    @app.step(name="s")
    async def s() -> int:
        return 1

    @app.workflow(name="w")
    async def w(ctx: Context) -> int:
        return await s()

    async def main() -> None:
        async with app:
            app.add_hook(_Starts(seen, "b"))
            assert app.worker is not None and len(app.worker.hooks.step_started) == 2
            assert await (await app.start(w)).result() == 1

    asyncio.run(main())
    assert seen == ["a:s", "b:s"]
