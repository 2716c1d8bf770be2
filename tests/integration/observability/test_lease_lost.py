"""A run taken over by another worker: the loser's segment says `lease_lost` (outcome and
event), the lease-lost counters count it once, and the winner's segment continues the
same trace (real PostgreSQL, two workers on one store; SQLite takes one worker).

The first worker is cut off from the database for leases and claims (its
`renew_leases` renews nothing and `claim_due` takes nothing, as when its host is
partitioned), so its lease expires while its step is still running; the second worker
claims the run and finishes it, then the first worker's step returns and its journal
write is refused by the fence."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from garrison import Context, Garrison
from tests.integration.observability.conftest import Telemetry
from tests.pg import drop_schemas, fresh_postgres_url


@pytest.fixture
def pg_url() -> Iterator[str]:
    yield fresh_postgres_url()
    drop_schemas()


async def _renew_nothing() -> set[str]:
    return set()


async def _claim_nothing(**_: Any) -> list[Any]:
    return []


async def test_postgres_a_run_taken_over_is_lease_lost_on_the_first_worker_and_one_trace(
        pg_url: str, telemetry: Telemetry) -> None:
    entered, release = asyncio.Event(), asyncio.Event()
    attempts: list[str] = []

    def make_app(worker_id: str) -> Garrison:
        app = Garrison(pg_url, worker_id=worker_id, lease_ttl_s=0.6, claim_interval_s=0.1)

        @app.step(name="slow")
        async def slow() -> str:
            attempts.append(worker_id)
            if worker_id == "w-first":
                entered.set()
                await release.wait()  # still "running" here when the lease is gone
            return worker_id

        @app.workflow(name="contested")
        async def contested(ctx: Context) -> str:
            return await slow()

        return app

    first, second = make_app("w-first"), make_app("w-second")
    first_telemetry = telemetry.attach(first)
    second_telemetry = telemetry.attach(second)
    async with first:
        first.store.renew_leases = _renew_nothing  # type: ignore[method-assign]
        first.store.claim_due = _claim_nothing  # type: ignore[method-assign]
        handle = await first.start("contested", run_id="c-1")
        await asyncio.wait_for(entered.wait(), 10)
        async with second:
            assert await second.handle("c-1").result(timeout=20) == "w-second"
            release.set()  # the first worker's step returns; its write is refused
            await _until(lambda: bool(telemetry.named("invoke_workflow contested")[1:]))
        assert (await handle.result(timeout=5)) == "w-second"

    assert attempts == ["w-first", "w-second"]
    segments = sorted(telemetry.named("invoke_workflow contested"),
                      key=lambda s: s.start_time or 0)
    assert len(segments) == 2
    lost, won = segments
    lost_attrs, won_attrs = dict(lost.attributes or {}), dict(won.attributes or {})
    assert lost_attrs["garrison.worker"] == "w-first"
    assert lost_attrs["garrison.run.outcome"] == "lease_lost"
    assert "garrison.run.lease_lost" in [e.name for e in lost.events]
    assert won_attrs["garrison.worker"] == "w-second"
    assert won_attrs["garrison.run.outcome"] == "completed"
    assert won_attrs["garrison.run.resumed"] is True
    start = telemetry.one("start_workflow contested")
    assert {s.context.trace_id for s in telemetry.spans()} == {start.context.trace_id}

    # One loss in all, counted where it happened: OTel (shared meter provider) and the
    # first app's Prometheus registry; the second app's registry counts none.
    assert sum(p.value for p in telemetry.points("garrison.lease.lost")) == 1  # type: ignore[attr-defined]
    assert _sample(first_telemetry.registry, "garrison_lease_lost_total") == 1
    assert _sample(second_telemetry.registry, "garrison_lease_lost_total") == 0


async def _until(condition: Any, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


def _sample(registry: Any, name: str) -> float:
    value = registry.get_sample_value(name)
    return 0.0 if value is None else float(value)


async def test_a_run_claimed_back_while_its_last_execution_unwinds_waits_for_it(
        tmp_path: Path, telemetry: Telemetry) -> None:
    """The same worker loses a run's lease (its heartbeat finds it gone, as after a
    stalled loop) and claims it back as abandoned while the cancelled execution is still
    cleaning up: the new execution starts only once the old one has ended, so each
    segment is whole (the old one lease_lost, the new one completed)."""
    app = Garrison(f"sqlite:///{tmp_path}/g.db", lease_ttl_s=0.9, claim_interval_s=0.1)
    entered = asyncio.Event()
    attempts: list[str] = []

    @app.step(name="s")
    async def s() -> str:
        attempts.append("started")
        if len(attempts) == 1:
            entered.set()
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                await asyncio.sleep(0.5)  # slow cleanup, past the claim back
                attempts.append("unwound")
                raise
        return f"attempt {len(attempts)}"

    @app.workflow(name="wf")
    async def wf(ctx: Context) -> str:
        return await s()

    instrumentation = telemetry.attach(app)
    async with app:
        handle = await app.start(wf, run_id="r")
        await entered.wait()
        renew = app.store.renew_leases

        async def lose_once() -> set[str]:  # what the store reports after a stall
            app.store.renew_leases = renew  # type: ignore[method-assign]
            await app.store._write(lambda conn: conn.execute(  # type: ignore[attr-defined]
                "UPDATE runs SET lease_until = 0 WHERE run_id = 'r'"))
            return {"r"}

        app.store.renew_leases = lose_once  # type: ignore[method-assign]
        assert await handle.result(timeout=15) == "attempt 3"
    assert attempts == ["started", "unwound", "started"]  # never two at once
    segments = sorted(telemetry.named("invoke_workflow wf"), key=lambda x: x.start_time or 0)
    assert [(dict(x.attributes or {})["garrison.run.fence"],
             dict(x.attributes or {})["garrison.run.outcome"]) for x in segments] == [
        (1, "lease_lost"), (2, "completed")]
    assert not instrumentation.tracing._segments and not instrumentation.tracing._steps
