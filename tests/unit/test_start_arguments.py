"""Inputs a workflow cannot take are refused when the run is started (or forked, or
started as a child), before anything is stored: such a run could only fail later."""

from __future__ import annotations

from pathlib import Path

import pytest

from garrison import Context, Garrison
from garrison.errors import ConfigurationError


def build(tmp_path: Path) -> Garrison:
    app = Garrison(f"sqlite:///{tmp_path}/g.db")

    @app.workflow(name="order")
    async def order(ctx: Context, order_id: str, *, cents: int = 0) -> str:
        return f"{order_id}:{cents}"

    @app.workflow(name="parent")
    async def parent(ctx: Context) -> str:
        try:
            await ctx.start_child(order, "a", "b", run_id="child")
        except ConfigurationError as exc:
            return f"refused: {exc}"
        return "started"

    return app


@pytest.mark.parametrize(("args", "kwargs", "why"), [
    ((), {}, "missing a required argument: 'order_id'"),
    (("a", "b"), {}, "too many positional arguments"),
    (("a",), {"cent": 1}, "got an unexpected keyword argument 'cent'"),
])
async def test_a_start_with_inputs_the_workflow_cannot_take_is_refused(
        tmp_path: Path, args: tuple[object, ...], kwargs: dict[str, object], why: str) -> None:
    app = build(tmp_path)
    async with app:
        with pytest.raises(ConfigurationError) as refused:
            await app.start("order", *args, run_id="bad", **kwargs)
        assert await app.store.get_run("bad") is None  # nothing stored
        assert await (await app.start("order", "a", cents=5)).result(timeout=10) == "a:5"
    message = str(refused.value)
    assert "workflow 'order' v1 takes ctx, then (order_id, *, cents=0)" in message
    assert why in message


async def test_a_fork_and_a_child_start_check_their_inputs_too(tmp_path: Path) -> None:
    app = build(tmp_path)
    async with app:
        source = await app.start("order", "a", run_id="source")
        await source.result(timeout=10)
        with pytest.raises(ConfigurationError, match="too many positional arguments"):
            await app.fork("source", at_step=0, args=["a", "b"], run_id="bad-fork")
        assert await app.store.get_run("bad-fork") is None
        outcome = await (await app.start("parent", run_id="p")).result(timeout=10)
        assert outcome.startswith("refused: workflow 'order' v1 takes")
        assert await app.store.get_run("child") is None
