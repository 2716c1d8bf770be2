"""Claiming runs for a worker: which runs, in what order, within which queue limits.

The logic is written once, without I/O: each plan is a generator that yields
`(sql, params)` queries (`?` placeholders) and receives their rows, and each store drives
it on its own connection inside one write transaction. What differs between backends is
only what `Dialect` holds: PostgreSQL locks the rows it takes with `FOR UPDATE SKIP
LOCKED` (so workers claiming at once never wait on, nor take, the same run) and
serialises claims on a limited queue with a transaction-scoped advisory lock (so a
fleet-wide count stays exact); SQLite has one writer already.

A claim moves a run to RUNNING, makes the worker its owner until `lease_until`, and
adds one to its `fence`: any write of an earlier owner then fails its fence check. It
also records why the run was claimed (`claim_reason`) and who held it before
(`previous_owner`), from the row it replaces.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any

from garrison.store._records import QueueLimits, RunRecord
from garrison.store._rows import RUN_COLUMNS, TERMINAL_SQL, run_from_row, workflow_filter

__all__ = ["Dialect", "Plan", "claim_due", "claim_queued", "claim_one", "in_list"]

Query = tuple[str, Sequence[Any]]
Plan = Generator[Query, list[Any], list[RunRecord]]

# A due claim takes at most this many runs per round trip.
_DUE_BATCH = 200
# A partitioned queue looks at this many of its oldest pending runs per key ranking.
_CANDIDATES = 1000
# Fairness remembers which partition keys were served within this many seconds.
_RECENT_S = 3600.0


@dataclass(frozen=True, slots=True)
class Dialect:
    """What a backend adds to the shared statements."""

    skip_locked: str  # appended to a row-selecting subquery
    queue_lock: str | None  # a statement taking the queue's transaction lock (param: key)
    row_lock: str = ""  # appended to a subquery that must wait for its row


def in_list(values: Sequence[Any]) -> str:
    return ", ".join("?" * len(values))


def _queue_filter(queues: Sequence[str] | None) -> tuple[str, list[Any]]:
    if queues is None:
        return "", []
    return f"AND queue IN ({in_list(queues)}) ", list(queues)


# The claim reason and previous owner are read off the row being replaced: a SET
# expression sees the row as it was (`ClaimReason`; the `?`s in it are the claimer and
# the time). A lease of 0 is the SQLite store's mark of a run whose process is gone (set
# at open): abandoned, even if this worker has the same id as the one that died. A retry
# is a worker taking again a run it still holds (its lease live: a resume after a failed
# write); a run whose lease ran out is abandoned whoever claims it, a new process given
# the dead one's `worker_id` included. A run handed back or parked has no owner: the
# worker that let it go is in `previous_owner` already (`RELEASE_RUNS`, `PARK_RUN`). A
# start has none.
_TAKE = (
    "UPDATE runs SET status = 'RUNNING', owner = ?, fence = fence + 1, lease_until = ?, "
    "wake_at = NULL, updated_at = ?, previous_owner = CASE WHEN status IN "
    "('RUNNING', 'WAITING') THEN COALESCE(owner, previous_owner) END, "
    "recoveries = recoveries + "
    "CASE WHEN status = 'RUNNING' THEN 1 ELSE 0 END, claim_reason = CASE "
    "WHEN status = 'WAITING' THEN 'wake_up' WHEN status <> 'RUNNING' THEN 'start' "
    "WHEN lease_until = 0 THEN 'abandoned' WHEN owner = ? AND lease_until >= ? THEN 'retry' "
    "WHEN lease_until IS NULL THEN 'handed_back' ELSE 'abandoned' END{started} "
    "WHERE run_id IN ({subquery}) "
    f"RETURNING {RUN_COLUMNS}"
)

# Due: a parked run whose wake-up came; a RUNNING run nobody holds (its lease ran out or
# was handed back); a run never started whose cancellation was asked for.
_DUE = (
    "(status = 'WAITING' AND wake_at <= ?) "
    "OR (status = 'RUNNING' AND (lease_until IS NULL OR lease_until < ?)) "
    "OR (status = 'PENDING' AND cancel_requested = 1)"
)


def claim_due(dialect: Dialect, worker_id: str, *, now: float, wall: float,
              lease_until: float, queues: Sequence[str] | None,
              workflows: Sequence[tuple[str, str]] | None, limit: int) -> Plan:
    """Take due, abandoned and cancelled-before-start runs (no queue limits apply: they
    were counted when first claimed, or never will run)."""
    only, wf_params = workflow_filter(workflows)
    if only is None or limit <= 0:
        return []
    queue_sql, queue_params = _queue_filter(queues)
    subquery = (
        f"SELECT run_id FROM runs WHERE ({_DUE}) {queue_sql}{only}"
        f"ORDER BY coalesce(wake_at, created_at) LIMIT ?{dialect.skip_locked}"
    )
    rows = yield (
        _TAKE.format(started="", subquery=subquery),
        [worker_id, lease_until, wall, worker_id, wall, now, wall, *queue_params, *wf_params,
         min(limit, _DUE_BATCH)],
    )
    return [run_from_row(r) for r in rows]


def claim_one(dialect: Dialect, worker_id: str, run_id: str, *, now: float, wall: float,
              lease_until: float, mine: bool) -> Plan:
    """Take one unfinished run if nobody holds it, or (`mine`) if this worker does: a
    resume after a failed write. Waits for the run's row rather than skipping it (a
    concurrent write to it is not a reason to give up). Never sets `started_at`: a run
    claimed this way to be cancelled never started."""
    subquery = (
        f"SELECT run_id FROM runs WHERE run_id = ? AND status NOT IN {TERMINAL_SQL} "
        "AND (owner IS NULL OR lease_until IS NULL OR lease_until < ?"
        + (" OR owner = ?" if mine else "") + f"){dialect.row_lock}"
    )
    rows = yield (
        _TAKE.format(started="", subquery=subquery),
        [worker_id, lease_until, wall, worker_id, wall, run_id, wall,
         *([worker_id] if mine else [])],
    )
    return [run_from_row(r) for r in rows]


def claim_queued(dialect: Dialect, worker_id: str, limits: QueueLimits, slots: int, *,
                 wall: float, lease_until: float, lock_key: str,
                 workflows: Sequence[tuple[str, str]] | None) -> Plan:
    """Start up to `slots` pending runs of one queue, within its limits.

    Order: priority (lower first) when the queue has priorities, then age. A partitioned
    queue takes keys in turn (the oldest run of each key, then the second of each...),
    and at most `partition_concurrency` active runs per key.
    """
    only, wf_params = workflow_filter(workflows)
    if only is None or slots <= 0:
        return []
    name = limits.name
    if limits.serialized and dialect.queue_lock is not None:
        yield dialect.queue_lock, [lock_key]
    free = slots
    if limits.concurrency is not None:
        rows = yield ("SELECT count(*) FROM runs WHERE queue = ? "
                      "AND status IN ('RUNNING', 'WAITING')", [name])
        free = min(free, limits.concurrency - int(rows[0][0]))
    if limits.rate_limit is not None:
        count, seconds = limits.rate_limit
        rows = yield ("SELECT count(*) FROM runs WHERE queue = ? AND started_at > ?",
                      [name, wall - seconds])
        free = min(free, count - int(rows[0][0]))
    if free <= 0:
        return []
    order = "priority, created_at, run_id" if limits.priority else "created_at, run_id"
    if limits.partition:
        chosen = yield from _pick_partitioned(limits, free, order, only, wf_params, wall)
    else:
        rows = yield (f"SELECT run_id FROM runs WHERE queue = ? AND status = 'PENDING' "
                      f"{only}ORDER BY {order} LIMIT ?", [name, *wf_params, free])
        chosen = [r[0] for r in rows]
    if not chosen:
        return []
    subquery = (f"SELECT run_id FROM runs WHERE run_id IN ({in_list(chosen)}) "
                f"AND status = 'PENDING'{dialect.skip_locked}")
    rows = yield (
        _TAKE.format(started=", started_at = ?", subquery=subquery),
        [worker_id, lease_until, wall, worker_id, wall, wall, *chosen],
    )
    turn = {run_id: i for i, run_id in enumerate(chosen)}  # RETURNING has no order
    return sorted((run_from_row(r) for r in rows), key=lambda run: turn[run.run_id])


def _pick_partitioned(limits: QueueLimits, free: int, order: str, only: str,
                      wf_params: list[Any], wall: float
                      ) -> Generator[Query, list[Any], list[str]]:
    """Keys in turn: every key's first run before any key's second; among keys at the
    same turn, the key served longest ago first (so a key that just ran waits)."""
    name = limits.name
    full, full_params = "", []
    if limits.partition_concurrency is not None:  # keys at their limit are not candidates
        full = ("AND partition_key NOT IN (SELECT partition_key FROM runs WHERE queue = ? "
                "AND status IN ('RUNNING', 'WAITING') AND partition_key IS NOT NULL "
                "GROUP BY partition_key HAVING count(*) >= ?) ")
        full_params = [name, limits.partition_concurrency]
    rows = yield (
        "SELECT run_id, partition_key, turn, priority, created_at FROM (SELECT run_id, "
        "partition_key, priority, created_at, row_number() OVER (PARTITION BY partition_key "
        f"ORDER BY {order}) AS turn FROM runs WHERE queue = ? AND status = 'PENDING' "
        f"{only}{full}) AS pending ORDER BY turn, {order} LIMIT ?",
        [name, *wf_params, *full_params, _CANDIDATES],
    )
    served = yield ("SELECT partition_key, max(started_at) FROM runs WHERE queue = ? "
                    "AND started_at > ? GROUP BY partition_key", [name, wall - _RECENT_S])
    last = {key: float(at) for key, at in served}
    rows = sorted(rows, key=lambda r: (r[2], r[3] if limits.priority else 0,
                                       last.get(r[1], float("-inf")), r[4]))
    active: dict[str | None, int] = {}
    if limits.partition_concurrency is not None:
        counted = yield ("SELECT partition_key, count(*) FROM runs WHERE queue = ? "
                         "AND status IN ('RUNNING', 'WAITING') GROUP BY partition_key", [name])
        active = {key: int(n) for key, n in counted}
    chosen: list[str] = []
    for run_id, key, *_ in rows:
        if len(chosen) >= free:
            break
        if limits.partition_concurrency is not None:
            if active.get(key, 0) >= limits.partition_concurrency:
                continue
            active[key] = active.get(key, 0) + 1
        chosen.append(run_id)
    return chosen
