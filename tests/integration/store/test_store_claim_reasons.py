"""Why a run was claimed (`RunRecord.claim_reason`) and who held it before
(`previous_owner`), recorded by the claim itself from the row it replaced (schema 6).
Every test runs on each backend; a recovery is a claim of a run that was RUNNING."""

from __future__ import annotations

import dataclasses

import pytest

from garrison.store import ClaimReason, QueueLimits, RunStatus, Store, open_store
from garrison.store._schema import SCHEMA_VERSION
from tests.integration.store.test_store_contract import make_run
from tests.integration.store.test_store_forks import create_old_database

ALL = QueueLimits("default")


async def _claim_due(store: Store, now: float = 0.0) -> list[tuple[str, ClaimReason | None,
                                                                 str | None]]:
    runs = await store.claim_due(now=now, queues=None, workflows=None, limit=10)
    return sorted((r.run_id, r.claim_reason, r.previous_owner) for r in runs)


async def test_a_first_start_is_a_start_with_no_previous_owner(store: Store) -> None:
    await store.register_worker("w1")
    await store.create_run(make_run("r1"))
    assert (await store.get_run("r1")).claim_reason is None  # type: ignore[union-attr]

    [run] = await store.claim_queued(ALL, 1, workflows=None)

    assert (run.claim_reason, run.previous_owner) == (ClaimReason.START, None)
    assert not run.claim_reason.is_recovery
    assert await store.get_run("r1") == run  # stored, not only returned


async def test_a_woken_parked_run_is_a_wake_up(store: Store) -> None:
    await store.register_worker("w1")
    await store.create_run(make_run("r1"))
    await store.claim_queued(ALL, 1, workflows=None)
    await store.park_run("r1", 1_500.0, [])

    # the worker that parked it
    assert await _claim_due(store, now=2_000.0) == [("r1", ClaimReason.WAKE_UP, "w1")]


async def test_a_run_whose_owner_lease_ran_out_is_abandoned(store: Store) -> None:
    await store.register_worker("w2")
    await store.create_run(dataclasses.replace(
        make_run("r1", status=RunStatus.RUNNING, owner="w1"), lease_until=1.0))

    assert await _claim_due(store) == [("r1", ClaimReason.ABANDONED, "w1")]
    run = await store.get_run("r1")
    assert run is not None and run.owner == "w2" and run.claim_reason.is_recovery  # type: ignore[union-attr]
    assert run.recoveries == 1


async def test_only_claims_of_a_running_run_count_as_recoveries(store: Store) -> None:
    await store.register_worker("w1")
    await store.create_run(make_run("r1"))
    await store.claim_queued(ALL, 1, workflows=None)  # start
    await store.park_run("r1", 1_500.0, [])
    await _claim_due(store, now=2_000.0)  # wake-up
    await store.release_runs(None)
    await _claim_due(store)  # handed back: 1
    await store.claim_run("r1", now=0.0, mine=True)  # retry: 2

    run = await store.get_run("r1")
    assert run is not None and (run.fence, run.recoveries) == (4, 2)


async def test_a_run_handed_back_by_a_stopping_worker_is_handed_back(store: Store) -> None:
    await store.register_worker("w1")
    await store.create_run(make_run("r1"))
    await store.claim_queued(ALL, 1, workflows=None)
    await store.release_runs(None)
    released = await store.get_run("r1")
    assert released is not None and released.owner is None  # nobody holds it

    # the worker that handed it back
    assert await _claim_due(store) == [("r1", ClaimReason.HANDED_BACK, "w1")]


async def test_a_redriven_run_starts_again_with_no_previous_owner(store: Store) -> None:
    await store.register_worker("w1")
    await store.create_run(make_run("r1"))
    await store.claim_queued(ALL, 1, workflows=None)
    await store.finish_run("r1", RunStatus.QUARANTINED, result=None, error=None,
                           completed_at=1.0)
    await store.redrive_run("r1", now=2.0)

    [run] = await store.claim_queued(ALL, 1, workflows=None)

    assert (run.claim_reason, run.previous_owner) == (ClaimReason.START, None)


