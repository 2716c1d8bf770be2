"""Row layout shared by the SQL backends: column lists, statements, record mapping.

Statements use `?` placeholders; the PostgreSQL store turns them into `%s`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from garrison.errors import (
    ConfigurationError,
    RunDeduplicatedError,
    RunNotFoundError,
    WorkflowConflictError,
    WorkflowError,
)
from garrison.store._records import (
    ClaimReason,
    RunRecord,
    RunStatus,
    StepKind,
    StepRecord,
    StepStatus,
    StreamRecord,
    position_key,
)

__all__ = [
    "INSERT_RUN",
    "INSERT_STREAM",
    "read_stream_query",
    "stream_from_row",
    "SELECT_DEDUP",
    "SELECT_RUN",
    "LIST_EVENTS",
    "RUN_COLUMNS",
    "STEP_COLUMNS",
    "STEP_CONFLICT",
    "TERMINAL_SQL",
    "CANCEL_CHILDREN",
    "FORKS_REUSING",
    "DUE_NOW",
    "PARK_RUN",
    "UPSERT_STEP",
    "REDRIVE_FORGET_END",
    "REDRIVE_FORGET_ENTRY",
    "REDRIVE_FORGET_FAILED",
    "INSERT_BREAKER_EVENT",
    "RELEASE_RUNS",
    "RUN_COUNTS",
    "BREAKER_HISTORY",
    "BUCKET_CREATE",
    "BUCKET_GIVE",
    "BUCKET_READ",
    "BUCKET_TAKE",
    "SELECT_BREAKERS",
    "STEP_COUNTS",
    "UPSERT_BREAKER",
    "REDRIVE_RUN",
    "child_conflict",
    "dedup_conflict",
    "refuse_event",
    "refuse_redrive",
    "release_filter",
    "top_position",
    "run_from_row",
    "run_values",
    "step_from_row",
    "step_values",
    "workflow_filter",
]

TERMINAL_SQL = "('COMPLETED', 'FAILED', 'CANCELLED', 'QUARANTINED')"
RUN_COLUMNS = (
    "run_id, workflow_name, workflow_version, status, inputs, created_at, updated_at, "
    "tenant_id, result, error, parent_run_id, parent_position, queue, completed_at, "
    "wake_at, deadline_at, trace_context, cancel_requested, owner, priority, partition_key, "
    "dedup_id, fence, lease_until, started_at, forked_from, forked_at, claim_reason, "
    "previous_owner, recoveries"
)
STEP_COLUMNS = (
    "run_id, position, kind, name, status, started_at, arity, inputs, output, error, "
    "completed_at, fire_at, attempts, worker, tenant_id"
)


def run_from_row(row: Sequence[Any]) -> RunRecord:
    return RunRecord(
        run_id=row[0], workflow_name=row[1], workflow_version=row[2],
        status=RunStatus(row[3]), inputs=row[4], created_at=row[5], updated_at=row[6],
        tenant_id=row[7], result=row[8], error=row[9], parent_run_id=row[10],
        parent_position=row[11], queue=row[12], completed_at=row[13], wake_at=row[14],
        deadline_at=row[15], trace_context=row[16], cancel_requested=bool(row[17]),
        owner=row[18], priority=row[19], partition_key=row[20], dedup_id=row[21],
        fence=row[22], lease_until=row[23], started_at=row[24], forked_from=row[25],
        forked_at=row[26], claim_reason=ClaimReason(row[27]) if row[27] else None,
        previous_owner=row[28], recoveries=row[29],
    )


def step_from_row(row: Sequence[Any]) -> StepRecord:
    return StepRecord(
        run_id=row[0], position=row[1], kind=StepKind(row[2]), name=row[3],
        status=StepStatus(row[4]), started_at=row[5], arity=row[6], inputs=row[7],
        output=row[8], error=row[9], completed_at=row[10], fire_at=row[11],
        attempts=row[12], worker=row[13], tenant_id=row[14],
    )


def run_values(run: RunRecord) -> tuple[Any, ...]:
    return (
        run.run_id, run.workflow_name, run.workflow_version, run.status.value, run.inputs,
        run.created_at, run.updated_at, run.tenant_id, run.result, run.error,
        run.parent_run_id, run.parent_position, run.queue, run.completed_at, run.wake_at,
        run.deadline_at, run.trace_context, int(run.cancel_requested), run.owner,
        run.priority, run.partition_key, run.dedup_id, run.fence, run.lease_until,
        run.started_at, run.forked_from, run.forked_at, run.claim_reason, run.previous_owner,
        run.recoveries,
    )


def step_values(step: StepRecord) -> tuple[Any, ...]:
    return (
        step.run_id, step.position, step.kind.value, step.name, step.status.value,
        step.started_at, step.arity, step.inputs, step.output, step.error,
        step.completed_at, step.fire_at, step.attempts, step.worker, step.tenant_id,
    )


# No conflict target: a taken run id and a taken (queue, dedup id) both insert nothing;
# the caller then tells which it was (`dedup_conflict`).
INSERT_RUN = (
    f"INSERT INTO runs ({RUN_COLUMNS}) VALUES ({', '.join('?' * 30)}) "
    "ON CONFLICT DO NOTHING"
)
SELECT_RUN = f"SELECT {RUN_COLUMNS} FROM runs WHERE run_id = ?"
# A dedup id stays taken while its run may still go on: a QUARANTINED run can be
# redriven, so it keeps its id (the partial unique index runs_dedup says the same).
SELECT_DEDUP = (
    "SELECT run_id FROM runs WHERE queue = ? AND dedup_id = ? "
    "AND status NOT IN ('COMPLETED', 'FAILED', 'CANCELLED')"
)
# A COMPLETED/FAILED entry (or the next retry wait) replaces a PENDING one; a finished
# entry is never rewritten.
STEP_CONFLICT = (
    "ON CONFLICT (run_id, position) DO UPDATE SET status = excluded.status, "
    "output = excluded.output, error = excluded.error, completed_at = excluded.completed_at, "
    "attempts = excluded.attempts, worker = excluded.worker, fire_at = excluded.fire_at "
    "WHERE steps.status = 'pending'"
)
UPSERT_STEP = f"INSERT INTO steps ({STEP_COLUMNS}) VALUES ({', '.join('?' * 15)}) {STEP_CONFLICT}"



# A cancelled parent flags its unfinished children in the same transaction (and wakes the
# parked ones), so that a crash right after the commit cannot leave them running.
CANCEL_CHILDREN = (
    "UPDATE runs SET cancel_requested = 1, updated_at = ?, wake_at = CASE "
    "WHEN status = 'WAITING' THEN ? ELSE wake_at END "
    f"WHERE parent_run_id = ? AND status NOT IN {TERMINAL_SQL} RETURNING run_id"
)
# A child's end goes to its parent and to every unfinished fork (`app.fork`) that reuses
# the parent's start of it: forks of the parent, and forks of those, made at or after
# the child's top-level position (`?` 2 and 3). The index on forked_from keeps this one
# probe when the parent has no fork.
FORKS_REUSING = (
    "WITH RECURSIVE forks(run_id) AS ("
    "SELECT run_id FROM runs WHERE forked_from = ? AND forked_at >= ? "
    "UNION SELECT r.run_id FROM runs r JOIN forks f ON r.forked_from = f.run_id "
    "WHERE r.forked_at >= ?) "
    "SELECT r.run_id FROM forks f JOIN runs r ON r.run_id = f.run_id "
    f"WHERE r.status NOT IN {TERMINAL_SQL} ORDER BY r.run_id"
)


def top_position(position: str | None) -> int:
    """The top-level position of a journal position ("4.2" -> 4; none -> 0), as the
    engine's fork keeps it (`position_key`)."""
    return position_key(position)[0] if position else 0


