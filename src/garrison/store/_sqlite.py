"""The embedded SQLite store: WAL, one connection, group commit on the event-loop thread.

Why the loop thread: on this class of machine a durable commit costs ~0.2 ms and
handing each batch to a writer thread and back cost ~0.15 ms more per step (GIL
hand-off after the sync), so committing the batch of writes queued during one
event-loop pass, on the loop, is both faster and simpler (docs/decisions/0002).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import sqlite3
import time
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

from garrison._log import get_logger
from garrison.errors import (
    ConfigurationError,
    LeaseLostError,
    RunNotFoundError,
    SchemaVersionError,
    StoreError,
    StoreLockedError,
    WorkflowError,
)
from garrison.store._buckets import give_tokens, take_permit, take_token
from garrison.store._buckets import one_statement as _one
from garrison.store._claims import Dialect, claim_due, claim_one, claim_queued
from garrison.store._leases import LeaseBook
from garrison.store._protocol import Changes
from garrison.store._records import (
    EventRecord,
    QueueLimits,
    RunRecord,
    RunStatus,
    StepRecord,
    StepStatus,
    StreamRecord,
)
from garrison.store._rows import (
    BREAKER_HISTORY,
    CANCEL_CHILDREN,
    DUE_NOW,
    FORKS_REUSING,
    INSERT_BREAKER_EVENT,
    INSERT_RUN,
    INSERT_STREAM,
    LIST_EVENTS,
    PARK_RUN,
    REDRIVE_FORGET_END,
    REDRIVE_FORGET_ENTRY,
    REDRIVE_FORGET_FAILED,
    REDRIVE_RUN,
    RELEASE_RUNS,
    RUN_COLUMNS,
    RUN_COUNTS,
    SELECT_BREAKERS,
    SELECT_DEDUP,
    SELECT_RUN,
    STEP_COLUMNS,
    STEP_COUNTS,
    TERMINAL_SQL,
    UPSERT_BREAKER,
    UPSERT_STEP,
    child_conflict,
    dedup_conflict,
    read_stream_query,
    refuse_event,
    refuse_redrive,
    release_filter,
    run_from_row,
    run_values,
    step_from_row,
    step_values,
    stream_from_row,
    top_position,
    workflow_filter,
)
from garrison.store._schema import SCHEMA_VERSION, migrations

__all__ = ["SQLiteStore", "parse_sqlite_url"]

log = get_logger(__name__)

MIGRATIONS = migrations("sqlite")

T = TypeVar("T")
_Op = Callable[[sqlite3.Connection], Any]

_SYNC_MODES = ("FULL", "NORMAL", "EXTRA", "OFF")
_MAX_NOTES = 10_000  # runs noted for changes() before "everything" replaces them
# One writer already: no row locks to skip, no queue lock to take.
_DIALECT = Dialect(skip_locked="", queue_lock=None)


def _drive(plan: Generator[tuple[str, Any], list[Any], T], conn: sqlite3.Connection) -> T:
    """Run a sans-I/O plan (`_claims`, `_buckets`) on `conn`."""
    try:
        sql, params = next(plan)
        while True:
            sql, params = plan.send(conn.execute(sql, params).fetchall())
    except StopIteration as stop:
        outcome: T = stop.value
        return outcome


def parse_sqlite_url(url: str) -> tuple[str, dict[str, str]]:
    """Split `sqlite:///relative.db?synchronous=NORMAL` into a path and options.

    `sqlite:///x.db` is relative to the working directory, `sqlite:////abs/x.db` absolute,
    `sqlite:///:memory:` an in-memory database (not durable: tests only).
    """
    parts = urlsplit(url)
    if parts.scheme != "sqlite":
        raise ConfigurationError(
            f"store URL {url!r}: expected 'sqlite:///path/to/file.db'", url=url
        )
    if parts.netloc:
        raise ConfigurationError(
            f"store URL {url!r}: a SQLite URL has no host; write 'sqlite:///{parts.netloc}"
            f"{parts.path}' (three slashes, then the path)",
            url=url,
        )
    path = parts.path[1:] if parts.path.startswith("/") else parts.path
    if not path:
        raise ConfigurationError(
            f"store URL {url!r}: no file path; write e.g. 'sqlite:///garrison.db'", url=url
        )
    options = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    unknown = set(options) - {"synchronous", "busy_timeout_ms"}
    if unknown:
        raise ConfigurationError(
            f"store URL {url!r}: unknown option(s) {sorted(unknown)}; "
            "known: synchronous=FULL|NORMAL, busy_timeout_ms=N",
            url=url,
        )
    sync = options.get("synchronous", "FULL").upper()
    if sync not in _SYNC_MODES:
        raise ConfigurationError(
            f"store URL {url!r}: synchronous={sync!r} is not one of {_SYNC_MODES}", url=url
        )
    options["synchronous"] = sync
    busy = options.get("busy_timeout_ms", "5000")
    if not busy.isdigit():
        raise ConfigurationError(
            f"store URL {url!r}: busy_timeout_ms={busy!r} must be a whole number of "
            "milliseconds, e.g. busy_timeout_ms=5000",
            url=url,
        )
    return path, options


def _store_error(exc: sqlite3.Error, path: str, action: str) -> StoreError:
    text = str(exc)
    if "readonly" in text or "read-only" in text:
        hint = "the database file or its folder is read-only: check permissions and the mount"
    elif "disk is full" in text or "disk I/O" in text:
        hint = "the disk is full or failing: free space; this batch was rolled back whole"
    elif "locked" in text or "busy" in text:
        hint = ("another process holds a write lock for longer than busy_timeout_ms; "
                "stop it or raise busy_timeout_ms in the URL")
    elif "not a database" in text or "malformed" in text:
        hint = "this file is not a Garrison SQLite database (or is damaged)"
    else:
        hint = "see the cause below"
    return StoreError(f"SQLite store {path}: {action} failed: {text} ({hint})", path=path)


class _GroupCommit:
    """Queue writes during one event-loop pass; commit them in one transaction.

    Each write runs inside its own SAVEPOINT, so one failing write fails only its own
    caller; a failed COMMIT rolls the whole batch back and fails every caller in it.
    Journal rows (the bulk of the traffic) first go in together, in one statement; only
    if that fails are they retried one caller at a time.
    """

    def __init__(self, conn: sqlite3.Connection, path: str) -> None:
        self._conn = conn
        self._path = path
        self._ops: list[tuple[_Op, asyncio.Future[Any]]] = []
        self._steps: dict[asyncio.Future[Any], list[tuple[Any, ...]]] = {}
        self._scheduled = False
        self.batches = 0
        self.writes = 0

    def submit(self, op: _Op, *, step_rows: list[tuple[Any, ...]] | None = None
               ) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._ops.append((op, future))
        if step_rows is not None:
            self._steps[future] = step_rows
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self.flush)
        return future

    def _write_steps_together(self, conn: sqlite3.Connection,
                              steps: dict[asyncio.Future[Any], list[tuple[Any, ...]]]
                              ) -> set[asyncio.Future[Any]]:
        """One executemany for every caller's journal rows; the callers it served."""
        live = {f: rows for f, rows in steps.items() if not f.cancelled()}
        if len(live) < 2:
            return set()
        conn.execute("SAVEPOINT steps")
        try:
            conn.executemany(UPSERT_STEP, [row for rows in live.values() for row in rows])
        except (sqlite3.IntegrityError, sqlite3.InterfaceError, ValueError, OverflowError):
            conn.execute("ROLLBACK TO steps")
            conn.execute("RELEASE steps")
            return set()  # one of them is bad: each goes again on its own, below
        conn.execute("RELEASE steps")
        return set(live)

    def flush(self) -> None:
        self._scheduled = False
        ops, self._ops = self._ops, []
        steps, self._steps = self._steps, {}
        if not ops:
            return
        conn = self._conn
        outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        # A lone write needs no savepoint: if it fails, rolling back is the same thing.
        isolate = len(ops) > 1
        try:
            conn.execute("BEGIN IMMEDIATE")
            served = self._write_steps_together(conn, steps)
            for op, future in ops:
                if future.cancelled():
                    continue  # its caller is gone (run closing, shutdown): write nothing
                if future in served:
                    outcomes.append((future, None, None))
                    continue
                if isolate:
                    conn.execute("SAVEPOINT op")
                try:
                    outcome = op(conn)
                except (WorkflowError, RunNotFoundError, LeaseLostError) as exc:
                    conn.execute("ROLLBACK TO op" if isolate else "ROLLBACK")
                    outcomes.append((future, None, exc))
                except (sqlite3.IntegrityError, sqlite3.InterfaceError, ValueError,
                        OverflowError) as exc:
                    # This write alone is bad (a constraint, a value SQLite cannot bind):
                    # undo it, keep the others.
                    conn.execute("ROLLBACK TO op" if isolate else "ROLLBACK")
                    rejected = StoreError(
                        f"SQLite store {self._path}: write rejected: {exc}; "
                        "nothing of this write was kept",
                        path=self._path,
                    )
                    rejected.__cause__ = exc
                    outcomes.append((future, None, rejected))
                else:
                    outcomes.append((future, outcome, None))
                if isolate:
                    conn.execute("RELEASE op")
            if conn.in_transaction:
                conn.execute("COMMIT")
        except BaseException as exc:
            if conn.in_transaction:
                # A broken connection may refuse even this; the error below says why.
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            if not isinstance(exc, Exception):
                for _, future in ops:
                    if not future.done():
                        future.cancel()
                raise
            if isinstance(exc, sqlite3.Error):
                error = _store_error(exc, self._path, "commit")
            else:
                error = StoreError(f"SQLite store {self._path}: a write failed: {exc!r}; "
                                   "the batch was rolled back whole", path=self._path)
                error.__cause__ = exc
            log.error("store.commit_failed", path=self._path, writes=len(ops), error=str(exc))
            for _, future in ops:
                if not future.done():
                    future.set_exception(error)
            return
        self.batches += 1
        self.writes += len(ops)
        for future, outcome, error_ in outcomes:
            if future.done():
                continue
            if error_ is not None:
                future.set_exception(error_)
            else:
                future.set_result(outcome)