async def test_a_run_taken_again_by_its_own_worker_is_a_retry(store: Store) -> None:
    await store.register_worker("w1")
    await store.create_run(make_run("r1"))
    await store.claim_queued(ALL, 1, workflows=None)

    run = await store.claim_run("r1", now=0.0, mine=True)

    assert run is not None and (run.claim_reason, run.previous_owner) == (
        ClaimReason.RETRY, "w1")
    assert run.fence == 2


async def test_a_run_whose_lease_ran_out_is_abandoned_even_for_its_own_worker_id(
        store: Store) -> None:
    """A new process given the dead one's `worker_id` (a pod's stable name), or a worker
    whose loop stalled past its lease: the lease ran out, so the run was abandoned, not
    retried (a retry is a worker taking again a run it still holds)."""
    await store.create_run(dataclasses.replace(  # by a process that then died
        make_run("r1", status=RunStatus.RUNNING, owner="w1"), lease_until=1.0))
    await store.register_worker("w1")  # the new one, under the same id

    assert await _claim_due(store) == [("r1", ClaimReason.ABANDONED, "w1")]
    run = await store.get_run("r1")
    assert run is not None and run.owner == "w1" and run.recoveries == 1


async def test_a_claim_of_its_own_expired_run_by_run_id_is_abandoned(store: Store) -> None:
    await store.create_run(dataclasses.replace(  # by a process that then died
        make_run("r1", status=RunStatus.RUNNING, owner="w1"), lease_until=1.0))
    await store.register_worker("w1")  # the new one, under the same id

    run = await store.claim_run("r1", now=0.0, mine=True)

    assert run is not None and (run.claim_reason, run.previous_owner) == (
        ClaimReason.ABANDONED, "w1")


async def test_a_claim_to_cancel_a_run_never_started_is_a_start(store: Store) -> None:
    await store.register_worker("w1")
    await store.create_run(dataclasses.replace(make_run("r1"), cancel_requested=True))

    assert await _claim_due(store) == [("r1", ClaimReason.START, None)]


async def test_sqlite_reopened_after_its_worker_died_finds_held_runs_abandoned(
        tmp_path: object) -> None:
    url = f"sqlite:///{tmp_path}/died.db"
    first = open_store(url)
    await first.open()
    await first.register_worker("w1", lease_ttl_s=3_600)
    for run_id in ("held", "released"):
        await first.create_run(make_run(run_id))
    await first.claim_queued(ALL, 2, workflows=None)
    await first.release_runs(["released"])
    await first.close()  # as a killed process leaves it: "held" still leased to w1

    second = open_store(url)
    await second.open()
    try:
        await second.register_worker("w2")
        assert await _claim_due(second) == [("held", ClaimReason.ABANDONED, "w1"),
                                            ("released", ClaimReason.HANDED_BACK, "w1")]
    finally:
        await second.close()


@pytest.mark.parametrize("left", ["leased", "owned_unleased"])
async def test_sqlite_reopened_by_a_worker_of_the_same_id_still_finds_them_abandoned(
        tmp_path: object, left: str) -> None:
    """A restarted worker keeping its id is not the one that died ("retry" is for a
    worker's own failed write); a row an older open left owned without a lease too."""
    url = f"sqlite:///{tmp_path}/died.db"
    first = open_store(url)
    await first.open()
    await first.register_worker("w1", lease_ttl_s=3_600)
    if left == "leased":
        await first.create_run(make_run("held"))
        await first.claim_queued(ALL, 1, workflows=None)
    else:
        await first.create_run(make_run("held", status=RunStatus.RUNNING, owner="w1"))
    await first.close()

    second = open_store(url)
    await second.open()
    try:
        await second.register_worker("w1")
        assert await _claim_due(second) == [("held", ClaimReason.ABANDONED, "w1")]
    finally:
        await second.close()


async def test_a_schema_5_database_migrates_to_claim_reasons_on_open(store_url: str) -> None:
    assert SCHEMA_VERSION >= 6
    await create_old_database(store_url, 5)

    store = open_store(store_url)
    await store.open()
    try:
        old = await store.get_run("old")
        assert old is not None and (old.claim_reason, old.previous_owner) == (None, None)
        await store.register_worker("w1")
        await store.create_run(make_run("new"))
        [run] = await store.claim_queued(ALL, 1, workflows=None)
        assert run.claim_reason is ClaimReason.START
    finally:
        await store.close()
