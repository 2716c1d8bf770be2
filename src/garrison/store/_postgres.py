"""The PostgreSQL store: psycopg 3 (async) with a pool, group commit, LISTEN for changes.

Any number of worker processes share one schema. A worker owns a run while its lease is
live (claims: `_claims`); every write a worker makes about a run checks, in the same
transaction and under the run's row lock, that the run's owner and fence are still the
ones it claimed with (`_fenced`), so a worker whose lease was taken over cannot commit
anything for that run any more. Lease times are on the database server's clock (an
offset measured at open), so hosts whose clocks disagree still agree on expiry.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import re
import time
from collections.abc import Awaitable, Callable, Generator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from garrison._log import get_logger
from garrison.errors import (
    ConfigurationError,
    LeaseLostError,
    RunNotFoundError,
    SchemaVersionError,
    StoreError,
    WorkflowError,
)
from garrison.store._buckets import give_tokens, take_permit, take_token
from garrison.store._buckets import one_statement as _one
from garrison.store._claims import Dialect, Plan, claim_due, claim_one, claim_queued
from garrison.store._leases import LeaseBook
from garrison.store._protocol import Changes, safe_url
from garrison.store._records import (
    EventRecord,
    QueueLimits,
    RunRecord,
    RunStatus,
    StepKind,
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
    STEP_CONFLICT,
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

if TYPE_CHECKING:
    import psycopg
    import psycopg_pool

__all__ = ["PostgresStore", "parse_postgres_url"]

log = get_logger(__name__)

MIGRATIONS = migrations("postgres")

T = TypeVar("T")
_Op = Callable[["psycopg.AsyncConnection[Any]"], Awaitable[Any]]
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def _sql(statement: str) -> str:
    """The shared `?`-placeholder statements, in psycopg's `%s` style."""
    return statement.replace("?", "%s")


_INSERT_RUN = _sql(INSERT_RUN)
_UPSERT_STEP = _sql(UPSERT_STEP)
_CANCEL_CHILDREN = _sql(CANCEL_CHILDREN)
_FORKS_REUSING = _sql(FORKS_REUSING)
_SELECT_RUN = _sql(SELECT_RUN)
_INSERT_RUN_RETURNING = f"{_INSERT_RUN} RETURNING {RUN_COLUMNS}"
_INSERT_STREAM = _sql(INSERT_STREAM)
# A new queued run and its queue's notification, one statement (the notification is
# sent only if the row was inserted, at commit).
_INSERT_RUN_NOTIFYING = (
    f"WITH inserted AS ({_INSERT_RUN_RETURNING}) SELECT inserted.*, "
    "pg_notify(%s, %s) FROM inserted"
)
_RUN_WIDTH = len(RUN_COLUMNS.split(","))
# The fence check and one journal row in one statement (see `_append_one`).
_STEP_TYPES = ("text", "text", "text", "text", "text", "float8", "int", "text", "text",
               "text", "float8", "float8", "int", "text", "text")
_FENCED_UPSERT_STEP = (
    "WITH held AS (SELECT run_id FROM runs WHERE run_id = %s AND owner = %s AND fence = %s "
    f"FOR UPDATE), written AS (INSERT INTO steps ({STEP_COLUMNS}) SELECT "
    + ", ".join(f"%s::{t}" for t in _STEP_TYPES)
    + f" FROM held {STEP_CONFLICT} RETURNING 1) SELECT count(*) FROM held"
)
_INSERT_STEPS = (  # many journal rows in one statement: one array per column
    f"INSERT INTO steps ({STEP_COLUMNS}) SELECT * FROM unnest("
    + ", ".join(f"%s::{t}[]" for t in _STEP_TYPES) + f") {STEP_CONFLICT}"
)
_DIALECT = Dialect(skip_locked=" FOR UPDATE SKIP LOCKED",
                   queue_lock="SELECT pg_advisory_xact_lock(hashtext(?))",
                   row_lock=" FOR UPDATE")
# How long the server lets a session of ours sit idle inside a transaction (ms); our
# transactions never wait on anything but the database.
_IDLE_IN_TX_MS = 10_000
# Without a LISTEN connection, `changes()` says "everything" at most this often.
_BLIND_LOOK_S = 1.0
# How long a LISTEN connection that dropped waits before connecting again (doubling).
_RELISTEN_S = (0.2, 5.0)


async def _drive(plan: Generator[tuple[str, Any], list[Any], T], conn: Any) -> T:
    """Run a sans-I/O plan (`_claims`, `_buckets`) on `conn`."""
    try:
        sql, params = next(plan)
        while True:
            cursor = await conn.execute(_sql(sql), params)
            sql, params = plan.send(await cursor.fetchall())
    except StopIteration as stop:
        outcome: T = stop.value
        return outcome


def parse_postgres_url(url: str) -> tuple[str, str, int]:
    """Split a `postgresql://...?schema=garrison&pool_size=10` URL.

    Returns (the libpq URL without Garrison's options, the schema, the pool size).
    """
    parts = urlsplit(url)
    if parts.scheme not in {"postgresql", "postgres"}:
        raise ConfigurationError(
            f"store URL {safe_url(url)!r}: expected 'postgresql://user@host/db'")
    if not parts.path.strip("/"):
        raise ConfigurationError(
            f"store URL {safe_url(url)!r}: no database name; write e.g. "
            "'postgresql://postgres@127.0.0.1:5432/garrison'",
            url=safe_url(url),
        )
    query = dict(parse_qsl(parts.query))
    schema = query.pop("schema", "garrison")
    if not _SCHEMA_NAME.match(schema):
        raise ConfigurationError(
            f"store URL {safe_url(url)!r}: schema={schema!r} must be a lower-case SQL identifier "
            "(letters, digits, underscore)",
            url=safe_url(url),
        )
    pool = query.pop("pool_size", "10")
    if not pool.isdigit() or int(pool) < 2:
        raise ConfigurationError(
            f"store URL {safe_url(url)!r}: pool_size={pool!r} must be a whole number >= 2",
            url=safe_url(url),
        )
    libpq = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), ""))
    return libpq, schema, int(pool)


