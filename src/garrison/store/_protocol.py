"""The one `Store` protocol every backend implements and the contract suite checks."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit

from garrison.store._records import (
    EventRecord,
    QueueLimits,
    RunRecord,
    RunStatus,
    StepRecord,
    StreamRecord,
)

__all__ = ["Changes", "Store", "safe_url"]

# libpq's query parameters that carry a secret.
_SECRET_PARAMETERS = frozenset({"password", "sslpassword", "passfile"})


def safe_url(url: str) -> str:
    """`url` fit for a message or a log line: without a password (in the user part or
    as a query parameter, or a libpq `password=` keyword in a DSN that is not a URL);
    the rest (host, database, schema) is kept."""
    if "://" not in url:
        return _DSN_PASSWORD.sub(r"\1***", url)
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unclosed IPv6 bracket: show no more than the scheme
        return url.partition("://")[0] + "://(unparseable)"
    netloc, query = parts.netloc, parts.query
    user, at, host = netloc.rpartition("@")
    if at and ":" in user:
        netloc = f"{user.partition(':')[0]}@{host}"
    pairs = parse_qsl(query, keep_blank_values=True)
    kept = [(k, v) for k, v in pairs if k.lower() not in _SECRET_PARAMETERS]
    if len(kept) < len(pairs):
        query = urlencode(kept, safe="/:")
    if (netloc, query) == (parts.netloc, parts.query):
        return url  # nothing to hide
    # by hand: urlunsplit drops the // of an empty host (postgresql:///db?host=/tmp)
    return (f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")
            + (f"#{parts.fragment}" if parts.fragment else ""))


_DSN_PASSWORD = re.compile(r"((?:^|\s)password\s*=\s*)\S+", re.IGNORECASE)


@dataclass(slots=True)
class Changes:
    """What other processes wrote since the last `Store.changes()` call.

    `everything` means "unknown, look at all of it" (no notification channel, or one
    that was down for a while).
    """

    everything: bool = False
    queues: set[str] = field(default_factory=set)  # new runs, or a freed slot
    events: set[str] = field(default_factory=set)  # runs with new mailbox events
    cancels: set[str] = field(default_factory=set)  # runs asked to cancel
    streams: set[str] = field(default_factory=set)  # runs whose stream grew
    breakers: bool = False  # a worker published a circuit breaker's state
    wakeups: bool = False  # runs handed back or parked: claim what is due

    def add(self, payload: str) -> None:
        """Record one notification (`q:QUEUE`, `e:RUN`, `c:RUN`, `s:RUN`, `w`, `b`;
        anything else: all)."""
        kind, _, what = payload.partition(":")
        if kind == "q" and what:
            self.queues.add(what)
        elif kind == "e" and what:
            self.events.add(what)
        elif kind == "c" and what:
            self.cancels.add(what)
        elif kind == "s" and what:
            self.streams.add(what)
        elif kind == "w":
            self.wakeups = True
        elif kind == "b":
            self.breakers = True
        else:
            self.everything = True

    def __bool__(self) -> bool:
        return bool(self.everything or self.queues or self.events or self.cancels
                    or self.streams or self.wakeups or self.breakers)


class Store(Protocol):
    """Durable home of runs, their journals and their mailboxes.

    Every write is durable when its awaitable returns (group-committed with the writes
    of other runs queued at the same moment). A write that fails raised `StoreError`
    and left nothing half-written.
    """

    url: str
    safe_url: str  # `url` without its password: what messages and logs show
    # Whether several worker processes may share this store (PostgreSQL): then rate
    # limiters, retry budgets and bulkheads on steps keep their state in it.
    fleet: bool

    async def open(self) -> None:
        """Connect, create or migrate the schema. Raises `ConfigurationError`/`StoreError`."""

    async def close(self) -> None:
        """Flush queued writes and release every resource."""

    async def register_worker(self, worker_id: str, *, lease_ttl_s: float = 10.0) -> None:
        """Make this store a worker's: claims are leased to `worker_id` for `lease_ttl_s`
        and its writes about a run are fenced (they fail with `LeaseLostError` once the
        run is no longer held). The embedded store admits one worker process at a time."""

    async def claim_due(self, *, now: float, queues: Sequence[str] | None,
                        workflows: Sequence[tuple[str, str]] | None,
                        limit: int) -> list[RunRecord]:
        """Claim runs to resume: parked runs due at `now`, RUNNING runs nobody holds (lease
        expired or handed back), and never-started runs whose cancel was requested.
        Only runs of `queues` (None: any) and of `workflows` (name, version)."""

    async def claim_queued(self, limits: QueueLimits, slots: int, *,
                           workflows: Sequence[tuple[str, str]] | None) -> list[RunRecord]:
        """Start up to `slots` PENDING runs of one queue within its limits."""

    async def claim_run(self, run_id: str, *, now: float, mine: bool = False
                        ) -> RunRecord | None:
        """Claim one unfinished run nobody holds (lease ended or handed back), or, with
        `mine`, one this worker holds (a resume after a failed write). Waits for the
        run's row if another transaction has it."""

    async def renew_leases(self) -> set[str]:
        """Extend this worker's leases; returns the run ids it no longer holds."""

    async def release_runs(self, run_ids: Sequence[str] | None) -> None:
        """Hand runs back (still RUNNING, nobody's): another worker resumes them at once.
        None: every run this worker owns in the store (a stopping worker's hand-back)."""

    def holds(self, run_id: str) -> bool:
        """Whether this worker holds `run_id` (as far as it knows)."""

    def held(self) -> list[str]:
        """The runs this worker holds (as far as it knows)."""

    def forget(self, run_id: str) -> None:
        """Stop holding `run_id` locally (its execution was dropped)."""

    async def create_run(self, run: RunRecord) -> tuple[RunRecord, bool]:
        """Insert `run` unless its id exists; return the stored run and whether it was new."""

    async def create_child_run(self, run: RunRecord, step: StepRecord) -> tuple[RunRecord, bool]:
        """Insert a child run and its parent's journal entry in one transaction."""

    async def create_run_with_journal(self, run: RunRecord, steps: Sequence[StepRecord]
                                      ) -> tuple[RunRecord, bool]:
        """Insert `run` with journal entries already in place (a fork), in one transaction;
        the entries are written only if the run is new. Returns the stored run and whether
        it was new."""

    async def get_run(self, run_id: str) -> RunRecord | None:
        """The run, or None."""

    async def list_runs(
        self,
        *,
        statuses: Sequence[RunStatus] | None = None,
        workflow_name: str | None = None,
        parent_run_id: str | None = None,
        limit: int = 100,
    ) -> list[RunRecord]:
        """Runs, newest first, filtered by status, workflow or parent."""

    async def load_journal(self, run_id: str) -> list[StepRecord]:
        """Every journal entry of a run (any order)."""

    async def append_steps(self, steps: Sequence[StepRecord]) -> None:
        """Write journal entries; a COMPLETED/FAILED entry replaces a PENDING one."""

    async def set_run_status(
        self, run_id: str, status: RunStatus, *, owner: str | None = None,
    ) -> None:
        """Move a non-terminal run to `status` and clear its wake-up (terminal runs stay)."""

    async def park_run(self, run_id: str, wake_at: float | None, events: Sequence[str], *,
                       now: float | None = None) -> None:
        """Mark a run WAITING until `wake_at`, or `now` if one of `events` is already queued.

        `now` is the caller's clock (the engine's, possibly a fake one); default: wall time.
        """

    async def finish_run(
        self, run_id: str, status: RunStatus, *, result: str | None, error: str | None,
        completed_at: float, notify: EventRecord | None = None, force: bool = False,
    ) -> bool:
        """End a run once; `notify` (to a parent) is sent in the same transaction.

        `force`: whoever holds the run (its fence moves on, so the holder's further
        writes are refused): the supervisor's kill after a shutdown timeout.

        Returns False when the run had already ended (nothing was changed).
        """

    async def send_event(self, run_id: str, name: str, payload: str, sent_at: float) -> int:
        """Append to a run's mailbox and wake it if parked; returns the event's seq.

        Raises `RunNotFoundError` for an unknown run.
        """

    async def consume_event(self, run_id: str, name: str, step: StepRecord) -> StepRecord | None:
        """Take the oldest unconsumed event `name` and journal it as `step`, atomically.

        Returns the written entry (its `output` is the event's payload), or None.
        """

    async def list_events(self, run_id: str) -> list[EventRecord]:
        """A run's mailbox, consumed and not, in send order."""

    async def request_cancel(self, run_id: str, *, now: float | None = None) -> RunRecord:
        """Flag a run for cancellation and wake it (at `now`) if parked.

        Raises `RunNotFoundError`.
        """

    async def redrive_run(self, run_id: str, *, now: float,
                          forget: Sequence[str] = ()) -> RunRecord:
        """Send a QUARANTINED run back to its queue (PENDING), forgetting its failed
        steps and the journal entries at `forget` (a failed child's result, to be
        waited for again). Raises `RunNotFoundError`, or `WorkflowError` for a run in
        another state."""

    async def counts(self, since: float) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        """Aggregates of runs created since `since`: (workflow, status, runs, mean
        duration, runs claimed more than once) and (step, status, entries, retries, mean
        duration)."""

    async def publish_breaker(self, name: str, state: str, open_for_s: float | None) -> None:
        """Share a circuit breaker's state with the fleet (`open_for_s`: how long it stays
        open from now; kept on the store's clock)."""

    async def take_token(self, name: str, *, rate_per_s: float, burst: float,
                         cost: float = 1.0) -> float:
        """Take `cost` tokens of the shared bucket `name` (created full with `burst`,
        refilling at `rate_per_s`): 0.0 when taken, else the seconds until enough refill
        (infinity if it never refills by itself); nothing is taken then."""

    async def take_permit(self, name: str, permit_id: str, *, limit: int) -> bool:
        """Take a place of the fleet-wide bulkhead `name` (at most `limit` at once),
        held for this worker's lease TTL unless renewed (`renew_permits`); False when
        every place is taken."""

    async def release_permit(self, permit_id: str) -> None:
        """Give a bulkhead place back."""

    async def renew_permits(self) -> None:
        """Extend the places this worker holds (its heartbeat does)."""

    async def give_tokens(self, name: str, *, amount: float, burst: float) -> float:
        """Give tokens back to the shared bucket `name` (at most `burst`); its tokens."""

    async def breaker_history(self, since: float) -> list[tuple[str, str, float]]:
        """Published breaker transitions since `since` (wall time): (name, state, at),
        by name then time."""

    async def breaker_states(self) -> dict[str, tuple[str, float | None]]:
        """The last published state of every shared breaker: name -> (state, seconds it
        stays open from now, or None)."""

    async def due_runs(self, now: float, *, limit: int = 1000,
                       workflows: Sequence[tuple[str, str]] | None = None) -> list[RunRecord]:
        """WAITING runs whose `wake_at` has come, earliest first.

        `workflows` keeps only these (name, version) pairs, so that runs of versions a
        worker cannot run never crowd out the ones it can.
        """

    async def recoverable_runs(self, *, limit: int = 10_000,
                               workflows: Sequence[tuple[str, str]] | None = None
                               ) -> list[RunRecord]:
        """PENDING and RUNNING runs, oldest first (only these (name, version) pairs)."""

    async def append_stream(self, run_id: str, events: Sequence[tuple[str, str, str]], *,
                            at: float) -> list[int | None]:
        """Append `(key, kind, data)` events to a run's stream, in order, durably.

        Idempotent per (run, key): an event whose key the run's stream already holds is
        left as it is, and its slot in the result is None; every other slot is the new
        event's offset. Offsets are global sequence numbers: within one run they grow in
        commit order (a run's writes are sequential) but have gaps. A worker's append is
        fenced like its journal writes (`LeaseLostError` once it no longer holds the
        run). Announced to readers: `Changes.streams` (`s:RUN` on PostgreSQL, in this
        store object on SQLite).
        """

    async def read_stream(self, run_id: str, *, after: int = 0, limit: int = 1000,
                          key_prefix: str | None = None) -> list[StreamRecord]:
        """At most `limit` events of a run's stream with offset > `after`, ascending;
        only keys starting with `key_prefix` if given. An unknown run has none."""

    async def changes(self) -> Changes:
        """What other processes wrote since the last call (a cheap poll)."""
