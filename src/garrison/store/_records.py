"""The records a store persists: runs, journal steps and events."""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = [
    "DEFAULT_TENANT",
    "ClaimReason", "EventRecord", "QueueLimits", "RunRecord", "RunStatus", "StepKind",
    "StepRecord", "StepStatus",
    "StreamRecord",
    "position_key",
]

DEFAULT_TENANT = "default"


class RunStatus(enum.StrEnum):
    """Where a run is in its life. Ended: COMPLETED, FAILED, CANCELLED, QUARANTINED (a
    failed run kept with its inputs, journal and error until `app.redrive` continues it)."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    WAITING = "WAITING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    QUARANTINED = "QUARANTINED"

    @property
    def is_terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset({RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED,
                       RunStatus.QUARANTINED})


class ClaimReason(enum.StrEnum):
    """How a run's current owner came to hold it: what the run was when it was claimed.

    A recovery (`is_recovery`) is a take-over of a run that was RUNNING: its segment
    ended without the run parking or finishing, and the new owner resumes it from its
    journal.
    """

    START = "start"  # PENDING: a first start (or a claim to cancel a run never started)
    WAKE_UP = "wake_up"  # WAITING: a parked run whose timer or event came
    ABANDONED = "abandoned"  # RUNNING, its owner's lease ran out (a crash, a hang, a
    # lost connection), or the earlier process on its SQLite file is gone
    HANDED_BACK = "handed_back"  # RUNNING, released by a stopping worker
    RETRY = "retry"  # RUNNING and held by this worker: resumed after a failed write

    @property
    def is_recovery(self) -> bool:
        return self in _RECOVERIES


_RECOVERIES = frozenset({ClaimReason.ABANDONED, ClaimReason.HANDED_BACK, ClaimReason.RETRY})


class StepKind(enum.StrEnum):
    """What a journal entry records."""

    STEP = "step"
    SLEEP = "sleep"
    WAIT = "wait"
    CHILD = "child"
    CHILD_RESULT = "child_result"
    NOW = "now"
    UUID = "uuid"
    RANDOM = "random"


class StepStatus(enum.StrEnum):
    """A journal entry is PENDING (a parked timer or wait) until it COMPLETED or FAILED."""

    PENDING = "pending"
    COMPLETED = "completed"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class RunRecord:
    """One durable run. Payload fields hold journal JSON text (see `engine._codec`)."""

    run_id: str
    workflow_name: str
    workflow_version: str
    status: RunStatus
    inputs: str
    created_at: float
    updated_at: float
    tenant_id: str = DEFAULT_TENANT
    result: str | None = None
    error: str | None = None
    parent_run_id: str | None = None
    parent_position: str | None = None
    queue: str = "default"
    completed_at: float | None = None
    wake_at: float | None = None
    deadline_at: float | None = None
    trace_context: str | None = None
    cancel_requested: bool = False
    owner: str | None = None
    priority: int = 0
    partition_key: str | None = None
    dedup_id: str | None = None
    fence: int = 0
    lease_until: float | None = None
    started_at: float | None = None
    forked_from: str | None = None  # `app.fork`: the run whose journal this one reuses
    forked_at: int | None = None  # ... up to this top-level position (its `at_step`)
    claim_reason: ClaimReason | None = None  # set by each claim (None until claimed)
    previous_owner: str | None = None  # who held it, or last let it go, before the claim
    recoveries: int = 0  # claims that were recoveries (`ClaimReason.is_recovery`)


@dataclass(frozen=True, slots=True)
class QueueLimits:
    """What a store enforces when a worker claims runs from a queue (see `Garrison.queue`).

    Active runs are those claimed and not ended (RUNNING or WAITING); `rate_limit` counts
    runs started in the last `seconds`.
    """

    name: str
    concurrency: int | None = None
    rate_limit: tuple[int, float] | None = None
    priority: bool = False
    partition: bool = False
    partition_concurrency: int | None = None

    @property
    def serialized(self) -> bool:
        """Whether claims must take the queue's lock to keep a fleet-wide count exact."""
        return (self.concurrency is not None or self.rate_limit is not None
                or self.partition_concurrency is not None)


@dataclass(frozen=True, slots=True)
class StepRecord:
    """One journal entry: the outcome of a step, timer, wait, child start or journaled value.

    `position` is a dotted path ("3", "4.2.1"): the branch's path, then its counter.
    """

    run_id: str
    position: str
    kind: StepKind
    name: str
    status: StepStatus
    started_at: float
    arity: int = 0
    inputs: str | None = None
    output: str | None = None
    error: str | None = None
    completed_at: float | None = None
    fire_at: float | None = None
    attempts: int = 1
    worker: str | None = None
    tenant_id: str = DEFAULT_TENANT


@dataclass(frozen=True, slots=True)
class EventRecord:
    """A message sent to a run's mailbox with `Garrison.send`; consumed in `seq` order."""

    run_id: str
    seq: int
    name: str
    payload: str
    sent_at: float
    consumed_position: str | None = None
    tenant_id: str = DEFAULT_TENANT


@dataclass(frozen=True, slots=True)
class StreamRecord:
    """One event of a run's stream (`garrison.publish`), read with `Garrison.stream`.

    `offset` is a global sequence number: it grows with every append to any run, so a
    run's offsets increase (in commit order) but have gaps. A reader resumes by passing
    the last offset it saw as `after`. `data` is journal JSON text (see
    `engine._codec`); `key` is unique within the run.
    """

    offset: int
    run_id: str
    key: str
    kind: str
    data: str
    at: float


def position_key(position: str) -> tuple[int, ...]:
    """Sort key for dotted positions: "2" < "10" < "10.1"."""
    return tuple(int(part) for part in position.split("."))