class SQLiteStore(LeaseBook):
    fleet = False  # one worker process per file: limits can count in the process

    """The embedded default store. One worker process per database file.

    Durability: WAL with `synchronous=FULL` (survives power loss); `?synchronous=NORMAL`
    survives a process crash but may lose the last commits on power loss.
    """

    def __init__(self, url: str = "sqlite:///garrison.db", *, create: bool = True) -> None:
        self.url = url
        self.path, self._options = parse_sqlite_url(url)
        self._create = create
        self._conn: sqlite3.Connection | None = None
        self._writer: _GroupCommit | None = None
        self._lock_fd: int | None = None
        self._data_version: int | None = None
        self._streams_grown: set[str] = set()  # appended here since the last changes()
        # Forks told of a reused child's end here since the last changes(): the engine
        # wakes its own parents at once, and learns of these from changes().
        self._forks_told: set[str] = set()
        # An app without a worker never calls changes(): past this many noted runs the
        # notes are dropped and the next changes() says "look at everything" instead.
        self._overflowed = False
        self.safe_url = self.path
        self._init_leases()

    # -- lifecycle -----------------------------------------------------------------

    async def open(self) -> None:
        if self._conn is not None:
            return
        memory = self.path == ":memory:"
        if not memory:
            file = Path(self.path)
            if not file.parent.exists():
                raise ConfigurationError(
                    f"SQLite store {self.path}: folder {str(file.parent)!r} does not exist; "
                    "create it or fix the URL",
                    path=self.path,
                )
            if not self._create and not os.path.exists(file):  # noqa: ASYNC240  # µs, once
                raise ConfigurationError(
                    f"SQLite store {self.path}: no such database; check the URL or the "
                    "working directory (sqlite:///x.db is relative, sqlite:////x.db absolute)",
                    path=self.path,
                )
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise _store_error(exc, self.path, "open") from exc
        try:
            busy = int(self._options.get("busy_timeout_ms", "5000"))
            conn.execute(f"PRAGMA busy_timeout = {busy}")
            if not memory:
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise StoreError(
                        f"SQLite store {self.path}: could not switch to WAL mode (got {mode}); "
                        "is the file on a network filesystem?",
                        path=self.path,
                    )
            conn.execute(f"PRAGMA synchronous = {self._options['synchronous']}")
            self._migrate(conn)
        except BaseException as exc:
            conn.close()  # release the file now, not when the garbage collector runs
            if isinstance(exc, sqlite3.Error):
                raise _store_error(exc, self.path, "open") from exc
            raise
        self._conn = conn
        self._writer = _GroupCommit(conn, self.path)

    def _migrate(self, conn: sqlite3.Connection) -> None:
        has_meta = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'garrison_meta'"
        ).fetchone()
        found = 0
        if has_meta:
            row = conn.execute(
                "SELECT value FROM garrison_meta WHERE key = 'schema_version'"
            ).fetchone()
            found = int(row[0]) if row else 0
        if found > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"SQLite store {self.path}: schema version {found} was written by a newer "
                f"Garrison (this one knows {SCHEMA_VERSION}); upgrade Garrison",
                path=self.path, found=found, supported=SCHEMA_VERSION,
            )
        if found == SCHEMA_VERSION:
            return
        if not has_meta:
            tables = conn.execute(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table'"
            ).fetchone()[0]
            if tables:
                raise StoreError(
                    f"SQLite store {self.path}: the file holds other tables and no Garrison "
                    "schema; point Garrison at its own database file",
                    path=self.path,
                )
        conn.execute("BEGIN IMMEDIATE")
        try:
            for version in range(found + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[version].split(";"):
                    if statement.strip():
                        conn.execute(statement)
            conn.execute(
                "INSERT OR REPLACE INTO garrison_meta (key, value) VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
        if self._conn is not None:
            self._conn.close()
            self._conn = None
            self._writer = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def register_worker(self, worker_id: str, *, lease_ttl_s: float = 10.0) -> None:
        await LeaseBook.register_worker(self, worker_id, lease_ttl_s=lease_ttl_s)
        if self.path == ":memory:" or self._lock_fd is not None:
            return
        lock_path = f"{self.path}.worker.lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StoreLockedError(
                f"SQLite store {self.path}: another Garrison worker (pid {holder}) is running on "
                "this database; the embedded store takes one worker process. Stop it, or use "
                "PostgreSQL for a fleet of workers.",
                path=self.path, pid=holder,
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd

        def op(conn: sqlite3.Connection) -> None:
            # This process holds the file's one worker lock: every earlier worker is gone,
            # so their leases end now (no need to wait for them to run out).
            # A run still owned was abandoned (its process died holding it: lease 0
            # marks it so for the claim, `_claims`); a run handed back has no owner.
            # Both are claimable at once.
            conn.execute("UPDATE runs SET lease_until = 0 WHERE status = 'RUNNING' "
                         "AND (lease_until IS NOT NULL OR owner IS NOT NULL)")

        await self._write(op)

    def _fenced(self, run_id: str) -> None:
        """A worker's write about `run_id`: does it still hold it? One worker process per
        file (the lock above), so the book in memory is the whole truth here."""
        if self.worker_id is not None and run_id not in self._held:
            raise self._lost(run_id, "not held")

    # -- leases --------------------------------------------------------------------

    async def claim_due(self, *, now: float, queues: Sequence[str] | None,
                        workflows: Sequence[tuple[str, str]] | None,
                        limit: int) -> list[RunRecord]:
        plan = claim_due(_DIALECT, self._require_worker(), now=now, wall=self._wall(),
                         lease_until=self._lease_until(), queues=queues,
                         workflows=workflows, limit=limit)
        return await self._write(lambda conn: self._took(_drive(plan, conn)))

    async def claim_queued(self, limits: QueueLimits, slots: int, *,
                           workflows: Sequence[tuple[str, str]] | None) -> list[RunRecord]:
        plan = claim_queued(_DIALECT, self._require_worker(), limits, slots, wall=self._wall(),
                            lease_until=self._lease_until(), lock_key=limits.name,
                            workflows=workflows)
        return await self._write(lambda conn: self._took(_drive(plan, conn)))

    async def claim_run(self, run_id: str, *, now: float, mine: bool = False
                        ) -> RunRecord | None:
        plan = claim_one(_DIALECT, self._require_worker(), run_id, now=now, wall=self._wall(),
                         lease_until=self._lease_until(), mine=mine)
        claimed = await self._write(lambda conn: self._took(_drive(plan, conn)))
        return claimed[0] if claimed else None

    async def renew_leases(self) -> set[str]:
        if self.worker_id is None or not self._held:
            return set()
        worker, held, until = self.worker_id, dict(self._held), self._lease_until()
        ids = list(held)

        def op(conn: sqlite3.Connection) -> set[str]:
            rows = conn.execute(
                f"UPDATE runs SET lease_until = ? WHERE run_id IN ({', '.join('?' * len(ids))}) "
                "AND owner = ? AND status = 'RUNNING' RETURNING run_id, fence",
                (until, *ids, worker)).fetchall()
            return {r[0] for r in rows if held.get(r[0]) == r[1]}

        return self._renewed(held, await self._write(op))

    async def release_runs(self, run_ids: Sequence[str] | None) -> None:
        if self.worker_id is None or (run_ids is not None and not run_ids):
            return
        worker = self.worker_id
        only, params = release_filter(run_ids)
        await self._write(lambda conn: conn.execute(RELEASE_RUNS + only, (worker, *params)))
        for run_id in list(self._held) if run_ids is None else run_ids:
            self._held.pop(run_id, None)

    # -- plumbing ------------------------------------------------------------------

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(
                f"SQLite store {self.path}: not open; use `async with app:` first", path=self.path
            )
        return self._conn

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        try:
            return self._db.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise _store_error(exc, self.path, "read") from exc

    async def _write(self, op: Callable[[sqlite3.Connection], T], *,
                     step_rows: list[tuple[Any, ...]] | None = None) -> T:
        self._db  # noqa: B018  # raises a clear error when closed
        assert self._writer is not None
        result: T = await self._writer.submit(op, step_rows=step_rows)
        return result

    @property
    def stats(self) -> dict[str, int]:
        """Group-commit counters: transactions committed and writes they carried."""
        if self._writer is None:
            return {"batches": 0, "writes": 0}
        return {"batches": self._writer.batches, "writes": self._writer.writes}

    # -- runs ----------------------------------------------------------------------

    def _insert_run(self, conn: sqlite3.Connection, run: RunRecord) -> tuple[RunRecord, bool]:
        created = conn.execute(INSERT_RUN, run_values(run)).rowcount == 1
        row = conn.execute(SELECT_RUN, (run.run_id,)).fetchone()
        if row is None and run.dedup_id is not None:
            taken = conn.execute(SELECT_DEDUP, (run.queue, run.dedup_id)).fetchone()
            if taken is not None:
                raise dedup_conflict(run, taken[0])
        return run_from_row(row), created

    async def create_run(self, run: RunRecord) -> tuple[RunRecord, bool]:
        run = self._leased(run)
        stored, created = await self._write(lambda conn: self._insert_run(conn, run))
        self._created(run, created)
        return stored, created

    async def create_child_run(self, run: RunRecord, step: StepRecord) -> tuple[RunRecord, bool]:
        run = self._leased(run)

        def op(conn: sqlite3.Connection) -> tuple[RunRecord, bool]:
            self._fenced(step.run_id)
            stored, created = self._insert_run(conn, run)
            conflict = None if created else child_conflict(stored, run)
            if conflict is not None:
                raise conflict  # rolls back: no journal entry for a child we do not own
            conn.execute(UPSERT_STEP, step_values(step))
            return stored, created

        stored, created = await self._write(op)
        self._created(run, created)
        return stored, created

    async def create_run_with_journal(self, run: RunRecord, steps: Sequence[StepRecord]
                                      ) -> tuple[RunRecord, bool]:
        run = self._leased(run)
        rows = [step_values(step) for step in steps]

        def op(conn: sqlite3.Connection) -> tuple[RunRecord, bool]:
            stored, created = self._insert_run(conn, run)
            if created:
                conn.executemany(UPSERT_STEP, rows)
            return stored, created

        stored, created = await self._write(op)
        self._created(run, created)
        return stored, created

    async def get_run(self, run_id: str) -> RunRecord | None:
        rows = self._read(f"SELECT {RUN_COLUMNS} FROM runs WHERE run_id = ?", (run_id,))
        return run_from_row(rows[0]) if rows else None

    async def list_runs(
        self,
        *,
        statuses: Sequence[RunStatus] | None = None,
        workflow_name: str | None = None,
        parent_run_id: str | None = None,
        limit: int = 100,
    ) -> list[RunRecord]:
        clauses: list[str] = []
        params: list[Any] = []
        if statuses:
            clauses.append(f"status IN ({', '.join('?' * len(statuses))})")
            params.extend(s.value for s in statuses)
        if workflow_name is not None:
            clauses.append("workflow_name = ?")
            params.append(workflow_name)
        if parent_run_id is not None:
            clauses.append("parent_run_id = ?")
            params.append(parent_run_id)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self._read(
            f"SELECT {RUN_COLUMNS} FROM runs {where} ORDER BY created_at DESC, run_id DESC "
            "LIMIT ?",
            [*params, limit],
        )
        return [run_from_row(r) for r in rows]

    async def set_run_status(
        self, run_id: str, status: RunStatus, *, owner: str | None = None,
    ) -> None:
        now = time.time()

        def op(conn: sqlite3.Connection) -> None:
            self._fenced(run_id)
            conn.execute(
                "UPDATE runs SET status = ?, wake_at = NULL, owner = coalesce(?, owner), "
                f"updated_at = ? WHERE run_id = ? AND status NOT IN {TERMINAL_SQL}",
                (status.value, owner, now, run_id),
            )

        await self._write(op)

    async def park_run(self, run_id: str, wake_at: float | None, events: Sequence[str], *,
                       now: float | None = None) -> None:
        now = time.time() if now is None else now
        names = list(events)

        def op(conn: sqlite3.Connection) -> None:
            self._fenced(run_id)
            wake = wake_at
            if names:
                waiting = conn.execute(
                    "SELECT 1 FROM events WHERE run_id = ? AND consumed_position IS NULL "
                    f"AND name IN ({', '.join('?' * len(names))}) LIMIT 1",
                    (run_id, *names),
                ).fetchone()
                if waiting is not None:
                    wake = now  # an event arrived while the run was parking
            # A parked run is nobody's: whoever is alive wakes it.
            conn.execute(PARK_RUN, (wake, now, run_id))

        held = self._held.get(run_id)
        await self._write(op)
        self._let_go(run_id, held)

    async def finish_run(
        self, run_id: str, status: RunStatus, *, result: str | None, error: str | None,
        completed_at: float, notify: EventRecord | None = None, force: bool = False,
    ) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            if not force:
                self._fenced(run_id)
            ended = conn.execute(
                "UPDATE runs SET status = ?, result = ?, error = ?, completed_at = ?, "
                "updated_at = ?, wake_at = NULL, lease_until = NULL"
                + (", owner = NULL, fence = fence + 1" if force else "")
                + f" WHERE run_id = ? AND status NOT IN {TERMINAL_SQL} "
                "RETURNING parent_position",
                (status.value, result, error, completed_at, completed_at, run_id),
            ).fetchall()  # one row at most; fetched whole so the statement completes
            changed = bool(ended)
            if ended and notify is not None:
                recipients = _child_end_recipients(conn, notify.run_id, ended[0][0])
                for recipient in recipients:
                    _insert_event(conn, recipient, notify.name, notify.payload, notify.sent_at)
                # The worker wakes the parent itself; the forks it learns of from
                # changes() (a rollback leaves a harmless extra look).
                self._forks_told.update(recipients[1:])
                self._bound_notes()
            if changed and status is RunStatus.CANCELLED:
                conn.execute(CANCEL_CHILDREN, (completed_at, DUE_NOW, run_id)).fetchall()
            return changed

        held = self._held.get(run_id)
        changed = await self._write(op)
        self._let_go(run_id, held)
        return changed

    async def request_cancel(self, run_id: str, *, now: float | None = None) -> RunRecord:
        at = time.time() if now is None else now

        def op(conn: sqlite3.Connection) -> RunRecord:
            conn.execute(  # a parked run is woken so that its worker sees the request
                "UPDATE runs SET cancel_requested = 1, updated_at = ?, wake_at = CASE "
                f"WHEN status = 'WAITING' THEN {DUE_NOW} ELSE wake_at END "
                f"WHERE run_id = ? AND status NOT IN {TERMINAL_SQL}",
                (at, run_id),
            )
            row = conn.execute(
                f"SELECT {RUN_COLUMNS} FROM runs WHERE run_id = ?", (run_id,)
            ).fetchone()
            if row is None:
                raise RunNotFoundError(
                    f"no run {run_id!r} in {self.path}; check the id "
                    "(`garrison runs list` shows the runs)",
                    run_id=run_id,
                )
            return run_from_row(row)

        return await self._write(op)

    async def redrive_run(self, run_id: str, *, now: float,
                          forget: Sequence[str] = ()) -> RunRecord:
        def op(conn: sqlite3.Connection) -> RunRecord:
            row = conn.execute("SELECT status FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            refuse_redrive(run_id, row[0] if row else None, self.path)
            conn.execute(REDRIVE_FORGET_FAILED, (run_id,))
            conn.executemany(REDRIVE_FORGET_ENTRY, [(run_id, p) for p in forget])
            conn.execute(REDRIVE_FORGET_END, (f"garrison.child:{run_id}", run_id))
            conn.execute(REDRIVE_RUN, (now, run_id))
            return run_from_row(conn.execute(SELECT_RUN, (run_id,)).fetchone())

        return await self._write(op)

    async def counts(self, since: float) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        return ([tuple(r) for r in self._read(RUN_COUNTS, (since,))],
                [tuple(r) for r in self._read(STEP_COUNTS, (since,))])

    async def publish_breaker(self, name: str, state: str, open_for_s: float | None) -> None:
        open_until = self._wall() + open_for_s if open_for_s is not None else None
        row = (name, state, open_until, self._wall(), self.worker_id)
        event = (name, state, self._wall(), self.worker_id)

        def op(conn: sqlite3.Connection) -> None:
            conn.execute(UPSERT_BREAKER, row)
            conn.execute(INSERT_BREAKER_EVENT, event)

        await self._write(op)

    async def breaker_history(self, since: float) -> list[tuple[str, str, float]]:
        return [(r[0], r[1], float(r[2])) for r in self._read(BREAKER_HISTORY, (since,))]

    async def take_permit(self, name: str, permit_id: str, *, limit: int) -> bool:
        worker = self.worker_id or "client"
        now = self._wall()
        until = now + self.lease_ttl_s
        return await self._write(lambda conn: _drive(take_permit(
            name, permit_id=permit_id, worker=worker, limit=limit, now=now, until=until,
            lock=None), conn))

    async def release_permit(self, permit_id: str) -> None:
        await self._write(lambda conn: _drive(_one(
            "DELETE FROM permits WHERE id = ? RETURNING id", [permit_id]), conn))

    async def renew_permits(self) -> None:
        if self.worker_id is None:
            return
        params = [self._wall() + self.lease_ttl_s, self.worker_id]
        await self._write(lambda conn: _drive(_one(
            "UPDATE permits SET until = ? WHERE worker = ? RETURNING id", params), conn))

    async def give_tokens(self, name: str, *, amount: float, burst: float) -> float:
        now = self._wall()
        return await self._write(lambda conn: _drive(give_tokens(
            name, amount=amount, burst=burst, now=now, least="min"), conn))

    async def take_token(self, name: str, *, rate_per_s: float, burst: float,
                         cost: float = 1.0) -> float:
        now = self._wall()
        return await self._write(lambda conn: _drive(take_token(
            name, rate_per_s=rate_per_s, burst=burst, now=now, least="min", cost=cost), conn))

    async def breaker_states(self) -> dict[str, tuple[str, float | None]]:
        now = self._wall()
        return {r[0]: (r[1], r[2] - now if r[2] is not None else None)
                for r in self._read(SELECT_BREAKERS)}

    async def due_runs(self, now: float, *, limit: int = 1000,
                       workflows: Sequence[tuple[str, str]] | None = None) -> list[RunRecord]:
        only, params = workflow_filter(workflows)
        if only is None:
            return []
        rows = self._read(
            f"SELECT {RUN_COLUMNS} FROM runs WHERE status = 'WAITING' AND wake_at <= ? "
            f"{only}ORDER BY wake_at LIMIT ?",
            (now, *params, limit),
        )
        return [run_from_row(r) for r in rows]

    async def recoverable_runs(self, *, limit: int = 10_000,
                               workflows: Sequence[tuple[str, str]] | None = None
                               ) -> list[RunRecord]:
        only, params = workflow_filter(workflows)
        if only is None:
            return []
        rows = self._read(
            f"SELECT {RUN_COLUMNS} FROM runs WHERE status IN ('PENDING', 'RUNNING') "
            f"{only}ORDER BY created_at LIMIT ?",
            (*params, limit),
        )
        return [run_from_row(r) for r in rows]

    async def changes(self) -> Changes:
        """Another process wrote (`garrison runs send`, a client app): look at everything.
        Streams appended to through this store object are named (`streams`), and so are
        forks told of a reused child's end (`events`)."""
        version = int(self._read("PRAGMA data_version")[0][0])
        changed = version != self._data_version
        self._data_version = version
        grown, self._streams_grown = self._streams_grown, set()
        forks, self._forks_told = self._forks_told, set()
        overflowed, self._overflowed = self._overflowed, False
        return Changes(everything=changed or overflowed, streams=grown, events=forks)

    def _bound_notes(self) -> None:
        if len(self._streams_grown) + len(self._forks_told) > _MAX_NOTES:
            self._streams_grown.clear()
            self._forks_told.clear()
            self._overflowed = True

    # -- journal -------------------------------------------------------------------

    async def load_journal(self, run_id: str) -> list[StepRecord]:
        rows = self._read(f"SELECT {STEP_COLUMNS} FROM steps WHERE run_id = ?", (run_id,))
        return [step_from_row(r) for r in rows]

    async def append_steps(self, steps: Sequence[StepRecord]) -> None:
        rows = [step_values(step) for step in steps]
        for run_id in {step.run_id for step in steps}:
            self._fenced(run_id)  # at submit: only this process can change the book

        def op(conn: sqlite3.Connection) -> None:
            conn.executemany(UPSERT_STEP, rows)

        await self._write(op, step_rows=rows)

    # -- streams -------------------------------------------------------------------

    async def append_stream(self, run_id: str, events: Sequence[tuple[str, str, str]], *,
                            at: float) -> list[int | None]:
        rows = [(run_id, run_id, key, kind, data, at) for key, kind, data in events]

        def op(conn: sqlite3.Connection) -> list[int | None]:
            self._fenced(run_id)  # in the batch: a lease dropped meanwhile is seen
            offsets: list[int | None] = []
            for row in rows:
                written = conn.execute(INSERT_STREAM, row).fetchall()
                offsets.append(int(written[0][0]) if written else None)
            return offsets

        if not rows:
            return []
        offsets = await self._write(op)
        if any(offset is not None for offset in offsets):
            self._streams_grown.add(run_id)
            self._bound_notes()
        return offsets

    async def read_stream(self, run_id: str, *, after: int = 0, limit: int = 1000,
                          key_prefix: str | None = None) -> list[StreamRecord]:
        sql, params = read_stream_query(run_id, after, limit, key_prefix)
        return [stream_from_row(r) for r in self._read(sql, params)]

    # -- mailbox -------------------------------------------------------------------

    async def send_event(self, run_id: str, name: str, payload: str, sent_at: float) -> int:
        def op(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT status FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            refuse_event(run_id, name, row[0] if row else None, self.path)
            return _insert_event(conn, run_id, name, payload, sent_at)

        return await self._write(op)

    async def consume_event(self, run_id: str, name: str, step: StepRecord) -> StepRecord | None:
        def op(conn: sqlite3.Connection) -> StepRecord | None:
            self._fenced(run_id)
            row = conn.execute(
                "SELECT seq, payload FROM events WHERE run_id = ? AND name = ? "
                "AND consumed_position IS NULL ORDER BY seq LIMIT 1",
                (run_id, name),
            ).fetchone()
            if row is None:
                return None
            conn.execute(
                "UPDATE events SET consumed_position = ? WHERE seq = ?", (step.position, row[0])
            )
            done = StepRecord(
                run_id=step.run_id, position=step.position, kind=step.kind, name=step.name,
                status=StepStatus.COMPLETED, started_at=step.started_at, arity=step.arity,
                inputs=step.inputs, output=row[1], completed_at=step.completed_at,
                fire_at=step.fire_at, worker=step.worker, tenant_id=step.tenant_id,
            )
            conn.execute(UPSERT_STEP, step_values(done))
            return done

        return await self._write(op)

    async def list_events(self, run_id: str) -> list[EventRecord]:
        """A run's mailbox, consumed and not, in send order (for inspection)."""
        rows = self._read(
            LIST_EVENTS, (run_id,),
        )
        return [EventRecord(*r) for r in rows]


def _child_end_recipients(conn: sqlite3.Connection, parent_run_id: str,
                          position: str | None) -> list[str]:
    """Who is told of the end of the child started at `position`: its parent, and the
    unfinished forks reusing that start."""
    at = top_position(position)
    forks = conn.execute(FORKS_REUSING, (parent_run_id, at, at)).fetchall()
    return [parent_run_id, *(fork for (fork,) in forks)]


def _insert_event(
    conn: sqlite3.Connection, run_id: str, name: str, payload: str, sent_at: float
) -> int:
    cursor = conn.execute(
        "INSERT INTO events (run_id, name, payload, sent_at) VALUES (?, ?, ?, ?)",
        (run_id, name, payload, sent_at),
    )
    conn.execute("UPDATE runs SET wake_at = ? WHERE run_id = ? AND status = 'WAITING'",
                 (DUE_NOW, run_id))
    return int(cursor.lastrowid or 0)