# Hand-back: runs of this worker (all of them when no ids are given: also those a claim
# still in flight at the stop commits just before) go back to nobody, still RUNNING.
# The worker is kept as `previous_owner` (a NULL owner means "nobody holds it"), for the
# next claim to report (`_claims`).
RELEASE_RUNS = (
    "UPDATE runs SET previous_owner = owner, owner = NULL, lease_until = NULL "
    "WHERE owner = ? AND status = 'RUNNING'"
)


def release_filter(run_ids: Sequence[str] | None) -> tuple[str, list[str]]:
    if run_ids is None:
        return "", []
    return f" AND run_id IN ({', '.join('?' * len(run_ids))})", list(run_ids)


# The wake-up of a parked run that an event or a cancellation makes due: "at once",
# whatever the sender's clock says (hosts disagree; the claimer compares its own now).
DUE_NOW = 0.0
# Parking: a run whose cancellation was asked meanwhile is due at once. The parking
# worker is kept as `previous_owner`, as at a hand-back.
PARK_RUN = (
    "UPDATE runs SET status = 'WAITING', wake_at = CASE WHEN cancel_requested = 1 THEN 0 "
    "ELSE ? END, updated_at = ?, previous_owner = owner, owner = NULL, lease_until = NULL "
    f"WHERE run_id = ? AND status NOT IN {TERMINAL_SQL}"
)