def _import_psycopg() -> tuple[Any, Any]:
    try:
        import psycopg
        import psycopg_pool
    except ImportError as exc:
        raise ConfigurationError(
            "the PostgreSQL store needs psycopg: pip install 'garrison[postgres]'"
        ) from exc
    return psycopg, psycopg_pool


def _connect_error(exc: Exception, url: str) -> ConfigurationError | StoreError:
    text = " ".join(str(exc).split())  # libpq's messages span lines
    safe = safe_url(url)  # never echo a password
    if "does not exist" in text and "database" in text:
        hint = "create it (createdb NAME) or fix the database name in the URL"
        return ConfigurationError(f"PostgreSQL store {safe}: {text}; {hint}", url=safe)
    if "password authentication failed" in text or ("role" in text and "does not exist" in text):
        return ConfigurationError(
            f"PostgreSQL store {safe}: {text}; check the user and password in the URL", url=safe
        )
    if "Connection refused" in text or "could not connect" in text or "timeout" in text:
        return StoreError(
            f"PostgreSQL store {safe}: cannot connect ({text}); is PostgreSQL running and "
            "reachable at that host and port?",
            url=safe,
        )
    return StoreError(f"PostgreSQL store {safe}: {text}", url=safe)


class _GroupCommit:
    """Writes queued while a transaction is in flight share the next transaction.

    One flusher task at a time: while it commits a batch, new writes queue; it then
    commits them all together. Each write runs in its own savepoint when the batch holds
    several, so a rejected write fails only its caller.
    """

    def __init__(self, store: PostgresStore) -> None:
        self._store = store
        self._ops: list[tuple[_Op, asyncio.Future[Any]]] = []
        self._single: set[asyncio.Future[Any]] = set()  # ops that are one statement
        self._claims: set[asyncio.Future[Any]] = set()  # claims: first in their batch
        # append_steps calls: the runs they write for (with the fence each was claimed
        # at, None for a client) and their rows, written together when a batch has several
        self._steps: dict[asyncio.Future[Any], tuple[dict[str, int | None], list[Any]]] = {}
        self._flusher: asyncio.Task[None] | None = None
        self.batches = 0
        self.writes = 0
        self.retried = 0  # batches done again write by write after a refused write

    def submit(self, op: _Op, *, single_statement: bool = False, claim: bool = False,
               steps: tuple[dict[str, int | None], list[Any]] | None = None
               ) -> asyncio.Future[Any]:
        """Queue `op`. A `single_statement` op is atomic by itself: alone in its batch,
        it runs in autocommit (one round trip, no BEGIN and COMMIT). `steps` marks an
        append_steps call, whose rows may share one statement with the batch's others."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._ops.append((op, future))
        if single_statement:
            self._single.add(future)
            future.add_done_callback(self._single.discard)
        if claim:
            self._claims.add(future)
            future.add_done_callback(self._claims.discard)
        if steps is not None:
            self._steps[future] = steps
            future.add_done_callback(self._forget_steps)
        if self._flusher is None or self._flusher.done():
            # An empty context: this task is the store's, never a branch of the workflow
            # whose write happened to start it (see engine decision 0004).
            self._flusher = loop.create_task(self._flush_all(), context=contextvars.Context())
        return future

    async def drain(self) -> None:
        """Wait for queued writes. Cancelling the caller does not cancel the flusher."""
        flusher = self._flusher
        if flusher is not None and not flusher.done():
            # shield: a cancelled closer propagates its CancelledError, while the flusher
            # goes on and answers every caller queued behind it.
            with contextlib.suppress(Exception):
                await asyncio.shield(flusher)

    async def _flush_all(self) -> None:
        try:
            while self._ops:
                ops = [(op, f) for op, f in self._ops if not f.cancelled()]
                self._ops = []
                if ops:
                    await self._flush(ops)
        finally:
            # Never leave a caller waiting on a flusher that is gone.
            stranded, self._ops = self._ops, []
            for _, future in stranded:
                if not future.done():
                    future.set_exception(StoreError(
                        "PostgreSQL store: the writer stopped before this write; nothing "
                        "of it was kept", url=self._store.safe_url))

    async def _flush(self, ops: list[tuple[_Op, asyncio.Future[Any]]]) -> None:
        psycopg = self._store._psycopg
        rejected = (psycopg.errors.IntegrityError, psycopg.errors.DataError,
                    WorkflowError, RunNotFoundError, LeaseLostError)
        outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        try:
            if len(ops) == 1 and ops[0][1] in self._single:
                op, future = ops[0]
                async with self._store._pool.connection() as conn:  # autocommit: atomic
                    outcomes.append((future, await op(conn), None))
            else:
                await self._transaction(ops, outcomes, rejected)
        except rejected as exc:
            if len(ops) != 1:
                raise  # cannot tell whose write it was: the whole batch failed (below)
            outcomes = [(ops[0][1], None, self._rejected(exc))]  # the lone write, rolled back
        except Exception as exc:
            error = exc if isinstance(exc, StoreError) else StoreError(
                f"PostgreSQL store: commit failed: {exc}; the batch was rolled back whole",
                url=self._store.safe_url,
            )
            log.error("store.commit_failed", writes=len(ops), error=str(exc))
            for _, future in ops:
                if not future.done():
                    future.set_exception(error)
            return
        except BaseException:
            # The flusher itself was cancelled (store closing): its callers were not.
            for _, future in ops:
                if not future.done():
                    future.set_exception(StoreError(
                        "PostgreSQL store: the writer was stopped mid-batch; the batch was "
                        "rolled back", url=self._store.safe_url))
            raise
        self.batches += 1
        self.writes += len(ops)
        for future, outcome, error_ in outcomes:
            if future.done():
                continue
            if error_ is not None:
                future.set_exception(error_)
            else:
                future.set_result(outcome)

    def _forget_steps(self, future: asyncio.Future[Any]) -> None:
        self._steps.pop(future, None)

    async def _write_steps_together(self, conn: Any, ops: list[tuple[_Op, asyncio.Future[Any]]]
                                    ) -> dict[asyncio.Future[Any], BaseException | None]:
        """Every append_steps of the batch in two statements: one fence check locking all
        their runs (in run id order: no deadlocks), one insert of all their rows. Returns
        the outcome per call served; {} when it could not (each then goes on its own)."""
        writes = {f: self._steps[f] for _, f in ops if f in self._steps and not f.cancelled()}
        if len(writes) < 2:
            return {}
        store = self._store
        fences: dict[str, int | None] = {}
        for runs, _ in writes.values():
            fences.update(runs)
        try:
            async with conn.transaction():  # a savepoint: undone whole if anything is off
                held = set(fences)
                if store.worker_id is not None:
                    rows = await (await conn.execute(
                        "SELECT run_id, owner, fence FROM runs WHERE run_id = ANY(%s) "
                        "ORDER BY run_id FOR UPDATE", (sorted(fences),))).fetchall()
                    held = {r[0] for r in rows
                            if r[1] == store.worker_id and r[2] == fences[r[0]]}
                served: dict[asyncio.Future[Any], BaseException | None] = {}
                good: list[Any] = []
                for future, (runs, step_rows) in writes.items():
                    lost = sorted(set(runs) - held)
                    if lost:
                        served[future] = store._lost(lost[0], "taken over")
                    else:
                        served[future] = None
                        good += step_rows
                if good:
                    await conn.execute(_INSERT_STEPS, [list(c) for c in zip(*good, strict=True)])
                return served
        except store._psycopg.Error as exc:
            log.debug("store.steps_together_fallback", error=str(exc))
            return {}

    async def _transaction(self, ops: list[tuple[_Op, asyncio.Future[Any]]],
                           outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]],
                           rejected: tuple[type[BaseException], ...]) -> None:
        """One transaction for the batch. Optimistic first: no savepoints (two round
        trips fewer per write); if any write is refused, the batch is rolled back and
        done again with a savepoint per write, so that the refused one fails alone.

        Claims go first: a claim may take a queue's lock and must not wait for it while
        this transaction holds row locks that the lock's holder waits for (deadlock).
        """
        ops = sorted(ops, key=lambda o: o[1] not in self._claims)  # stable: claims first
        if len(ops) > 1:
            tried: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
            try:
                async with self._store._pool.connection() as conn, conn.transaction():
                    await self._run_ops(conn, ops, tried, None)
            except rejected:
                self.retried += 1
            else:
                outcomes.extend(tried)
                return
        async with self._store._pool.connection() as conn, conn.transaction():
            if len(ops) == 1:  # a lone write needs no savepoint: the tx is its own
                op, future = ops[0]
                outcomes.append((future, await op(conn), None))
                return
            await self._run_ops(conn, ops, outcomes, rejected)

    async def _run_ops(self, conn: Any, ops: list[tuple[_Op, asyncio.Future[Any]]],
                       outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]],
                       isolate: tuple[type[BaseException], ...] | None) -> None:
        """Claims, then every journal row together, then the other writes; with a
        savepoint each when `isolate` names the errors that fail one write alone."""
        served: dict[asyncio.Future[Any], BaseException | None] | None = None
        for op, future in ops:
            if served is None and future not in self._claims:
                served = await self._write_steps_together(conn, ops)
            if future.cancelled() and isolate is not None:
                continue  # its caller is gone (run closing, shutdown)
            if served is not None and future in served:
                outcomes.append((future, None, served[future]))
                continue
            if isolate is None:
                outcomes.append((future, await op(conn), None))
                continue
            try:
                async with conn.transaction():  # a savepoint per write
                    outcome = await op(conn)
            except isolate as exc:
                outcomes.append((future, None, self._rejected(exc)))
            else:
                outcomes.append((future, outcome, None))

    def _rejected(self, exc: BaseException) -> BaseException:
        if isinstance(exc, WorkflowError | RunNotFoundError | LeaseLostError):
            return exc
        error = StoreError(f"PostgreSQL store: write rejected: {exc}; nothing of this write "
                           "was kept", url=self._store.safe_url)
        error.__cause__ = exc
        return error


class PostgresStore(LeaseBook):
    fleet = True  # any number of workers: fleet-wide limits live here

    """Runs, journals and mailboxes in PostgreSQL (one schema per application)."""

    def __init__(self, url: str, *, create: bool = True) -> None:
        self.url = url
        self._create = create  # False: a schema without Garrison's tables is an error
        self._libpq, self.schema, self._pool_size = parse_postgres_url(url)
        self.channel = f"garrison_{self.schema}"[:63]  # one LISTEN channel per schema
        self.safe_url = safe_url(url)
        self._psycopg: Any = None
        self._pool: psycopg_pool.AsyncConnectionPool[Any] = None  # type: ignore[assignment]
        self._writer: _GroupCommit | None = None
        self._listen_conn: Any = None
        self._listener: asyncio.Task[None] | None = None
        self._changes = Changes(everything=True)
        self._wakeup: Callable[[], None] | None = None
        self._blind_look = 0.0
        self._clock_offset = 0.0
        self._init_leases()

    # -- lifecycle -----------------------------------------------------------------

    def _options(self) -> str:
        # A worker paused in the middle of a transaction (SIGSTOP, a VM freeze) would
        # hold its row and queue locks, and every other worker would wait on them: the
        # server ends such a session after a while, releasing them (fencing then refuses
        # whatever the paused worker tries when it wakes).
        return (f"-c search_path={self.schema} "
                f"-c idle_in_transaction_session_timeout={_IDLE_IN_TX_MS}")

    async def _connect(self, *, autocommit: bool = True) -> Any:
        try:
            return await self._psycopg.AsyncConnection.connect(
                self._libpq, autocommit=autocommit, connect_timeout=10, options=self._options()
            )
        except self._psycopg.Error as exc:
            raise _connect_error(exc, self._libpq) from exc

    async def open(self) -> None:
        if self._pool is not None:
            return
        self._psycopg, psycopg_pool = _import_psycopg()
        conn = await self._connect(autocommit=False)
        try:
            await self._migrate(conn)
            before = time.time()
            row = await (await conn.execute(
                "SELECT extract(epoch FROM clock_timestamp())::float8")).fetchone()
            self._clock_offset = float(row[0]) - (before + time.time()) / 2
            await conn.rollback()
        finally:
            await conn.close()
        pool = psycopg_pool.AsyncConnectionPool(
            self._libpq, min_size=1, max_size=self._pool_size, open=False,
            kwargs={"autocommit": True, "options": self._options()},
        )
        listen_conn = None
        try:
            await pool.open(wait=True, timeout=10)
            listen_conn = await self._connect()
            await listen_conn.execute(f"LISTEN {self.channel}")
        except BaseException as exc:
            # Half-open is not open: release what was opened, so a retry starts clean.
            with contextlib.suppress(Exception):
                await pool.close()
            if listen_conn is not None:
                with contextlib.suppress(Exception):
                    await listen_conn.close()
            if isinstance(exc, psycopg_pool.PoolTimeout):
                raise StoreError(f"PostgreSQL store {self.safe_url}: no connection within "
                                 f"10 s ({exc})", url=self.safe_url) from exc
            raise
        self._pool = pool
        self._writer = _GroupCommit(self)
        self._listen_conn = listen_conn
        self._listener = asyncio.get_running_loop().create_task(
            self._listen(), context=contextvars.Context()
        )

    async def _migrate(self, conn: Any) -> None:
        psycopg = self._psycopg
        try:
            async with conn.transaction():
                # Many workers may start at once: one migrates, the others wait here.
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext('garrison-migrate'))")
                cursor = await conn.execute(
                    "SELECT 1 FROM information_schema.tables WHERE table_schema = %s "
                    "AND table_name = 'garrison_meta'", (self.schema,))
                exists = await cursor.fetchone() is not None
                if not exists and not self._create:
                    raise ConfigurationError(
                        f"PostgreSQL store {self.safe_url}: schema {self.schema!r} holds no "
                        "Garrison tables; check the URL's ?schema= (the default is "
                        "'garrison') or start a worker on it first", url=self.safe_url,
                        schema=self.schema)
                await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {self.schema}")
                found = 0
                if exists:
                    row = await (await conn.execute(
                        "SELECT value FROM garrison_meta WHERE key = 'schema_version'"
                    )).fetchone()
                    found = int(row[0]) if row else 0
                if found > SCHEMA_VERSION:
                    raise SchemaVersionError(
                        f"PostgreSQL store {self.safe_url} schema {self.schema}: version {found} "
                        f"was written by a newer Garrison (this one knows {SCHEMA_VERSION}); "
                        "upgrade Garrison",
                        found=found, supported=SCHEMA_VERSION,
                    )
                for version in range(found + 1, SCHEMA_VERSION + 1):
                    await conn.execute(MIGRATIONS[version])
                await conn.execute(
                    "INSERT INTO garrison_meta (key, value) VALUES ('schema_version', %s) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (str(max(found, SCHEMA_VERSION)),),
                )
        except psycopg.Error as exc:
            raise StoreError(f"PostgreSQL store {self.safe_url}: migration failed: {exc}",
                             url=self.safe_url) from exc

    async def _listen(self) -> None:
        """Collect notifications; when the connection drops (a database restart), poll
        until a new LISTEN connection is up, connecting again with a doubling backoff."""
        delay = _RELISTEN_S[0]
        while True:
            try:
                if self._listen_conn is None:
                    conn = await self._connect()
                    await conn.execute(f"LISTEN {self.channel}")
                    self._listen_conn = conn
                    self._changes.everything = True  # what was missed while away
                    delay = _RELISTEN_S[0]
                async for note in self._listen_conn.notifies():
                    self._changes.add(note.payload)
                    if self._wakeup is not None:
                        self._wakeup()
            except (self._psycopg.Error, StoreError) as exc:
                if self._listen_conn is not None:
                    log.warning("store.listen_lost", error=str(exc))
                    with contextlib.suppress(Exception):
                        await self._listen_conn.close()
                self._listen_conn = None
                self._changes.everything = True
                await asyncio.sleep(delay)
                delay = min(_RELISTEN_S[1], delay * 2)

    async def close(self) -> None:
        if self._writer is not None:
            await self._writer.drain()
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(BaseException):
                await self._listener
            self._listener = None
        if self._listen_conn is not None:
            with contextlib.suppress(Exception):
                await self._listen_conn.close()
        self._listen_conn = None
        if self._pool is not None:
            await self._pool.close()
            self._pool = None  # type: ignore[assignment]
            self._writer = None

    # -- plumbing ------------------------------------------------------------------

    async def _fenced(self, conn: Any, run_id: str) -> Callable[[], Awaitable[None]]:
        """In a worker's write transaction: does this worker still hold `run_id`?

        Locks the run's row, so a claim by another worker waits for this transaction
        and then loads a journal that includes its write, or this check sees the claim.
        Returns the check itself, to await before the op ends (so the op's statements
        can be sent before its answer is read); a failed check rolls back the op's
        whole savepoint.
        """
        if self.worker_id is None:
            return _no_check  # a client (no worker here): it never writes a journal
        fence = self._held.get(run_id)
        if fence is None:
            raise self._lost(run_id, "not held")
        cursor = await conn.execute(
            "SELECT owner, fence FROM runs WHERE run_id = %s FOR UPDATE", (run_id,))

        async def verify() -> None:
            row = await cursor.fetchone()
            if row is None or row[0] != self.worker_id or row[1] != fence:
                raise self._lost(run_id, f"now {row[0] or 'nobody'}'s at fence {row[1]}"
                                 if row else "gone")

        return verify

    def _require_open(self) -> None:
        if self._pool is None:
            raise StoreError(f"PostgreSQL store {self.safe_url}: not open; use "
                             "`async with app:` first", url=self.safe_url)

    async def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        self._require_open()
        # The pool may create tasks while it waits for a connection; run in an empty
        # context so that a read made from workflow code never looks like a fan-out.
        task = asyncio.get_running_loop().create_task(
            self._fetch(sql, params), context=contextvars.Context()
        )
        return await task

    async def _fetch(self, sql: str, params: Sequence[Any]) -> list[Any]:
        try:
            async with self._pool.connection() as conn:
                cursor = await conn.execute(sql, params)
                rows: list[Any] = await cursor.fetchall()
                return rows
        except self._psycopg.Error as exc:
            raise StoreError(f"PostgreSQL store {self.safe_url}: read failed: {exc}",
                             url=self.safe_url) from exc

    async def _write(self, op: Callable[[Any], Awaitable[T]]) -> T:
        self._require_open()
        assert self._writer is not None
        result: T = await self._writer.submit(op)
        return result

    # -- leases --------------------------------------------------------------------

    async def claim_due(self, *, now: float, queues: Sequence[str] | None,
                        workflows: Sequence[tuple[str, str]] | None,
                        limit: int) -> list[RunRecord]:
        worker = self._require_worker()
        wall = self._wall()
        until = self._lease_until()
        return await self._claim(lambda: claim_due(
            _DIALECT, worker, now=now, wall=wall, lease_until=until,
            queues=queues, workflows=workflows, limit=limit))

    async def _claim(self, plan: Callable[[], Plan]) -> list[RunRecord]:
        """Run a claim in the group commit, first in its batch. What it took is booked
        inside the write, so that a caller cancelled meanwhile (a worker stopping) does
        not leave runs claimed in the database but unknown here (never handed back)."""
        self._require_open()
        assert self._writer is not None
        tries: list[list[RunRecord]] = []

        async def op(conn: Any) -> list[RunRecord]:
            taken = self._took(await _drive(plan(), conn))
            tries.append(taken)
            return taken

        final: list[RunRecord] = await self._writer.submit(op, claim=True)
        kept = {r.run_id for r in final}
        for earlier in tries[:-1]:  # a batch done again: its first claims were undone
            for run in earlier:
                if run.run_id not in kept and self._held.get(run.run_id) == run.fence:
                    del self._held[run.run_id]
        return final

    async def claim_queued(self, limits: QueueLimits, slots: int, *,
                           workflows: Sequence[tuple[str, str]] | None) -> list[RunRecord]:
        worker = self._require_worker()
        wall = self._wall()
        until = self._lease_until()
        return await self._claim(lambda: claim_queued(
            _DIALECT, worker, limits, slots, wall=wall, lease_until=until,
            lock_key=f"garrison-queue:{self.schema}:{limits.name}",
            workflows=workflows))

    async def claim_run(self, run_id: str, *, now: float, mine: bool = False
                        ) -> RunRecord | None:
        worker = self._require_worker()
        wall = self._wall()
        until = self._lease_until()
        claimed = await self._claim(lambda: claim_one(
            _DIALECT, worker, run_id, now=now, wall=wall, lease_until=until, mine=mine))
        return claimed[0] if claimed else None

    async def renew_leases(self) -> set[str]:
        if self.worker_id is None or not self._held:
            return set()
        worker, held = self.worker_id, dict(self._held)
        until = self._lease_until()

        async def op(conn: Any) -> set[str]:
            cursor = await conn.execute(
                "UPDATE runs SET lease_until = %s WHERE run_id = ANY(%s) AND owner = %s "
                "AND status = 'RUNNING' RETURNING run_id, fence",
                (until, list(held), worker))
            return {r[0] for r in await cursor.fetchall() if held.get(r[0]) == r[1]}

        return self._renewed(held, await self._write(op))

    async def release_runs(self, run_ids: Sequence[str] | None) -> None:
        if self.worker_id is None or (run_ids is not None and not run_ids):
            return
        worker = self.worker_id
        only, params = release_filter(run_ids)

        async def op(conn: Any) -> None:
            await conn.execute(_sql(RELEASE_RUNS + only), (worker, *params))
            await _notify(conn, self.channel, "w")

        await self._write(op)
        for run_id in list(self._held) if run_ids is None else run_ids:
            self._held.pop(run_id, None)

    @property
    def stats(self) -> dict[str, int]:
        """Group-commit counters: transactions committed and writes they carried."""
        if self._writer is None:
            return {"batches": 0, "writes": 0}
        return {"batches": self._writer.batches, "writes": self._writer.writes}

    # -- runs ----------------------------------------------------------------------

    async def _insert_run(self, conn: Any, run: RunRecord) -> tuple[RunRecord, bool]:
        """Insert `run` (and, for a queued one, notify its queue) in one statement, so that
        alone in its batch it commits in one round trip."""
        if run.status is RunStatus.PENDING:
            row = await (await conn.execute(
                _INSERT_RUN_NOTIFYING, (*run_values(run), self.channel, f"q:{run.queue}")
            )).fetchone()
        else:
            row = await (await conn.execute(_INSERT_RUN_RETURNING, run_values(run))).fetchone()
        created = row is not None
        if not created:
            row = await (await conn.execute(_SELECT_RUN, (run.run_id,))).fetchone()
        if row is None and run.dedup_id is not None:
            taken = await (await conn.execute(
                _sql(SELECT_DEDUP), (run.queue, run.dedup_id))).fetchone()
            if taken is not None:
                raise dedup_conflict(run, taken[0])
        return run_from_row(row[:_RUN_WIDTH]), created

    async def create_run(self, run: RunRecord) -> tuple[RunRecord, bool]:
        run = self._leased(run)
        self._require_open()
        assert self._writer is not None
        stored, created = await self._writer.submit(lambda conn: self._insert_run(conn, run),
                                                    single_statement=True)
        self._created(run, created)
        return stored, created

    async def create_child_run(self, run: RunRecord, step: StepRecord) -> tuple[RunRecord, bool]:
        run = self._leased(run)

        async def op(conn: Any) -> tuple[RunRecord, bool]:
            verify = await self._fenced(conn, step.run_id)
            stored, created = await self._insert_run(conn, run)
            conflict = None if created else child_conflict(stored, run)
            if conflict is not None:
                raise conflict  # rolls back: no journal entry for a child we do not own
            await conn.execute(_UPSERT_STEP, step_values(step))
            await verify()
            return stored, created

        stored, created = await self._write(op)
        self._created(run, created)
        return stored, created

    async def create_run_with_journal(self, run: RunRecord, steps: Sequence[StepRecord]
                                      ) -> tuple[RunRecord, bool]:
        run = self._leased(run)
        rows = [step_values(step) for step in steps]
        children = sorted(json.loads(step.output) for step in steps
                          if step.kind is StepKind.CHILD and step.output is not None)

        async def op(conn: Any) -> tuple[RunRecord, bool]:
            if children:  # a reused child ending now waits for this fork, then tells it
                await conn.execute("SELECT 1 FROM runs WHERE run_id = ANY(%s) FOR SHARE",
                                   (children,))
            stored, created = await self._insert_run(conn, run)
            if created and rows:
                async with conn.cursor() as cursor:
                    await cursor.executemany(_UPSERT_STEP, rows)
            return stored, created

        stored, created = await self._write(op)
        self._created(run, created)
        return stored, created

    async def get_run(self, run_id: str) -> RunRecord | None:
        rows = await self._read(_SELECT_RUN, (run_id,))
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
            clauses.append("status = ANY(%s)")
            params.append([s.value for s in statuses])
        if workflow_name is not None:
            clauses.append("workflow_name = %s")
            params.append(workflow_name)
        if parent_run_id is not None:
            clauses.append("parent_run_id = %s")
            params.append(parent_run_id)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = await self._read(
            f"SELECT {RUN_COLUMNS} FROM runs {where} ORDER BY created_at DESC, run_id DESC "
            "LIMIT %s",
            [*params, limit],
        )
        return [run_from_row(r) for r in rows]

    async def set_run_status(
        self, run_id: str, status: RunStatus, *, owner: str | None = None,
    ) -> None:
        now = time.time()

        async def op(conn: Any) -> None:
            verify = await self._fenced(conn, run_id)
            await conn.execute(
                "UPDATE runs SET status = %s, wake_at = NULL, owner = coalesce(%s, owner), "
                f"updated_at = %s WHERE run_id = %s AND status NOT IN {TERMINAL_SQL}",
                (status.value, owner, now, run_id),
            )
            await verify()

        await self._write(op)

    async def park_run(self, run_id: str, wake_at: float | None, events: Sequence[str], *,
                       now: float | None = None) -> None:
        at = time.time() if now is None else now

        async def op(conn: Any) -> None:
            verify = await self._fenced(conn, run_id)
            wake = wake_at
            if events:
                waiting = await (await conn.execute(
                    "SELECT 1 FROM events WHERE run_id = %s AND consumed_position IS NULL "
                    "AND name = ANY(%s) LIMIT 1", (run_id, list(events)))).fetchone()
                if waiting is not None:
                    wake = at  # an event arrived while the run was parking
            # A parked run is nobody's: whoever is alive wakes it.
            await conn.execute(_sql(PARK_RUN), (wake, at, run_id))
            await verify()

        held = self._held.get(run_id)
        await self._write(op)
        self._let_go(run_id, held)

    async def finish_run(
        self, run_id: str, status: RunStatus, *, result: str | None, error: str | None,
        completed_at: float, notify: EventRecord | None = None, force: bool = False,
    ) -> bool:
        async def op(conn: Any) -> bool:
            verify = _no_check if force else await self._fenced(conn, run_id)
            cursor = await conn.execute(
                "UPDATE runs SET status = %s, result = %s, error = %s, completed_at = %s, "
                "updated_at = %s, wake_at = NULL, lease_until = NULL"
                + (", owner = NULL, fence = fence + 1" if force else "")
                + f" WHERE run_id = %s AND status NOT IN {TERMINAL_SQL} "
                "RETURNING queue, parent_position",
                (status.value, result, error, completed_at, completed_at, run_id),
            )
            ended = await cursor.fetchone()
            changed: bool = ended is not None
            if changed:  # a slot of its queue is free
                await _notify(conn, self.channel, f"q:{ended[0]}")
            if changed and force:  # its worker, if any, stops at once
                await _notify(conn, self.channel, f"c:{run_id}")
            if changed and notify is not None:
                for recipient in await _child_end_recipients(conn, notify.run_id, ended[1]):
                    await _insert_event(conn, self.channel, recipient, notify.name,
                                        notify.payload, notify.sent_at)
            if changed and status is RunStatus.CANCELLED:
                children = await (await conn.execute(
                    _CANCEL_CHILDREN, (completed_at, DUE_NOW, run_id))).fetchall()
                for (child,) in children:  # a child live on another worker stops now
                    await _notify(conn, self.channel, f"c:{child}")
            await verify()
            return changed

        held = self._held.get(run_id)
        changed = await self._write(op)
        self._let_go(run_id, held)
        return changed

    async def request_cancel(self, run_id: str, *, now: float | None = None) -> RunRecord:
        at = time.time() if now is None else now

        async def op(conn: Any) -> RunRecord:
            await conn.execute(  # a parked run is woken so that its worker sees the request
                "UPDATE runs SET cancel_requested = 1, updated_at = %s, wake_at = CASE "
                f"WHEN status = 'WAITING' THEN {DUE_NOW} ELSE wake_at END "
                f"WHERE run_id = %s AND status NOT IN {TERMINAL_SQL}",
                (at, run_id),
            )
            row = await (await conn.execute(_SELECT_RUN, (run_id,))).fetchone()
            if row is None:
                raise RunNotFoundError(
                    f"no run {run_id!r} in {self.safe_url}; check the id "
                    "(`garrison runs list` shows the runs)",
                    run_id=run_id,
                )
            await _notify(conn, self.channel, f"c:{run_id}")
            return run_from_row(row)

        return await self._write(op)

    async def redrive_run(self, run_id: str, *, now: float,
                          forget: Sequence[str] = ()) -> RunRecord:
        async def op(conn: Any) -> RunRecord:
            row = await (await conn.execute(
                "SELECT status, queue FROM runs WHERE run_id = %s FOR UPDATE", (run_id,)
            )).fetchone()
            refuse_redrive(run_id, row[0] if row else None, self.safe_url)
            await conn.execute(_sql(REDRIVE_FORGET_FAILED), (run_id,))
            for position in forget:
                await conn.execute(_sql(REDRIVE_FORGET_ENTRY), (run_id, position))
            await conn.execute(_sql(REDRIVE_FORGET_END), (f"garrison.child:{run_id}", run_id))
            await conn.execute(_sql(REDRIVE_RUN), (now, run_id))
            await _notify(conn, self.channel, f"q:{row[1]}")
            return run_from_row(await (await conn.execute(_SELECT_RUN, (run_id,))).fetchone())

        return await self._write(op)

    async def counts(self, since: float) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        runs = await self._read(_sql(RUN_COUNTS), (since,))
        steps = await self._read(_sql(STEP_COUNTS), (since,))
        return [tuple(r) for r in runs], [tuple(r) for r in steps]

    async def publish_breaker(self, name: str, state: str, open_for_s: float | None) -> None:
        open_until = self._wall() + open_for_s if open_for_s is not None else None
        row = (name, state, open_until, self._wall(), self.worker_id)
        event = (name, state, self._wall(), self.worker_id)

        async def op(conn: Any) -> None:
            await conn.execute(_sql(UPSERT_BREAKER), row)
            await conn.execute(_sql(INSERT_BREAKER_EVENT), event)
            await _notify(conn, self.channel, f"b:{name}")

        await self._write(op)

    async def take_permit(self, name: str, permit_id: str, *, limit: int) -> bool:
        worker = self.worker_id or "client"
        now = self._wall()
        until = now + self.lease_ttl_s
        return await self._write(lambda conn: _drive(take_permit(
            name, permit_id=permit_id, worker=worker, limit=limit, now=now, until=until,
            lock="SELECT pg_advisory_xact_lock(hashtext(?))"), conn))

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
            name, amount=amount, burst=burst, now=now, least="least"), conn))

    async def take_token(self, name: str, *, rate_per_s: float, burst: float,
                         cost: float = 1.0) -> float:
        now = self._wall()
        return await self._write(lambda conn: _drive(take_token(
            name, rate_per_s=rate_per_s, burst=burst, now=now, least="least", cost=cost), conn))

    async def breaker_history(self, since: float) -> list[tuple[str, str, float]]:
        rows = await self._read(_sql(BREAKER_HISTORY), (since,))
        return [(r[0], r[1], float(r[2])) for r in rows]

    async def breaker_states(self) -> dict[str, tuple[str, float | None]]:
        rows = await self._read(_sql(SELECT_BREAKERS))
        now = self._wall()
        return {r[0]: (r[1], r[2] - now if r[2] is not None else None) for r in rows}

    async def due_runs(self, now: float, *, limit: int = 1000,
                       workflows: Sequence[tuple[str, str]] | None = None) -> list[RunRecord]:
        only, params = workflow_filter(workflows)
        if only is None:
            return []
        rows = await self._read(
            f"SELECT {RUN_COLUMNS} FROM runs WHERE status = 'WAITING' AND wake_at <= %s "
            f"{_sql(only)}ORDER BY wake_at LIMIT %s",
            (now, *params, limit),
        )
        return [run_from_row(r) for r in rows]

    async def recoverable_runs(self, *, limit: int = 10_000,
                               workflows: Sequence[tuple[str, str]] | None = None
                               ) -> list[RunRecord]:
        only, params = workflow_filter(workflows)
        if only is None:
            return []
        rows = await self._read(
            f"SELECT {RUN_COLUMNS} FROM runs WHERE status IN ('PENDING', 'RUNNING') "
            f"{_sql(only)}ORDER BY created_at LIMIT %s",
            (*params, limit),
        )
        return [run_from_row(r) for r in rows]

    def watch(self, wakeup: Callable[[], None]) -> None:
        """Call `wakeup` (on the event loop) as soon as a notification arrives."""
        self._wakeup = wakeup

    async def changes(self) -> Changes:
        changes, self._changes = self._changes, Changes()
        now = time.monotonic()
        if self._listen_conn is None and now - self._blind_look >= _BLIND_LOOK_S:
            self._blind_look = now  # no LISTEN connection: look at everything, now and then
            changes.everything = True
        return changes

    # -- journal -------------------------------------------------------------------

    async def load_journal(self, run_id: str) -> list[StepRecord]:
        rows = await self._read(f"SELECT {STEP_COLUMNS} FROM steps WHERE run_id = %s",
                                (run_id,))
        return [step_from_row(r) for r in rows]

    async def append_steps(self, steps: Sequence[StepRecord]) -> None:
        rows = [step_values(step) for step in steps]
        runs = sorted({step.run_id for step in steps})  # one lock order: no deadlocks
        fences: dict[str, int | None] = {r: self._held.get(r) for r in runs}
        if self.worker_id is not None:
            for run_id, fence in fences.items():
                if fence is None:
                    raise self._lost(run_id, "not held")
        if len(steps) == 1 and self.worker_id is not None:
            op = self._append_one(steps[0], rows[0])
            single = True
        else:
            single = False

            async def op(conn: Any) -> None:
                checks = [await self._fenced(conn, run_id) for run_id in runs]
                async with conn.cursor() as cursor:
                    await cursor.executemany(_UPSERT_STEP, rows)
                for verify in checks:
                    await verify()

        self._require_open()
        assert self._writer is not None
        await self._writer.submit(op, single_statement=single, steps=(fences, rows))

    def _append_one(self, step: StepRecord, row: tuple[Any, ...]) -> _Op:
        """The common case (one step of one held run): the fence check and the journal
        row in one statement, so that alone in its batch it commits in one round trip."""
        params = (step.run_id, self.worker_id, self._held.get(step.run_id), *row)

        async def op(conn: Any) -> None:
            row = await (await conn.execute(_FENCED_UPSERT_STEP, params)).fetchone()
            if not row[0]:
                holder = await (await conn.execute(
                    "SELECT owner, fence FROM runs WHERE run_id = %s", (step.run_id,)
                )).fetchone()
                raise self._lost(step.run_id, f"now {holder[0] or 'nobody'}'s at fence "
                                 f"{holder[1]}" if holder else "gone")

        return op

    # -- streams -------------------------------------------------------------------

    async def append_stream(self, run_id: str, events: Sequence[tuple[str, str, str]], *,
                            at: float) -> list[int | None]:
        rows = [(run_id, run_id, key, kind, data, at) for key, kind, data in events]

        async def op(conn: Any) -> list[int | None]:
            verify = await self._fenced(conn, run_id)
            if self.worker_id is None:
                # A client's append: the run's row lock still orders appends to one run,
                # so that offsets grow in commit order (a reader never skips one).
                await conn.execute("SELECT 1 FROM runs WHERE run_id = %s FOR UPDATE",
                                   (run_id,))
            offsets: list[int | None] = []
            for row in rows:
                written = await (await conn.execute(_INSERT_STREAM, row)).fetchone()
                offsets.append(int(written[0]) if written is not None else None)
            await verify()
            if any(offset is not None for offset in offsets):
                await _notify(conn, self.channel, f"s:{run_id}")
            return offsets

        if not rows:
            return []
        return await self._write(op)

    async def read_stream(self, run_id: str, *, after: int = 0, limit: int = 1000,
                          key_prefix: str | None = None) -> list[StreamRecord]:
        sql, params = read_stream_query(run_id, after, limit, key_prefix)
        return [stream_from_row(r) for r in await self._read(_sql(sql), params)]

    # -- mailbox -------------------------------------------------------------------

    async def send_event(self, run_id: str, name: str, payload: str, sent_at: float) -> int:
        async def op(conn: Any) -> int:
            row = await (await conn.execute(
                "SELECT status FROM runs WHERE run_id = %s", (run_id,))).fetchone()
            refuse_event(run_id, name, row[0] if row else None, self.safe_url)
            return await _insert_event(conn, self.channel, run_id, name, payload, sent_at)

        return await self._write(op)

    async def consume_event(self, run_id: str, name: str, step: StepRecord) -> StepRecord | None:
        async def op(conn: Any) -> StepRecord | None:
            await (await self._fenced(conn, run_id))()  # its answer decides what to take
            row = await (await conn.execute(
                "SELECT seq, payload FROM events WHERE run_id = %s AND name = %s "
                "AND consumed_position IS NULL ORDER BY seq LIMIT 1 FOR UPDATE",
                (run_id, name),
            )).fetchone()
            if row is None:
                return None
            await conn.execute("UPDATE events SET consumed_position = %s WHERE seq = %s",
                               (step.position, row[0]))
            done = StepRecord(
                run_id=step.run_id, position=step.position, kind=step.kind, name=step.name,
                status=StepStatus.COMPLETED, started_at=step.started_at, arity=step.arity,
                inputs=step.inputs, output=row[1], completed_at=step.completed_at,
                fire_at=step.fire_at, worker=step.worker, tenant_id=step.tenant_id,
            )
            await conn.execute(_UPSERT_STEP, step_values(done))
            return done

        return await self._write(op)

    async def list_events(self, run_id: str) -> list[EventRecord]:
        rows = await self._read(
            _sql(LIST_EVENTS), (run_id,),
        )
        return [EventRecord(*r) for r in rows]


async def _no_check() -> None:
    return None


async def _notify(conn: Any, channel: str, payload: str) -> None:
    """Tell listening workers (delivered at commit; identical ones are merged)."""
    await conn.execute("SELECT pg_notify(%s, %s)", (channel, payload))


async def _child_end_recipients(conn: Any, parent_run_id: str,
                                position: str | None) -> list[str]:
    """Who is told of the end of the child started at `position`: its parent, and the
    unfinished forks reusing that start."""
    at = top_position(position)
    forks = await (await conn.execute(_FORKS_REUSING, (parent_run_id, at, at))).fetchall()
    return [parent_run_id, *(fork for (fork,) in forks)]


async def _insert_event(conn: Any, channel: str, run_id: str, name: str, payload: str,
                        sent_at: float) -> int:
    # Lock the run's row first: a park in flight (it holds the row) then commits before
    # this event, and the wake-up below sees it WAITING; or this commits first and the
    # park's look for waiting events sees the event.
    await conn.execute("SELECT 1 FROM runs WHERE run_id = %s FOR SHARE", (run_id,))
    cursor = await conn.execute(
        "INSERT INTO events (run_id, name, payload, sent_at) VALUES (%s, %s, %s, %s) "
        "RETURNING seq",
        (run_id, name, payload, sent_at),
    )
    row = await cursor.fetchone()
    await conn.execute("UPDATE runs SET wake_at = %s WHERE run_id = %s AND status = 'WAITING'",
                       (DUE_NOW, run_id))
    await _notify(conn, channel, f"e:{run_id}")
    return int(row[0])
