"""Queues: named lanes of runs with fleet-wide limits, declared with `app.queue(...)`.

Every run belongs to a queue ("default" unless `app.start(..., queue=)` says otherwise).
The limits are enforced by the store when a worker claims runs (`store._claims`), so they
hold across every worker process sharing the store, on SQLite and on PostgreSQL alike.
"""

from __future__ import annotations

from dataclasses import dataclass

from garrison.errors import ConfigurationError
from garrison.store import QueueLimits

__all__ = ["DEFAULT_QUEUE", "Queue", "StartOptions"]

DEFAULT_QUEUE = "default"


def _positive(queue: str, name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or value < 1):
        raise ConfigurationError(
            f"app.queue({queue!r}, {name}={value!r}): a whole number >= 1, or None for no limit"
        )


@dataclass(frozen=True, slots=True)
class Queue:
    """A declared queue (what `app.queue` returns; pass it or its name to `app.start`).

    Attributes:
        name: the queue's name, stored with each of its runs.
        concurrency: at most this many active runs (RUNNING or WAITING) across the fleet.
        worker_concurrency: at most this many of its runs executing in one worker.
        rate_limit: `(n, seconds)`: at most n runs started in any `seconds` window.
        priority: runs carry `priority=` (lower first, default 0); without it, FIFO.
        partition: runs carry `partition_key=`; keys are served in turn (fairness).
        partition_concurrency: at most this many active runs per partition key.
    """

    name: str
    concurrency: int | None = None
    worker_concurrency: int | None = None
    rate_limit: tuple[int, float] | None = None
    priority: bool = False
    partition: bool = False
    partition_concurrency: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ConfigurationError(f"app.queue({self.name!r}): a queue name is a non-empty str")
        for field in ("concurrency", "worker_concurrency", "partition_concurrency"):
            _positive(self.name, field, getattr(self, field))
        if self.rate_limit is not None:
            ok = (isinstance(self.rate_limit, tuple) and len(self.rate_limit) == 2
                  and isinstance(self.rate_limit[0], int) and self.rate_limit[0] >= 1
                  and isinstance(self.rate_limit[1], int | float) and self.rate_limit[1] > 0)
            if not ok:
                raise ConfigurationError(
                    f"app.queue({self.name!r}, rate_limit={self.rate_limit!r}): write "
                    "(runs, seconds), e.g. (10, 1.0) for at most 10 starts per second"
                )
        if self.partition_concurrency is not None and not self.partition:
            raise ConfigurationError(
                f"app.queue({self.name!r}, partition_concurrency=...): needs partition=True"
            )

    @property
    def limits(self) -> QueueLimits:
        """What the store enforces at claim time."""
        return QueueLimits(self.name, concurrency=self.concurrency, rate_limit=self.rate_limit,
                           priority=self.priority, partition=self.partition,
                           partition_concurrency=self.partition_concurrency)

    @property
    def unlimited(self) -> bool:
        """No limit of any kind: a worker may run a run it starts itself, at once."""
        return (not self.limits.serialized and self.worker_concurrency is None
                and not self.priority and not self.partition)


@dataclass(frozen=True, slots=True)
class StartOptions:
    """Where `app.start` puts a run: checked against the queue's declaration."""

    queue: Queue
    priority: int = 0
    partition_key: str | None = None
    dedup_id: str | None = None

    @classmethod
    def check(cls, queue: Queue, priority: int | None, partition_key: str | None,
              dedup_id: str | None) -> StartOptions:
        where = f"app.start(queue={queue.name!r}"
        if priority is not None:
            if not queue.priority:
                raise ConfigurationError(
                    f"{where}, priority={priority!r}): queue {queue.name!r} has no priorities; "
                    f"declare it with app.queue({queue.name!r}, priority=True)"
                )
            if isinstance(priority, bool) or not isinstance(priority, int):
                raise ConfigurationError(
                    f"{where}, priority={priority!r}): an int (lower runs first)")
        if queue.partition and partition_key is None:
            raise ConfigurationError(
                f"{where}): queue {queue.name!r} is partitioned; pass partition_key= (e.g. "
                "the customer or conversation id)"
            )
        if partition_key is not None:
            if not queue.partition:
                raise ConfigurationError(
                    f"{where}, partition_key={partition_key!r}): queue {queue.name!r} is not "
                    f"partitioned; declare it with app.queue({queue.name!r}, partition=True)"
                )
            if not isinstance(partition_key, str) or not partition_key:
                raise ConfigurationError(
                    f"{where}, partition_key={partition_key!r}): a non-empty str")
        if dedup_id is not None and (not isinstance(dedup_id, str) or not dedup_id):
            raise ConfigurationError(f"{where}, dedup_id={dedup_id!r}): a non-empty str")
        return cls(queue, priority or 0, partition_key, dedup_id)