def child_conflict(stored: RunRecord, wanted: RunRecord) -> WorkflowConflictError | None:
    """Why an existing run cannot serve as the child `wanted` describes, if it cannot."""
    if (stored.parent_run_id, stored.parent_position, stored.workflow_name) == (
        wanted.parent_run_id, wanted.parent_position, wanted.workflow_name
    ):
        return None
    return WorkflowConflictError(
        f"run {wanted.parent_run_id} position {wanted.parent_position}: child run id "
        f"{wanted.run_id!r} already belongs to another run ({stored.workflow_name!r}, parent "
        f"{stored.parent_run_id!r}); choose another run_id or let Garrison name the child",
        run_id=wanted.parent_run_id, existing=stored.workflow_name,
        requested=wanted.workflow_name,
    )


def dedup_conflict(run: RunRecord, existing_run_id: str) -> RunDeduplicatedError:
    return RunDeduplicatedError(
        f"queue {run.queue!r} already holds unfinished run {existing_run_id!r} with "
        f"dedup_id={run.dedup_id!r}; app.handle({existing_run_id!r}) follows it, or pass "
        "another dedup_id once it has ended",
        run_id=run.run_id, queue=run.queue, dedup_id=run.dedup_id,
        existing_run_id=existing_run_id,
    )


# Redrive: a QUARANTINED run goes back to its queue; its failed steps run again, the
# completed ones keep their journaled results. Its deadline is lifted (it had passed,
# or the failure was another): a redriven run runs to its end.
REDRIVE_FORGET_FAILED = (  # failed steps, and steps quarantined in a retry wait
    "DELETE FROM steps WHERE run_id = ? AND kind = 'step' AND status IN ('failed', 'pending')"
)
REDRIVE_FORGET_ENTRY = "DELETE FROM steps WHERE run_id = ? AND position = ?"
REDRIVE_FORGET_END = (  # the redriven run's end, not yet read by its parent: void now
    "DELETE FROM events WHERE consumed_position IS NULL AND name = ? AND run_id = "
    "(SELECT parent_run_id FROM runs WHERE run_id = ?)"
)
REDRIVE_RUN = (
    "UPDATE runs SET status = 'PENDING', result = NULL, error = NULL, completed_at = NULL, "
    "deadline_at = NULL, owner = NULL, lease_until = NULL, wake_at = NULL, updated_at = ? "
    "WHERE run_id = ? AND status = 'QUARANTINED'"
)


# Reliability figures (garrison.resilience.reliability): runs by workflow and status,
# journaled steps by name and status, since a creation time.
RUN_COUNTS = (
    "SELECT workflow_name, status, count(*), avg(completed_at - created_at), "
    "sum(CASE WHEN recoveries > 0 THEN 1 ELSE 0 END) FROM runs WHERE created_at >= ? "
    "GROUP BY workflow_name, status"
)
STEP_COUNTS = (
    "SELECT s.name, s.status, count(*), sum(s.attempts - 1), "
    "avg(s.completed_at - s.started_at) FROM steps s JOIN runs r ON r.run_id = s.run_id "
    "WHERE s.kind = 'step' AND r.created_at >= ? GROUP BY s.name, s.status"
)


