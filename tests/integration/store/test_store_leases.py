"""Claims, leases and fencing: the store primitives a fleet of workers stands on.

Every test runs on each backend (the `store` fixture). Races between two worker
processes need two workers on one database, which only PostgreSQL admits: those tests
open their own stores on a fresh PostgreSQL schema.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import pytest

from garrison.errors import LeaseLostError, RunDeduplicatedError
from garrison.store import QueueLimits, RunRecord, RunStatus, Store, open_store
from tests.integration.store.test_store_contract import make_run, make_step
from tests.pg import fresh_postgres_url

ALL = QueueLimits("default")


def queued(run_id: str, *, queue: str = "default", created_at: float = 1_000.0,
           priority: int = 0, partition_key: str | None = None,
           dedup_id: str | None = None) -> RunRecord:
    return dataclasses.replace(make_run(run_id, created_at=created_at), queue=queue,
                               priority=priority, partition_key=partition_key,
                               dedup_id=dedup_id)


async def claimed_ids(store: Store, limits: QueueLimits, slots: int = 100) -> list[str]:
    return [r.run_id for r in await store.claim_queued(limits, slots, workflows=None)]


# -- claiming new runs -------------------------------------------------------------


async def test_claim_takes_pending_runs_oldest_first_and_leases_them(store: Store) -> None:
    await store.register_worker("w1", lease_ttl_s=30)
    for i in range(3):
        await store.create_run(queued(f"r{i}", created_at=1_000.0 + i))

    runs = await store.claim_queued(ALL, 2, workflows=None)

    assert [r.run_id for r in runs] == ["r0", "r1"]
    for run in runs:
        assert (run.status, run.owner, run.fence) == (RunStatus.RUNNING, "w1", 1)
        assert run.lease_until is not None and run.started_at is not None
        assert store.holds(run.run_id)
    assert await claimed_ids(store, ALL) == ["r2"]
    assert await claimed_ids(store, ALL) == []


async def test_claim_keeps_to_registered_workflow_versions(store: Store) -> None:
    await store.register_worker("w1")
    await store.create_run(queued("old"))
    await store.create_run(dataclasses.replace(queued("new"), workflow_version="v2"))

    runs = await store.claim_queued(ALL, 10, workflows=[("checkout", "v2")])

    assert [r.run_id for r in runs] == ["new"]


async def test_claim_needs_a_registered_worker(store: Store) -> None:
    with pytest.raises(Exception, match="register_worker"):
        await store.claim_queued(ALL, 1, workflows=None)


async def test_global_concurrency_counts_running_and_waiting_runs(store: Store) -> None:
    await store.register_worker("w1")
    limits = QueueLimits("q", concurrency=2)
    for i in range(5):
        await store.create_run(queued(f"r{i}", queue="q", created_at=1_000.0 + i))

    assert await claimed_ids(store, limits) == ["r0", "r1"]
    await store.park_run("r0", 5_000.0, [])  # parked, still active
    assert await claimed_ids(store, limits) == []
    await store.finish_run("r1", RunStatus.COMPLETED, result="1", error=None,
                           completed_at=1_100.0)
    assert await claimed_ids(store, limits) == ["r2"]


async def test_rate_limit_counts_runs_started_in_the_window(store: Store) -> None:
    await store.register_worker("w1")
    limits = QueueLimits("q", rate_limit=(2, 60.0))
    for i in range(4):
        await store.create_run(queued(f"r{i}", queue="q", created_at=1_000.0 + i))

    assert await claimed_ids(store, limits) == ["r0", "r1"]
    for run_id in ("r0", "r1"):  # ending does not give back a start within the window
        await store.finish_run(run_id, RunStatus.COMPLETED, result="1", error=None,
                               completed_at=1_100.0)
    assert await claimed_ids(store, limits) == []
    assert await claimed_ids(store, QueueLimits("q", rate_limit=(2, 0.001))) == ["r2", "r3"]


async def test_priority_queue_serves_lower_priority_first_then_age(store: Store) -> None:
    await store.register_worker("w1")
    for run_id, priority, at in (("late-urgent", 1, 1_003.0), ("bulk", 9, 1_000.0),
                                 ("urgent", 1, 1_001.0), ("normal", 5, 1_002.0)):
        await store.create_run(queued(run_id, queue="q", priority=priority, created_at=at))

    taken = await claimed_ids(store, QueueLimits("q", priority=True), slots=4)

    assert taken == ["urgent", "late-urgent", "normal", "bulk"]


async def test_fifo_queue_ignores_priorities(store: Store) -> None:
    await store.register_worker("w1")
    await store.create_run(queued("first", queue="q", priority=9, created_at=1_000.0))
    await store.create_run(queued("second", queue="q", priority=1, created_at=1_001.0))

    assert await claimed_ids(store, QueueLimits("q"), slots=1) == ["first"]


async def test_partitioned_queue_serves_keys_in_turn(store: Store) -> None:
    await store.register_worker("w1")
    at = 1_000.0
    for key, count in (("busy", 6), ("quiet", 2), ("rare", 1)):
        for i in range(count):
            at += 1
            await store.create_run(queued(f"{key}-{i}", queue="q", partition_key=key,
                                          created_at=at))

    taken = await claimed_ids(store, QueueLimits("q", partition=True), slots=5)

    assert sorted(taken[:3]) == ["busy-0", "quiet-0", "rare-0"]  # one of each key first
    assert sorted(taken[3:]) == ["busy-1", "quiet-1"]


async def test_partition_concurrency_allows_one_active_run_per_key(store: Store) -> None:
    await store.register_worker("w1")
    limits = QueueLimits("q", partition=True, partition_concurrency=1)
    for i, key in enumerate(["a", "a", "b", "b"]):
        await store.create_run(queued(f"{key}{i}", queue="q", partition_key=key,
                                      created_at=1_000.0 + i))

    assert sorted(await claimed_ids(store, limits)) == ["a0", "b2"]
    assert await claimed_ids(store, limits) == []
    await store.finish_run("a0", RunStatus.COMPLETED, result="1", error=None,
                           completed_at=1_100.0)
    assert await claimed_ids(store, limits) == ["a1"]


# -- dedup ---------------------------------------------------------------------------


async def test_dedup_id_refuses_a_second_unfinished_run_in_the_queue(store: Store) -> None:
    await store.create_run(queued("first", queue="q", dedup_id="order-7"))

    with pytest.raises(RunDeduplicatedError, match="order-7") as caught:
        await store.create_run(queued("second", queue="q", dedup_id="order-7"))

    assert caught.value.existing_run_id == "first"  # type: ignore[attr-defined]
    assert await store.get_run("second") is None
    # Another queue, or the same run id again (idempotent start), is not a duplicate.
    assert (await store.create_run(queued("other", queue="r", dedup_id="order-7")))[1]
    assert (await store.create_run(queued("first", queue="q", dedup_id="order-7")))[1] is False


async def test_dedup_id_is_free_again_once_the_run_ended(store: Store) -> None:
    await store.create_run(queued("first", queue="q", dedup_id="order-7"))
    await store.finish_run("first", RunStatus.COMPLETED, result="1", error=None,
                           completed_at=1_100.0)

    _, created = await store.create_run(queued("second", queue="q", dedup_id="order-7"))

    assert created


# -- due, abandoned, cancelled ---------------------------------------------------------


async def test_claim_due_takes_woken_abandoned_and_cancelled_runs(store: Store) -> None:
    await store.create_run(make_run("parked-due", status=RunStatus.WAITING, wake_at=1_500.0))
    await store.create_run(make_run("parked-later", status=RunStatus.WAITING, wake_at=9_000.0))
    await store.create_run(make_run("abandoned", status=RunStatus.RUNNING))  # no lease
    await store.create_run(make_run("new"))
    await store.create_run(make_run("new-cancelled"))
    await store.request_cancel("new-cancelled", now=1_000.0)
    await store.register_worker("w1")

    runs = await store.claim_due(now=2_000.0, queues=None, workflows=None, limit=100)

    assert sorted(r.run_id for r in runs) == ["abandoned", "new-cancelled", "parked-due"]
    assert all(r.owner == "w1" and r.status is RunStatus.RUNNING for r in runs)
    assert await store.claim_due(now=2_000.0, queues=None, workflows=None, limit=100) == []


async def test_claim_due_keeps_to_the_queues_asked_for(store: Store) -> None:
    await store.create_run(dataclasses.replace(
        make_run("gpu", status=RunStatus.WAITING, wake_at=1.0), queue="gpu"))
    await store.create_run(make_run("cpu", status=RunStatus.WAITING, wake_at=1.0))
    await store.register_worker("w1")

    runs = await store.claim_due(now=2.0, queues=["default"], workflows=None, limit=10)

    assert [r.run_id for r in runs] == ["cpu"]


async def test_a_parked_run_is_nobodys_until_claimed_again(store: Store) -> None:
    await store.register_worker("w1")
    await store.create_run(queued("r1"))
    [run] = await store.claim_queued(ALL, 1, workflows=None)

    await store.park_run("r1", 1_500.0, [], now=1_000.0)

    parked = await store.get_run("r1")
    assert parked is not None and parked.owner is None and not store.holds("r1")
    [again] = await store.claim_due(now=1_600.0, queues=None, workflows=None, limit=10)
    assert again.fence == run.fence + 1


# -- fencing ---------------------------------------------------------------------------


async def test_a_worker_cannot_write_for_a_run_it_does_not_hold(store: Store) -> None:
    await store.register_worker("w1")
    await store.create_run(make_run("r1"))  # nobody's

    with pytest.raises(LeaseLostError, match="no longer holds run r1"):
        await store.append_steps([make_step()])
    with pytest.raises(LeaseLostError):
        await store.finish_run("r1", RunStatus.COMPLETED, result="1", error=None,
                               completed_at=1.0)

    assert await store.load_journal("r1") == []
    run = await store.get_run("r1")
    assert run is not None and run.status is RunStatus.PENDING


async def test_a_lease_lost_write_fails_alone_in_its_batch(store: Store) -> None:
    await store.register_worker("w1")
    await store.create_run(queued("mine"))
    await store.claim_queued(ALL, 1, workflows=None)
    await store.create_run(queued("theirs", created_at=2_000.0))

    outcomes = await asyncio.gather(
        store.append_steps([make_step("mine")]),
        store.append_steps([make_step("theirs")]),
        return_exceptions=True,
    )

    assert outcomes[0] is None and isinstance(outcomes[1], LeaseLostError)
    assert len(await store.load_journal("mine")) == 1
    assert await store.load_journal("theirs") == []


async def test_release_hands_a_run_back_for_an_immediate_claim(store: Store) -> None:
    await store.register_worker("w1")
    await store.create_run(queued("r1"))
    await store.claim_queued(ALL, 1, workflows=None)

    await store.release_runs(["r1"])

    assert store.held() == []
    run = await store.get_run("r1")
    assert run is not None and (run.status, run.owner) == (RunStatus.RUNNING, None)
    [again] = await store.claim_due(now=0.0, queues=None, workflows=None, limit=10)
    assert again.run_id == "r1" and again.fence == 2


# -- two workers on one database (PostgreSQL) ------------------------------------------


@pytest.fixture
async def two_workers() -> AsyncIterator[tuple[Store, Store]]:
    url = fresh_postgres_url()
    first, second = open_store(url), open_store(url)
    await first.open()
    await second.open()
    await first.register_worker("w1", lease_ttl_s=0.3)
    await second.register_worker("w2", lease_ttl_s=0.3)
    try:
        yield first, second
    finally:
        await first.close()
        await second.close()


async def test_postgres_workers_claiming_at_once_never_share_a_run(
    two_workers: tuple[Store, Store],
) -> None:
    first, second = two_workers
    for i in range(200):
        await first.create_run(queued(f"r{i:03}", created_at=1_000.0 + i))

    async def drain(store: Store) -> list[str]:
        taken: list[str] = []
        while batch := await claimed_ids(store, ALL, slots=7):
            taken += batch
        return taken

    a, b = await asyncio.gather(drain(first), drain(second))

    assert not set(a) & set(b)
    assert sorted(a + b) == [f"r{i:03}" for i in range(200)]


async def test_postgres_global_concurrency_holds_across_workers(
    two_workers: tuple[Store, Store],
) -> None:
    first, second = two_workers
    limits = QueueLimits("q", concurrency=5)
    for i in range(40):
        await first.create_run(queued(f"r{i}", queue="q", created_at=1_000.0 + i))

    batches = await asyncio.gather(*(claimed_ids(s, limits, slots=4)
                                     for s in (first, second) * 4))

    assert sum(len(b) for b in batches) == 5


async def test_postgres_expired_lease_is_taken_over_and_the_old_owner_fenced(
    two_workers: tuple[Store, Store],
) -> None:
    first, second = two_workers
    await first.create_run(queued("r1"))
    [mine] = await first.claim_queued(ALL, 1, workflows=None)
    await first.append_steps([make_step("r1", "1")])

    assert await second.claim_due(now=0.0, queues=None, workflows=None, limit=10) == []
    await asyncio.sleep(0.4)  # first's lease runs out (no heartbeat)
    [theirs] = await second.claim_due(now=0.0, queues=None, workflows=None, limit=10)

    assert (theirs.owner, theirs.fence) == ("w2", mine.fence + 1)
    with pytest.raises(LeaseLostError, match="now w2's"):
        await first.append_steps([make_step("r1", "2")])
    with pytest.raises(LeaseLostError):
        await first.finish_run("r1", RunStatus.COMPLETED, result="1", error=None,
                               completed_at=1.0)
    assert [s.position for s in await second.load_journal("r1")] == ["1"]
    await second.finish_run("r1", RunStatus.COMPLETED, result="2", error=None,
                            completed_at=2.0)
    done = await second.get_run("r1")
    assert done is not None and done.result == "2"


async def test_postgres_renewal_keeps_a_lease_and_reports_a_lost_one(
    two_workers: tuple[Store, Store],
) -> None:
    first, second = two_workers
    await first.create_run(queued("kept"))
    await first.create_run(queued("lost", created_at=2_000.0))
    await first.claim_queued(ALL, 2, workflows=None)
    await asyncio.sleep(0.4)
    await first.release_runs([])  # no-op
    # "kept" is renewed just in time... after "lost" was taken by the second worker.
    [taken] = await second.claim_due(now=0.0, queues=None, workflows=None, limit=1)

    lost = await first.renew_leases()

    assert lost == {taken.run_id}
    assert first.held() == ["kept" if taken.run_id == "lost" else "lost"]
    assert await second.claim_due(now=0.0, queues=None, workflows=None, limit=10) == []


async def test_a_refused_write_fails_alone_among_other_kinds_of_writes(store: Store) -> None:
    await store.register_worker("w1")
    await store.create_run(queued("mine"))
    await store.claim_queued(ALL, 1, workflows=None)
    await store.create_run(queued("dup-first", queue="q", dedup_id="d"))

    outcomes = await asyncio.gather(
        store.append_steps([make_step("mine", "1")]),
        store.create_run(queued("fresh", created_at=3_000.0)),
        store.create_run(queued("dup-second", queue="q", dedup_id="d")),  # refused
        store.send_event("nobody", "ping", "1", 1.0),  # refused
        store.park_run("fresh", 9_000.0, []),  # refused: not held
        store.send_event("mine", "ping", "1", 1.0),
        return_exceptions=True,
    )

    assert outcomes[0] is None and outcomes[1] == (queued("fresh", created_at=3_000.0), True)
    assert isinstance(outcomes[2], RunDeduplicatedError)
    assert isinstance(outcomes[3], Exception) and "no such run" in str(outcomes[3])
    assert isinstance(outcomes[4], LeaseLostError)
    assert isinstance(outcomes[5], int)
    assert [s.position for s in await store.load_journal("mine")] == ["1"]
    fresh = await store.get_run("fresh")
    assert fresh is not None and fresh.status is RunStatus.PENDING
    assert await store.get_run("dup-second") is None
    assert len(await store.list_events("mine")) == 1


async def test_a_claim_batched_with_a_refused_write_still_claims(store: Store) -> None:
    """A batch with a refused write is done again write by write: a claim in it must
    be built anew for the second try (a used-up plan returned nothing and crashed the
    worker's loop)."""
    await store.register_worker("w1")
    await store.create_run(queued("r1"))
    await store.create_run(make_run("handed-back", status=RunStatus.RUNNING))

    claimed, refused, one = await asyncio.gather(
        store.claim_queued(ALL, 5, workflows=None),
        store.send_event("nobody", "ping", "1", 1.0),
        store.claim_run("handed-back", now=0.0),
        return_exceptions=True,
    )

    assert isinstance(refused, Exception)
    assert [r.run_id for r in claimed] == ["r1"]  # type: ignore[union-attr]
    assert one is not None and one.run_id == "handed-back"  # type: ignore[union-attr]
    assert sorted(store.held()) == ["handed-back", "r1"]


# -- shared token buckets (fleet-wide rate limits) ---------------------------------------


async def test_a_shared_bucket_gives_its_burst_then_says_when_to_come_back(
    store: Store,
) -> None:
    taken = [await store.take_token("api", rate_per_s=0.5, burst=2) for _ in range(3)]

    assert taken[:2] == [0.0, 0.0]
    assert 1.5 < taken[2] <= 2.0  # one token refills in 2 s at 0.5 per second


async def test_postgres_two_workers_never_spend_the_same_token(
    two_workers: tuple[Store, Store],
) -> None:
    first, second = two_workers
    attempts = [s.take_token("fleet-api", rate_per_s=0.001, burst=10)
                for s in (first, second) for _ in range(15)]

    waits = await asyncio.gather(*attempts)

    assert sum(1 for w in waits if w == 0.0) == 10
