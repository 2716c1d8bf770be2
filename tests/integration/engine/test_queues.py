"""Queues and the fleet, end to end through the public API, on SQLite and PostgreSQL.

The same application code runs on both stores: only the URL differs (`db_url`).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import pytest

from garrison import (
    ConfigurationError,
    Context,
    Garrison,
    RunDeduplicatedError,
    RunStatus,
    current_step,
)
from tests.pg import fresh_postgres_url


class Gauge:
    """Counts step bodies executing at once; remembers the peak and the order."""

    def __init__(self) -> None:
        self.active = 0
        self.peak = 0
        self.order: list[Any] = []
        self.started: list[float] = []

    async def hold(self, what: Any, seconds: float) -> None:
        self.active += 1
        self.peak = max(self.peak, self.active)
        self.order.append(what)
        self.started.append(time.monotonic())
        try:
            await asyncio.sleep(seconds)
        finally:
            self.active -= 1


def build(url: str, gauge: Gauge, *, hold_s: float = 0.02, **options: Any) -> Garrison:
    app = Garrison(url, **options)

    @app.step(name="work")
    async def work(what: Any) -> Any:
        await gauge.hold(what, hold_s)
        return what

    @app.workflow(name="job")
    async def job(ctx: Context, what: Any) -> Any:
        return await work(what)

    return app


async def results(app: Garrison, run_ids: list[str], timeout: float = 60) -> list[Any]:
    return [await app.handle(r).result(timeout=timeout) for r in run_ids]


async def enqueue(url: str, queue_options: dict[str, Any], items: list[tuple[Any, dict[str, Any]]],
                  ) -> list[str]:
    """Start runs from a client process-alike (no worker): they wait in the queue."""
    client = build(url, Gauge(), worker=False)
    client.queue("q", **queue_options)
    async with client:
        return [(await client.start("job", what, queue="q", **kw)).run_id  # type: ignore[arg-type]
                for what, kw in items]


# -- declaration and bad input ---------------------------------------------------------


@pytest.mark.parametrize(("options", "message"), [
    ({"concurrency": 0}, "concurrency=0"),
    ({"worker_concurrency": -1}, "worker_concurrency=-1"),
    ({"rate_limit": (0, 1.0)}, "rate_limit="),
    ({"rate_limit": 10}, "rate_limit="),
    ({"partition_concurrency": 1}, "needs partition=True"),
])
def test_queue_declaration_errors_name_the_field(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        Garrison("sqlite:///:memory:").queue("q", **options)


async def test_start_options_are_checked_against_the_queue(tmp_path: Any) -> None:
    app = build(f"sqlite:///{tmp_path}/g.db", Gauge(), worker=False)
    app.queue("plain")
    app.queue("parts", partition=True)
    async with app:
        with pytest.raises(ConfigurationError, match="no such queue; declare it first"):
            await app.start("job", 1, queue="nope")  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="has no priorities"):
            await app.start("job", 1, queue="plain", priority=3)  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="is partitioned; pass partition_key"):
            await app.start("job", 1, queue="parts")  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="is not partitioned"):
            await app.start("job", 1, queue="plain", partition_key="k")  # type: ignore[arg-type]


async def test_a_worker_for_an_undeclared_queue_refuses_to_start(tmp_path: Any) -> None:
    app = build(f"sqlite:///{tmp_path}/g.db", Gauge(), queues=["gpu"])
    with pytest.raises(ConfigurationError, match="gpu not declared"):
        await app.open()
    assert app.worker is None


# -- limits under load -------------------------------------------------------------------


async def test_global_concurrency_caps_active_runs_under_load(db_url: str) -> None:
    gauge = Gauge()
    app = build(db_url, gauge)
    app.queue("q", concurrency=3)
    async with app:
        ids = [(await app.start("job", i, queue="q")).run_id  # type: ignore[arg-type]
               for i in range(30)]
        assert await results(app, ids) == list(range(30))
    assert gauge.peak == 3


async def test_worker_concurrency_caps_one_workers_share(db_url: str) -> None:
    gauge = Gauge()
    app = build(db_url, gauge)
    app.queue("q", worker_concurrency=2)
    async with app:
        ids = [(await app.start("job", i, queue="q")).run_id  # type: ignore[arg-type]
               for i in range(12)]
        assert await results(app, ids) == list(range(12))
    assert gauge.peak == 2


async def test_worker_total_concurrency_caps_every_queue(db_url: str) -> None:
    gauge = Gauge()
    app = build(db_url, gauge, concurrency=4)
    async with app:
        ids = [(await app.start("job", i)).run_id for i in range(20)]  # type: ignore[arg-type]
        assert await results(app, ids) == list(range(20))
    assert gauge.peak == 4


async def test_rate_limit_holds_within_tolerance(db_url: str) -> None:
    gauge = Gauge()
    ids = await enqueue(db_url, {"rate_limit": (4, 0.5)}, [(i, {}) for i in range(12)])
    app = build(db_url, gauge, hold_s=0.0)
    app.queue("q", rate_limit=(4, 0.5))
    began = time.monotonic()
    async with app:
        await results(app, ids)
        starts = sorted([run.started_at for run in await app.list_runs(limit=100)
                         if run.started_at is not None])
    elapsed = time.monotonic() - began
    assert len(starts) == 12
    # Any 5 consecutive starts span more than the window: never 5 within 0.5 s.
    assert all(starts[i + 4] - starts[i] > 0.5 - 1e-3 for i in range(len(starts) - 4))
    assert elapsed >= 1.0  # 12 starts at 4 per 0.5 s take at least two more windows


async def test_priority_queue_runs_the_most_urgent_first(db_url: str) -> None:
    gauge = Gauge()
    items = [("bulk-1", {"priority": 9}), ("bulk-2", {"priority": 9}),
             ("urgent", {"priority": 0}), ("normal", {"priority": 5})]
    ids = await enqueue(db_url, {"priority": True, "concurrency": 1}, items)
    app = build(db_url, gauge)
    app.queue("q", priority=True, concurrency=1)
    async with app:
        await results(app, ids)
    assert gauge.order == ["urgent", "normal", "bulk-1", "bulk-2"]


async def test_partitioned_queue_is_fair_across_keys(db_url: str) -> None:
    gauge = Gauge()
    items = [(f"a{i}", {"partition_key": "a"}) for i in range(4)]
    items += [(f"b{i}", {"partition_key": "b"}) for i in range(2)]
    ids = await enqueue(db_url, {"partition": True, "concurrency": 1}, items)
    app = build(db_url, gauge)
    app.queue("q", partition=True, concurrency=1)
    async with app:
        await results(app, ids)
    assert gauge.order == ["a0", "b0", "a1", "b1", "a2", "a3"]


async def test_partition_concurrency_runs_one_per_conversation(db_url: str) -> None:
    gauge = Gauge()
    per_key: Counter[str] = Counter()
    peak_per_key: Counter[str] = Counter()
    app = Garrison(db_url)
    app.queue("q", partition=True, partition_concurrency=1)

    @app.step(name="turn")
    async def turn(key: str) -> str:
        per_key[key] += 1
        peak_per_key[key] = max(peak_per_key[key], per_key[key])
        await gauge.hold(key, 0.02)
        per_key[key] -= 1
        return key

    @app.workflow(name="conversation")
    async def conversation(ctx: Context, key: str) -> str:
        return await turn(key)

    async with app:
        ids = [(await app.start(conversation, k, queue="q", partition_key=k)).run_id
               for k in ["c1", "c2", "c3"] * 4]
        await results(app, ids)
    assert set(peak_per_key.values()) == {1}
    assert gauge.peak == 3  # the three conversations did run side by side


async def test_dedup_id_rejects_a_second_enqueue_while_the_first_is_unfinished(
    db_url: str,
) -> None:
    gauge = Gauge()
    app = build(db_url, gauge, hold_s=0.3)
    app.queue("q")
    async with app:
        first = await app.start("job", 1, queue="q", dedup_id="order-7")  # type: ignore[arg-type]
        with pytest.raises(RunDeduplicatedError, match="order-7") as caught:
            await app.start("job", 2, queue="q", dedup_id="order-7")  # type: ignore[arg-type]
        assert caught.value.existing_run_id == first.run_id  # type: ignore[attr-defined]
        assert await app.handle(caught.value.existing_run_id).result(timeout=10) == 1  # type: ignore[attr-defined]
        again = await app.start("job", 3, queue="q", dedup_id="order-7")  # type: ignore[arg-type]
        assert await again.result(timeout=10) == 3


# -- handing back, fleets ------------------------------------------------------------------


async def test_close_hands_in_flight_runs_back_for_an_immediate_resume(db_url: str) -> None:
    gauge = Gauge()
    first = build(db_url, gauge, hold_s=60, lease_ttl_s=60)
    async with first:
        handle = await first.start("job", "x")  # type: ignore[arg-type]
        while not gauge.order:  # noqa: ASYNC110  # the step body has begun
            await asyncio.sleep(0.01)
    second_gauge = Gauge()
    second = build(db_url, second_gauge, hold_s=0.0, lease_ttl_s=60)
    began = time.monotonic()
    async with second:
        assert await second.handle(handle.run_id).result(timeout=10) == "x"
    assert time.monotonic() - began < 30  # handed back: not after the 60 s lease
    assert second_gauge.order == ["x"]  # the interrupted step ran again, here


async def test_shutdown_grace_lets_in_flight_runs_finish_here(db_url: str) -> None:
    gauge = Gauge()
    app = build(db_url, gauge, hold_s=0.3, shutdown_grace_s=5)
    async with app:
        handle = await app.start("job", "x")  # type: ignore[arg-type]
        while not gauge.order:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    reader = Garrison(db_url, worker=False)
    async with reader:
        run = await reader.handle(handle.run_id).record()
    assert run.status is RunStatus.COMPLETED


async def test_postgres_fleet_of_in_process_workers_shares_the_work() -> None:
    db_url = fresh_postgres_url()  # one worker process per SQLite file: PostgreSQL only
    effects: Counter[str] = Counter()
    ran_on: dict[str, set[str]] = {}

    def fleet_app(name: str) -> Garrison:
        app = Garrison(db_url, worker_id=name, lease_ttl_s=5)
        app.queue("q", concurrency=6)

        @app.step(name="work")
        async def work(i: int) -> int:
            effects[current_step().idempotency_key] += 1
            ran_on.setdefault(name, set()).add(str(i))
            await asyncio.sleep(0.01)
            return i

        @app.workflow(name="job")
        async def job(ctx: Context, i: int) -> int:
            await ctx.sleep(0.05)  # parked: whichever worker is alive wakes it
            return await work(i) + await work(i * 10)

        return app

    ids = await enqueue(db_url, {"concurrency": 6}, [(i, {}) for i in range(60)])
    workers = [fleet_app(f"w{n}") for n in range(3)]
    async with workers[0], workers[1], workers[2]:
        got = await results(workers[0], ids)
    assert got == [i + i * 10 for i in range(60)]
    assert set(effects.values()) == {1}  # every step once
    assert len(ran_on) >= 2  # the work was spread