UPSERT_BREAKER = (
    "INSERT INTO breakers (name, state, open_until, updated_at, worker) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (name) DO UPDATE SET state = excluded.state, open_until = excluded.open_until, "
    "updated_at = excluded.updated_at, worker = excluded.worker"
)
SELECT_BREAKERS = "SELECT name, state, open_until FROM breakers"
INSERT_BREAKER_EVENT = "INSERT INTO breaker_events (name, state, at, worker) VALUES (?, ?, ?, ?)"
BREAKER_HISTORY = "SELECT name, state, at FROM breaker_events WHERE at >= ? ORDER BY name, at"
# A shared token bucket: created full; a token is taken only if one has refilled.
BUCKET_CREATE = "INSERT INTO buckets (name, tokens, at) VALUES (?, ?, ?) ON CONFLICT DO NOTHING"
BUCKET_TAKE = (
    "UPDATE buckets SET tokens = min_of(?, tokens + (? - at) * ?) - ?, at = ? "
    "WHERE name = ? AND min_of(?, tokens + (? - at) * ?) >= ? RETURNING tokens"
)
BUCKET_GIVE = "UPDATE buckets SET tokens = min_of(?, tokens + ?) WHERE name = ? RETURNING tokens"
BUCKET_READ = "SELECT tokens, at FROM buckets WHERE name = ?"


def refuse_redrive(run_id: str, status: str | None, where: str) -> None:
    """Raise unless `run_id` is a QUARANTINED run."""
    if status is None:
        raise RunNotFoundError(f"cannot redrive run {run_id!r}: no such run in {where}",
                               run_id=run_id)
    if status != RunStatus.QUARANTINED.value:
        raise WorkflowError(
            f"cannot redrive run {run_id!r}: it is {status}; only a QUARANTINED run "
            "continues with app.redrive (start a new run instead)", run_id=run_id)


def refuse_event(run_id: str, name: str, status: str | None, where: str) -> None:
    """Raise when an event cannot go to `run_id` (unknown, or already ended)."""
    if status is None:
        raise RunNotFoundError(
            f"cannot send {name!r} to run {run_id!r}: no such run in {where}; "
            "check the run id (app.start returns it on its handle)",
            run_id=run_id,
        )
    if RunStatus(status).is_terminal:
        raise WorkflowError(
            f"cannot send {name!r} to run {run_id!r}: it already ended {status}, so "
            "nothing would ever read it",
            run_id=run_id,
        )


LIST_EVENTS = (
    "SELECT run_id, seq, name, payload, sent_at, consumed_position, tenant_id "
    "FROM events WHERE run_id = ? ORDER BY seq"
)


def workflow_filter(workflows: Sequence[tuple[str, str]] | None
                    ) -> tuple[str | None, list[Any]]:
    """A `?`-style filter on (workflow_name, workflow_version) pairs.

    ("", []) for no filter; (None, []) for an empty allow-list, which matches nothing.
    """
    if workflows is None:
        return "", []
    if not workflows:
        return None, []
    pairs = ", ".join(["(?, ?)"] * len(workflows))
    return (f"AND (workflow_name, workflow_version) IN (VALUES {pairs}) ",
            [part for pair in workflows for part in pair])


# Run streams. An existing (run, key) inserts nothing and returns no row; the event
# takes its run's tenant (the default for a run this store does not know).
INSERT_STREAM = (
    "INSERT INTO streams (run_id, tenant_id, key, kind, data, at) VALUES (?, coalesce("
    "(SELECT tenant_id FROM runs WHERE run_id = ?), 'default'), ?, ?, ?, ?) "
    "ON CONFLICT (run_id, key) DO NOTHING RETURNING seq"
)


def read_stream_query(run_id: str, after: int, limit: int, key_prefix: str | None
                      ) -> tuple[str, list[Any]]:
    """The `?`-style read of a run's stream after `after`. A prefix is compared with
    `substr`, not LIKE, so `%` and `_` in it are plain characters."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ConfigurationError(
            f"read_stream(run {run_id!r}, limit={limit!r}): limit is a whole number >= 1",
            run_id=run_id)
    if isinstance(after, bool) or not isinstance(after, int) or after < 0:
        raise ConfigurationError(
            f"read_stream(run {run_id!r}, after={after!r}): after is an offset (a whole "
            "number >= 0: the last offset already read)", run_id=run_id)
    sql = "SELECT seq, run_id, key, kind, data, at FROM streams WHERE run_id = ? AND seq > ?"
    params: list[Any] = [run_id, after]
    if key_prefix:
        sql += " AND substr(key, 1, CAST(? AS INTEGER)) = ?"
        params += [len(key_prefix), key_prefix]
    return f"{sql} ORDER BY seq LIMIT ?", [*params, limit]


def stream_from_row(row: Sequence[Any]) -> StreamRecord:
    return StreamRecord(offset=int(row[0]), run_id=row[1], key=row[2], kind=row[3],
                        data=row[4], at=float(row[5]))
