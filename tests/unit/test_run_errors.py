"""Whatever run code raises, the run ends (or retries) and the worker lives on: errors
whose args or text are unusual are journaled and rebuilt, a CancelledError nobody asked
for and SystemExit are the code's failures, and an error in the engine's own path ends
the run instead of holding it RUNNING for ever."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import uuid
from typing import Any

import pydantic

from garrison import Context, Garrison, RunStatus, WorkflowFailed
from garrison.engine import EngineHooks
from garrison.errors import AbortedError, StepFailed
from garrison.resilience import Retry
from garrison.store import RunRecord

ORDER = uuid.UUID("12345678-1234-5678-1234-567812345678")
_RETRY = Retry(max_attempts=3, base=0.0, cap=0.0)


async def _ended(app: Garrison, run_id: str) -> tuple[RunStatus, str]:
    """The run's final status and stored error text (it must end, not hang)."""
    handle = app.handle(run_id)
    with contextlib.suppress(WorkflowFailed):
        await handle.result(timeout=10)
    record = await handle.record()
    assert record is not None and record.status.is_terminal, record
    return record.status, record.error or ""


async def test_errors_with_typed_args_are_journaled_retried_and_caught(db_url: str) -> None:
    app = Garrison(db_url)
    calls: dict[str, int] = {"lookup": 0, "flaky": 0}

    @app.step()
    async def lookup() -> str:
        calls["lookup"] += 1
        return {}[ORDER]  # type: ignore[no-any-return]  # KeyError(UUID(...))

    @app.step(retry=_RETRY)
    async def flaky() -> str:
        calls["flaky"] += 1
        if calls["flaky"] < 3:
            raise KeyError(ORDER)
        return "ok"

    @app.step()
    async def decode() -> str:
        return b"caf\xe9".decode("utf-8")  # UnicodeDecodeError: its args hold bytes

    @app.step()
    async def read() -> str:
        with open("/nonexistent/garrison.yaml") as f:  # noqa: ASYNC230
            return f.read()

    @app.workflow(name="typed")
    async def typed(ctx: Context) -> list[Any]:
        seen: list[Any] = []
        try:
            await lookup()
        except KeyError as exc:
            seen.append(exc.args[0])
        seen.append(await flaky())
        try:
            await decode()
        except UnicodeDecodeError as exc:
            seen.append((exc.encoding, exc.reason, str(exc)))
        try:
            await read()
        except FileNotFoundError as exc:
            seen.append((exc.errno, exc.filename))
        return seen

    @app.workflow(name="body")
    async def body(ctx: Context) -> None:
        raise KeyError(ORDER)

    async with app:
        result = await (await app.start(typed, run_id="t")).result(timeout=10)
        await app.start(body, run_id="b")
        status, error = await _ended(app, "b")
    assert result == [ORDER, "ok",
                      ["utf-8", "unexpected end of data",
                       "'utf-8' codec can't decode byte 0xe9 in position 3: "
                       "unexpected end of data"],
                      [2, "/nonexistent/garrison.yaml"]]
    assert calls == {"lookup": 1, "flaky": 3}
    assert status is RunStatus.QUARANTINED and "12345678-1234" in error


class _Upstream(Exception):
    def __init__(self, response: Any) -> None:
        super().__init__("upstream failed")
        self.response = response  # not journaled: not JSON

    def __str__(self) -> str:
        return f"upstream said {self.response.status}"


async def test_an_error_that_cannot_be_rebuilt_comes_back_as_step_failed(db_url: str) -> None:
    app = Garrison(db_url)

    class Order(pydantic.BaseModel):
        id: int

    @app.step()
    async def call() -> None:
        raise _Upstream(type("Response", (), {"status": 503})())

    @app.step()
    async def parse() -> int:
        return Order.model_validate({"id": "not-a-number"}).id

    @app.workflow(name="caught")
    async def caught(ctx: Context) -> list[str]:
        seen = []
        for step in (call, parse):
            try:
                await step()
            except StepFailed as exc:
                seen.append(exc.error_type)
        return seen

    async with app:
        assert await (await app.start(caught, run_id="c")).result(timeout=10) == [
            f"{__name__}:_Upstream", "pydantic_core._pydantic_core:ValidationError"]


async def test_a_stray_cancelled_error_or_sys_exit_is_the_codes_failure(db_url: str) -> None:
    app = Garrison(db_url)
    attempts: list[str] = []

    @app.step(retry=_RETRY)
    async def gather_parts() -> list[int]:
        attempts.append("gather")

        async def part(i: int) -> int:
            await asyncio.sleep(0.05 * i)
            return i

        tasks = [asyncio.create_task(part(i)) for i in range(3)]
        asyncio.get_running_loop().call_later(0.01, tasks[2].cancel)  # a helper's timeout
        return await asyncio.gather(*tasks)

    @app.step()
    async def cli() -> None:
        sys.exit(2)

    @app.workflow(name="stray")
    async def stray(ctx: Context) -> list[str]:
        seen = []
        for step in (gather_parts, cli):
            try:
                await step()
            except AbortedError as exc:
                seen.append(exc.raised)  # type: ignore[attr-defined]
        return seen

    @app.workflow(name="exits")
    async def exits(ctx: Context) -> None:
        sys.exit("bye")

    @app.workflow(name="cancels")
    async def cancels(ctx: Context) -> None:
        raise asyncio.CancelledError

    async with app:
        assert await (await app.start(stray, run_id="s")).result(timeout=10) == [
            "CancelledError", "SystemExit"]
        await app.start(exits, run_id="e")
        await app.start(cancels, run_id="x")
        exited, exit_error = await _ended(app, "e")
        cancelled, cancel_error = await _ended(app, "x")
    assert attempts == ["gather"] * 3  # retried per its policy, as any failure
    assert exited is RunStatus.QUARANTINED and "sys.exit('bye')" in exit_error
    assert cancelled is RunStatus.QUARANTINED and "CancelledError" in cancel_error


class _BrokenHook(EngineHooks):
    def run_started(self, run: RunRecord) -> None:
        if run.run_id == "broken":
            raise RuntimeError("a hook's bug")


async def test_an_error_in_the_engines_path_ends_the_run_not_holds_it(db_url: str) -> None:
    app = Garrison(db_url, hooks=[_BrokenHook()])

    @app.workflow(name="fine")
    async def fine(ctx: Context) -> str:
        return "ok"

    async with app:
        await app.start(fine, run_id="broken")
        status, error = await _ended(app, "broken")
        assert await (await app.start(fine, run_id="next")).result(timeout=10) == "ok"
    assert status is RunStatus.QUARANTINED and "a hook's bug" in error
