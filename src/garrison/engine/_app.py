"""`Garrison`: the application object. Registers steps and workflows, starts runs."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import functools
import math
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from types import TracebackType
from typing import Any, ParamSpec, TypeVar, overload

from garrison._log import get_logger
from garrison.engine._clock import Clock, SystemClock
from garrison.engine._codec import decode, encode
from garrison.engine._context import Context, current_branch, install_task_factory
from garrison.engine._handle import RunHandle
from garrison.engine._hooks import EngineHooks
from garrison.engine._queues import DEFAULT_QUEUE, Queue, StartOptions
from garrison.engine._registry import Guard, Registry, RetryPolicy, StepDef, WorkflowDef
from garrison.engine._replay import ReplayReport, fork_run, replay_run
from garrison.engine._stream import StreamSignals, follow_stream
from garrison.engine._worker import Worker
from garrison.errors import (
    ConfigurationError,
    LeaseLostError,
    NotInWorkflowError,
    RunNotFoundError,
    StoreError,
    WorkflowConflictError,
    WorkflowError,
)
from garrison.store import (
    ClaimReason,
    RunRecord,
    RunStatus,
    StepKind,
    StepRecord,
    Store,
    StreamRecord,
    open_store,
)

__all__ = ["Garrison"]


def _check_seconds(option: str, value: object, *, zero: bool) -> None:
    """Refuse an option that is not a finite number of seconds (> 0, or >= 0)."""
    if (not isinstance(value, int | float) or isinstance(value, bool)
            or not math.isfinite(value) or value < 0 or (value == 0 and not zero)):
        raise ConfigurationError(
            f"Garrison({option}={value!r}): a finite number of seconds "
            + (">= 0" if zero else "> 0"))

log = get_logger(__name__)

P = ParamSpec("P")
R = TypeVar("R")
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def new_run_id() -> str:
    """A time-ordered run id (`r_` + 12 hex digits of milliseconds + 10 random)."""
    return f"r_{int(time.time() * 1000):012x}{secrets.token_hex(5)}"


class _StepDecorator:
    """What `app.step()` returns; keeps the decorated function's parameter types."""

    def __init__(self, app: Garrison, name: str | None, retry: RetryPolicy | None,
                 guards: tuple[Guard, ...], timeout: float | None) -> None:
        self._app = app
        self._name = name
        self._retry = retry
        self._guards = guards
        self._timeout = timeout

    @overload
    def __call__(
        self, fn: Callable[P, Coroutine[Any, Any, R]]
    ) -> Callable[P, Coroutine[Any, Any, R]]: ...

    @overload
    def __call__(self, fn: Callable[P, R]) -> Callable[P, Coroutine[Any, Any, R]]: ...

    def __call__(self, fn: Callable[P, Any]) -> Callable[P, Coroutine[Any, Any, Any]]:
        definition = self._app.registry.add_step(fn, self._name, self._retry, self._guards,
                                                 self._timeout)

        @functools.wraps(fn)
        async def step(*args: P.args, **kwargs: P.kwargs) -> Any:
            branch = current_branch()
            if branch is None:  # outside a workflow, or called from another step's body
                result = fn(*args, **kwargs)
                return await result if definition.is_async else result
            return await branch.execution.call_step(branch, definition, args, kwargs)

        step.__garrison_step__ = definition  # type: ignore[attr-defined]  # marker for tools
        return step


class Garrison:
    """A Garrison application: the store, the registered code and the in-process worker.

    Args:
        url: the store. `sqlite:///garrison.db` (the default) is the embedded store;
            add `?synchronous=NORMAL` to trade power-loss durability for speed.
        store: a `Store` instance instead of a URL (tests, custom backends).
        clock: time source (`garrison.testing.FakeClock` in tests).
        hooks: `EngineHooks` to notify (observability, tests).
        worker: run a worker in this process under `async with app` (default). With
            `worker=False` the app only reads, starts and signals runs that another
            process executes.
        worker_id: this worker's name in the journal and its leases (default
            `host:pid:random`, unique per process start).
        version: the default code version of workflows registered without one.
        queues: the queues this worker claims runs from (default: every declared queue
            and "default").
        concurrency: at most this many runs executing in this worker at once (default:
            no limit but the queues' own).
        lease_ttl_s: how long a worker's claim on a run lasts without a heartbeat; a
            worker that dies has its runs resumed elsewhere within about this long.
        claim_interval_s: how often the worker looks for work nobody told it about
            (timers of runs parked by other workers, runs of dead workers, a missed
            notification); new runs and events arrive by notification at once.
        shutdown_grace_s: on close, how long in-flight runs may go on to finish or park
            before they are handed back to the fleet.
        poll_interval_s: how often the worker checks notifications and local timers.
        sync_step_threads: threads running synchronous `def` steps.
    """

    def __init__(self, url: str | None = None, *, store: Store | None = None,
                 clock: Clock | None = None, hooks: Sequence[EngineHooks] = (),
                 worker: bool = True, worker_id: str | None = None, version: str = "1",
                 queues: Sequence[str] | None = None, concurrency: int | None = None,
                 lease_ttl_s: float = 10.0, claim_interval_s: float = 1.0,
                 shutdown_grace_s: float = 0.0,
                 poll_interval_s: float = 0.05, sync_step_threads: int = 32) -> None:
        if store is not None and url is not None:
            raise ConfigurationError("Garrison(): pass url= or store=, not both")
        for option, value in (("poll_interval_s", poll_interval_s),
                              ("lease_ttl_s", lease_ttl_s),
                              ("claim_interval_s", claim_interval_s)):
            _check_seconds(option, value, zero=False)
        _check_seconds("shutdown_grace_s", shutdown_grace_s, zero=True)
        if (not isinstance(sync_step_threads, int) or isinstance(sync_step_threads, bool)
                or sync_step_threads < 1):
            raise ConfigurationError(
                f"Garrison(sync_step_threads={sync_step_threads!r}): a whole number >= 1 "
                "(the threads running synchronous `def` steps)")
        if url is not None and not url.strip():
            raise ConfigurationError(
                "Garrison(url=''): an empty store URL (an unset environment variable?); "
                "pass 'sqlite:///path.db' or 'postgresql://user@host/db', or None for "
                "the default sqlite:///garrison.db")
        self.store: Store = store if store is not None else open_store(url)
        self.clock: Clock = clock or SystemClock()
        self.registry = Registry()
        self.hooks: list[EngineHooks] = list(hooks)
        self.version = version
        self.worker_id = worker_id or (
            f"{os.uname().nodename}:{os.getpid()}:{secrets.token_hex(3)}")
        self.queues: dict[str, Queue] = {DEFAULT_QUEUE: Queue(DEFAULT_QUEUE)}
        self.served_queues: list[str] | None = None
        self.concurrency: int | None = None
        self.shutdown_grace_s = 0.0
        self.lease_ttl_s = float(lease_ttl_s)
        self.claim_interval_s = float(claim_interval_s)
        self._run_worker = worker
        self._poll_interval_s = poll_interval_s
        self._sync_step_threads = sync_step_threads
        self.worker: Worker | None = None
        self._open = False
        # The event loop the app was opened on, None while closed: where code on another
        # thread (a metrics scrape) runs its store reads.
        self.loop: asyncio.AbstractEventLoop | None = None
        self.breakers: dict[str, Any] = {}  # shared circuit breakers, by name
        self._background: set[asyncio.Task[None]] = set()
        self.stream_signals = StreamSignals()  # wakes this process's stream readers
        self.configure_worker(queues=queues, concurrency=concurrency,
                              shutdown_grace_s=shutdown_grace_s)

    # -- registration --------------------------------------------------------------

    def step(self, *, name: str | None = None, retry: RetryPolicy | None = None,
             breaker: Guard | None = None, rate_limiter: Guard | None = None,
             bulkhead: Guard | None = None, guards: Sequence[Guard] = (),
             timeout: float | None = None) -> _StepDecorator:
        """Declare a step: called inside a workflow, it runs once and its result is journaled.

        Policies (`garrison.resilience`) attach here: `retry` decides on another attempt
        after a failure (the wait is a durable timer); each attempt goes through
        `breaker`, then `rate_limiter`, then `bulkhead`, then any other `guards`, and is
        bounded by `timeout` seconds (and by the run's deadline): past it the attempt is
        cancelled and fails with `DeadlineExceeded`.

        A step interrupted by a crash may run again (at-least-once) with the same
        `current_step().idempotency_key`. A synchronous `def` step runs in a thread pool.
        Called outside a workflow, the function runs directly, unjournaled (the
        decorated step is always awaited, even when the function is a `def`).
        """
        if breaker is not None:
            self.share_breaker(breaker)
        if rate_limiter is not None:
            self.share_limiter(rate_limiter)
        if bulkhead is not None:
            self.share_bulkhead(bulkhead)
        budget = getattr(retry, "budget", None)
        if budget is not None:
            self.share_budget(budget)
        chain = tuple(g for g in (breaker, rate_limiter, bulkhead) if g is not None)
        return _StepDecorator(self, name, retry, chain + tuple(guards), timeout)

    def workflow(self, *, name: str | None = None, version: str | None = None,
                 timeout: float | None = None, quarantine: bool = True) -> Callable[[F], F]:
        """Declare a workflow: an `async def (ctx: Context, ...)` run durably by `app.start`.

        Args:
            name: the journal name (default: the function's qualified name).
            version: the code version recorded with each run (default: `Garrison(version=)`);
                a worker resumes only runs of versions it has registered.
            timeout: a run-level deadline, seconds from its start (journaled with the run,
                so it holds across restarts). Steps and children see what is left
                (`garrison.remaining()`); past it, the run is cancelled and fails with
                `DeadlineExceeded`.
            quarantine: a run that fails ends QUARANTINED (inputs, journal and error
                kept; `app.redrive(run_id)` continues it after a fix). False: FAILED.
        """

        def decorator(fn: F) -> F:
            definition = self.registry.add_workflow(fn, name, version or self.version,
                                                    timeout, quarantine)

            @functools.wraps(fn)
            async def workflow(*args: Any, **kwargs: Any) -> Any:
                branch = current_branch()
                if branch is None:
                    raise NotInWorkflowError(
                        f"workflow {definition.name!r} was called directly; start it with "
                        f"`await app.start({fn.__name__}, ...)` (or ctx.start_child inside a "
                        "workflow)"
                    )
                ctx = branch.execution.context
                rest = args[1:] if args and isinstance(args[0], Context) else args
                handle = await ctx.start_child(workflow, *rest, **kwargs)
                return await handle.result()

            workflow.__garrison_workflow__ = definition  # type: ignore[attr-defined]
            return workflow  # type: ignore[return-value]  # same signature, wrapped

        return decorator

    def configure_worker(self, *, queues: Sequence[str] | None = None,
                         concurrency: int | None = None,
                         shutdown_grace_s: float | None = None) -> None:
        """Set the worker's options before `open` (what `garrison worker` flags do)."""
        if self._open:
            raise ConfigurationError("app.configure_worker(): call it before the app opens")
        if concurrency is not None and (isinstance(concurrency, bool)
                                        or not isinstance(concurrency, int) or concurrency < 1):
            raise ConfigurationError(
                f"worker concurrency={concurrency!r} (--concurrency): a whole number >= 1, "
                "or None for no limit")
        if shutdown_grace_s is not None and shutdown_grace_s < 0:
            raise ConfigurationError(
                f"worker shutdown_grace_s={shutdown_grace_s!r} (--grace): seconds, >= 0")
        self.served_queues = list(queues) if queues is not None else self.served_queues
        self.concurrency = concurrency if concurrency is not None else self.concurrency
        if shutdown_grace_s is not None:
            self.shutdown_grace_s = float(shutdown_grace_s)

    def queue(self, name: str, *, concurrency: int | None = None,
              worker_concurrency: int | None = None,
              rate_limit: tuple[int, float] | None = None, priority: bool = False,
              partition: bool = False, partition_concurrency: int | None = None) -> Queue:
        """Declare a queue; `app.start(..., queue=name)` puts runs in it.

        Args:
            concurrency: at most this many of its runs active (RUNNING or WAITING)
                across every worker sharing the store.
            worker_concurrency: at most this many of its runs executing in one worker.
            rate_limit: `(n, seconds)`: at most n runs started in any window of `seconds`.
            priority: runs take `priority=` (lower runs first, default 0).
            partition: runs take `partition_key=`; keys are served in turn, so one busy
                customer cannot starve the others.
            partition_concurrency: at most this many active runs per partition key (1:
                one active run per conversation).

        Every process of the application declares the same queues (they are code).
        """
        declared = Queue(name, concurrency=concurrency, worker_concurrency=worker_concurrency,
                         rate_limit=rate_limit, priority=priority, partition=partition,
                         partition_concurrency=partition_concurrency)
        self.queues[name] = declared
        return declared

    def _queue(self, queue: str | Queue | None) -> Queue:
        if queue is None:
            return self.queues[DEFAULT_QUEUE]
        name = queue.name if isinstance(queue, Queue) else queue
        found = self.queues.get(name) if isinstance(name, str) else None
        if found is None:
            raise ConfigurationError(
                f"app.start(queue={queue!r}): no such queue; declare it first with "
                f"app.queue({name!r}, ...) (declared: {', '.join(sorted(self.queues))})"
            )
        return found

    def share_breaker(self, breaker: Any) -> None:
        """Share a circuit breaker's decisions with every worker of the store (a breaker
        attached to a step is shared already): when one worker's copy opens, the others'
        open too; when one closes after its trial calls, the others close."""
        share = getattr(breaker, "share", None)
        if callable(share) and breaker.name not in self.breakers:
            self.breakers[breaker.name] = breaker
            share(self._publish_breaker)

    def share_limiter(self, limiter: Any) -> None:
        """Keep a rate limiter's bucket in the store, so its rate holds across every
        worker (a limiter attached to a step is shared already)."""
        share = getattr(limiter, "share", None)
        if callable(share) and self.store.fleet:
            share(self._take_token)

    def share_bulkhead(self, bulkhead: Any) -> None:
        """Keep a bulkhead's places in the store, so `max_concurrent` holds across the
        fleet (a bulkhead on a step is shared already). A place is held under the
        worker's lease: a worker that dies frees its places after `lease_ttl_s`."""
        share = getattr(bulkhead, "share", None)
        if callable(share) and self.store.fleet:
            share(self._take_permit, self.store.release_permit)

    async def _take_permit(self, name: str, permit_id: str, limit: int) -> bool:
        return await self.store.take_permit(name, permit_id, limit=limit)

    def share_budget(self, budget: Any) -> None:
        """Keep a retry budget's bucket in the store, so the whole fleet spends one
        budget per target (a budget on a step's `Retry` is shared already)."""
        share = getattr(budget, "share", None)
        if callable(share) and self.store.fleet and not getattr(budget, "shared", False):
            share(self._take_budget, self._give_budget)

    async def _take_budget(self, name: str, cost: float, capacity: float) -> bool:
        wait = await self.store.take_token(f"retry-budget:{name}", rate_per_s=0.0,
                                           burst=capacity, cost=cost)
        return wait == 0.0

    def _give_budget(self, name: str, amount: float, capacity: float) -> None:
        if not self._open:
            return
        self._in_background(self.store.give_tokens(f"retry-budget:{name}", amount=amount,
                                                   burst=capacity), what="retry budget")

    def _in_background(self, write: Any, *, what: str) -> None:
        """A store write nobody waits for (errors are logged)."""
        async def run() -> None:
            try:
                await write
            except StoreError as exc:
                log.warning("store.background_write_failed", what=what, error=str(exc))

        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            write.close()
            return
        task = loop.create_task(run(), context=contextvars.Context())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _take_token(self, name: str, rate_per_s: float, burst: float) -> float:
        return await self.store.take_token(name, rate_per_s=rate_per_s, burst=burst)

    def _publish_breaker(self, name: str, state: str, open_for_s: float | None) -> None:
        if self._open:
            self._in_background(self.store.publish_breaker(name, state, open_for_s),
                                what=f"breaker {name}")

    async def follow_breakers(self) -> None:
        """Apply the breaker decisions other workers published (the worker calls this
        when notified, and on start)."""
        for name, (state, open_for_s) in (await self.store.breaker_states()).items():
            breaker = self.breakers.get(name)
            if breaker is None:  # a keyed breaker: "parent:key"
                parent = next((b for p, b in self.breakers.items()
                               if name.startswith(p + ":")), None)
                if parent is None:
                    continue
                breaker = parent.for_key(name[len(parent.name) + 1:])
            breaker.follow(state, open_for_s)

    def add_supervisor(self, tree: Any) -> None:
        """Register a supervision tree (`garrison.resilience.Supervisor`) before the app
        opens, so that a restarted worker resumes its runs."""
        self.workflow_definition(tree)

    def add_agent(self, agent: Any) -> None:
        """Register an agent (`garrison.agents.Agent`) with its steps, tools and the
        agents it hands off to, before the app opens, so that a restarted worker
        resumes its interrupted runs by itself."""
        self.workflow_definition(agent)

    def workflow_definition(self, workflow: Any) -> WorkflowDef:
        """The `WorkflowDef` behind a decorated workflow (or a registered name, or an
        object with a `__garrison_register__(app)` hook, such as a Supervisor)."""
        register = getattr(workflow, "__garrison_register__", None)
        if callable(register):
            registered: WorkflowDef = register(self)
            return registered
        if isinstance(workflow, str):
            found = [d for (n, _), d in self.registry.workflows.items() if n == workflow]
            if found:
                return found[-1]
        definition = getattr(workflow, "__garrison_workflow__", None)
        if isinstance(definition, WorkflowDef):
            return definition
        raise ConfigurationError(
            f"{workflow!r} is not a workflow of this app; decorate it with @app.workflow()"
        )

    # -- lifecycle -----------------------------------------------------------------

    async def __aenter__(self) -> Garrison:
        await self.open()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def open(self) -> None:
        """Open the store and, unless `worker=False`, start the worker and resume runs."""
        if self._open:
            return
        await self.store.open()
        self._open = True
        self.loop = asyncio.get_running_loop()
        if self._run_worker:
            install_task_factory(self.loop)
            self.worker = Worker(self, self.store, self.clock, self.hooks, self.worker_id,
                                 self._poll_interval_s, self._sync_step_threads)
            unknown = sorted(set(self.served_queues or ()) - set(self.queues))
            if unknown:
                await self.close()
                raise ConfigurationError(
                    f"Garrison(queues={self.served_queues!r}): {', '.join(unknown)} not "
                    f"declared; declare with app.queue(...) (declared: "
                    f"{', '.join(sorted(self.queues))})")
            try:
                await self.worker.start()
            except BaseException:
                await self.close()
                raise

    async def close(self) -> None:
        """Stop the worker: no more claims; in-flight runs get `shutdown_grace_s` to finish
        or park, then are handed back (still RUNNING) for another worker to resume."""
        if self.worker is not None:
            await self.worker.stop(self.shutdown_grace_s)
            self.worker = None
        if self._open:
            self.loop = None
            await self.store.close()
            self._open = False

    def _require_open(self, what: str) -> None:
        if not self._open:
            raise StoreError(f"app.{what}(): the app is not open; use `async with app:` first")

    # -- runs ----------------------------------------------------------------------

    def new_run_record(self, definition: WorkflowDef, run_id: str, args: Sequence[Any],
                       kwargs: dict[str, Any], *, parent: tuple[str, str] | None,
                       now: float, options: StartOptions, local: bool,
                       deadline_at: float | None = None) -> RunRecord:
        """A new run: claimed by this worker at creation when `local` (see
        `Worker.reserve`), else PENDING in its queue until a worker claims it."""
        definition.check_arguments(args, kwargs)
        inputs = encode({"args": list(args), "kwargs": kwargs},
                        what=f"inputs of workflow {definition.name!r}")
        deadline = now + definition.timeout if definition.timeout is not None else None
        if deadline_at is not None:
            deadline = min(deadline, deadline_at) if deadline is not None else deadline_at
        record = RunRecord(
            deadline_at=deadline,
            run_id=run_id, workflow_name=definition.name, workflow_version=definition.version,
            status=RunStatus.RUNNING if local else RunStatus.PENDING, inputs=inputs,
            created_at=now, updated_at=now, owner=self.worker_id if local else None,
            fence=1 if local else 0, started_at=now if local else None,
            claim_reason=ClaimReason.START if local else None,  # claimed as it is made
            parent_run_id=parent[0] if parent else None,
            parent_position=parent[1] if parent else None,
            queue=options.queue.name, priority=options.priority,
            partition_key=options.partition_key, dedup_id=options.dedup_id,
        )
        for hook in self.hooks:  # observability: the starter's trace goes on in the run
            trace_context = hook.trace_context(record)
            if trace_context is not None:
                return dataclasses.replace(record, trace_context=trace_context)
        return record

    def add_hook(self, hook: EngineHooks) -> None:
        """Attach `hook` to this app (and to its running worker, if open): every run
        event from now on reaches it too (`garrison.observability.instrument` uses this)."""
        if hook in self.hooks:
            return
        self.hooks.append(hook)
        if self.worker is not None:
            self.worker.hooks = self.worker.hooks.added(hook)

    async def start(self, workflow: Callable[..., Awaitable[R]], *args: Any,
                    run_id: str | None = None, queue: str | Queue | None = None,
                    priority: int | None = None, partition_key: str | None = None,
                    dedup_id: str | None = None, **kwargs: Any) -> RunHandle[R]:
        """Start a durable run of `workflow(ctx, *args, **kwargs)`; return its handle.

        Idempotent on `run_id`: an existing run's handle is returned and the run is never
        started twice. Arguments must be JSON-able (see docs/guarantees.md).

        Args:
            queue: a queue declared with `app.queue` (default: "default", no limits).
            priority: on a queue with `priority=True`: lower runs first (default 0).
            partition_key: on a queue with `partition=True`: the fairness key (required).
            dedup_id: refuse a second unfinished run with this id in the same queue.

        Raises:
            WorkflowConflictError: `run_id` belongs to a run of another workflow.
            RunDeduplicatedError: the queue holds an unfinished run with `dedup_id`
                (its `existing_run_id` names it).
            ConfigurationError: an undeclared queue, or an option the queue does not take.
            SerializationError: an argument cannot be stored.
        """
        self._require_open("start")
        definition = self.workflow_definition(workflow)
        branch = current_branch()
        if branch is not None:
            raise WorkflowError(
                f"run {branch.execution.run_id}: app.start() inside a workflow is not "
                "journaled; use `await ctx.start_child(...)`",
                run_id=branch.execution.run_id,
            )
        if run_id is not None and (not isinstance(run_id, str) or not run_id.strip()):
            raise ConfigurationError(f"app.start(run_id={run_id!r}): a run id is a non-empty str")
        options = StartOptions.check(self._queue(queue), priority, partition_key, dedup_id)
        local = self.worker is not None and self.worker.reserve(options.queue)
        try:
            record = self.new_run_record(definition, run_id or new_run_id(), args, kwargs,
                                         parent=None, now=self.clock.time(), options=options,
                                         local=local)
            stored, created = await self.store.create_run(record)
        finally:
            if local and self.worker is not None:
                self.worker.unreserve()
        if not created and stored.workflow_name != definition.name:
            raise WorkflowConflictError(
                f"run id {stored.run_id!r} already belongs to a run of workflow "
                f"{stored.workflow_name!r}; cannot start {definition.name!r} under it. "
                "Choose another run_id.",
                run_id=stored.run_id, existing=stored.workflow_name, requested=definition.name,
            )
        if created and self.worker is not None:
            if stored.owner == self.worker_id:
                self.worker.launch(stored, definition, journal=())
            else:
                self.worker.poke()  # claim it, if this worker takes its queue
        return RunHandle(self, stored.run_id)

    def handle(self, run_id: str) -> RunHandle[Any]:
        """A handle for any existing run (the id is checked when the handle is used)."""
        return RunHandle(self, run_id)

    async def send(self, run_id: str, name: str, value: Any = None) -> None:
        """Put an event in a run's mailbox, durably; `ctx.wait_for(name)` receives it.

        Raises:
            RunNotFoundError: no such run.
            WorkflowError: the run already ended.
            SerializationError: `value` cannot be stored.
        """
        self._require_open("send")
        branch = current_branch()
        if branch is not None:
            raise WorkflowError(
                f"run {branch.execution.run_id}: app.send() inside a workflow is not journaled "
                "and would be sent again on every replay; send from a step instead",
                run_id=branch.execution.run_id,
            )
        payload = encode(value, what=f"event {name!r} for run {run_id}")
        await self.store.send_event(run_id, name, payload, self.clock.time())
        if self.worker is not None:
            self.worker.notify_event(run_id, name)

    def stream(self, run_id: str, *, after: int = 0, poll_s: float = 0.05
               ) -> AsyncIterator[StreamRecord]:
        """Follow a run's stream (what its steps `garrison.publish`): the events with
        offset > `after`, in order, waiting for more, until the run has ended
        (COMPLETED, FAILED, CANCELLED, QUARANTINED) and every event was read.

        A reconnecting client passes the last offset it saw as `after` and resumes
        exactly after it. Each key is in the stream once: a step that runs again after
        a crash, or a replay, publishes nothing twice (at-least-once publishing, exactly
        once per key in the stream). Offsets grow within a run but have gaps (they are
        the store's global sequence).

        A publish in this process wakes its readers at once; runs executed by other
        processes are polled every `poll_s` seconds (sooner on PostgreSQL when this
        app runs a worker, which hears the store's notifications).

        Raises (on first iteration):
            RunNotFoundError: no such run.
        """
        self._require_open("stream")
        branch = current_branch()
        if branch is not None:
            raise WorkflowError(
                f"run {branch.execution.run_id}: app.stream() inside a workflow is not "
                "journaled (a replay would read other events); read it from a step or a "
                "client", run_id=branch.execution.run_id)
        if not isinstance(poll_s, int | float) or poll_s <= 0:
            raise ConfigurationError(f"app.stream(poll_s={poll_s!r}): seconds, > 0")
        return follow_stream(self, run_id, after=after, poll_s=float(poll_s))

    async def cancel(self, run_id: str, *, force: bool = False) -> None:
        """Cancel a run and its unfinished children. Raises `RunNotFoundError`.

        Cooperative: the run sees `CancelledError` at its current await. `force=True`
        ends it CANCELLED now, whoever executes it: its worker's further writes are
        refused (a supervisor's kill after a child's shutdown timeout). Needs a worker
        in this process.

        From workflow code (`handle.cancel()` on a child) the request is a write of the
        run's, outside its journal, like `publish`: a replay (`app.replay`) makes none.
        A resumed run makes it again, which changes nothing for a run already asked."""
        self._require_open("cancel")
        branch = current_branch()
        if branch is not None:
            await branch.execution.workflow_write(self._cancel(run_id, force))
            return
        await self._cancel(run_id, force)

    async def _cancel(self, run_id: str, force: bool) -> None:
        if force:
            if self.worker is None:
                raise ConfigurationError("app.cancel(force=True) needs a worker in this "
                                         "process (Garrison(worker=True))")
            found = await self.store.get_run(run_id)
            if found is None:
                raise RunNotFoundError(f"no run {run_id!r}; check the id", run_id=run_id)
            await self.worker.finish_stored(found, RunStatus.CANCELLED, None, None,
                                            force=True)
            return
        run = await self.store.request_cancel(run_id, now=self.clock.time())
        if run.status.is_terminal or self.worker is None:
            return  # the worker holding it, or the next to claim it, ends it
        execution = self.worker.live.get(run_id)
        if execution is not None:
            execution.cancel()
            return
        if self.store.holds(run_id):
            return  # claimed here and about to start or retry: it reads the request then
        claimed = await self.store.claim_run(run_id, now=self.clock.time())
        if claimed is None:
            return  # another worker holds it: it sees the request
        if run_id in self.worker.live or not self.store.holds(run_id):
            return  # this worker's own claim got there first, or the run moved on
        # Nobody else holds it: end it here (if it is taken meanwhile, its holder reads
        # the request).
        with contextlib.suppress(LeaseLostError):
            await self.worker.finish_stored(claimed, RunStatus.CANCELLED, None, None)

    async def redrive(self, run_id: str) -> RunHandle[Any]:
        """Continue a QUARANTINED run after a fix: it goes back to its queue, its
        completed steps keep their results, its failed steps run again.

        A child run whose failure the run had received is continued with it: a
        QUARANTINED child is redriven too (and its own children, so a whole tree goes on
        from its failed leaves), and the run waits for that child's new outcome, as it
        does for a child redriven (and completed) before it. A child that ended FAILED
        or CANCELLED (not redrivable) keeps its outcome: the run sees it again.

        Raises `RunNotFoundError`, or `WorkflowError` if the run is not QUARANTINED.
        """
        self._require_open("redrive")
        forget: list[str] = []
        run = await self.store.get_run(run_id)
        if run is not None and run.status is RunStatus.QUARANTINED:
            for entry in await self.store.load_journal(run_id):
                child = await self._child_of(entry)
                if child is None:
                    continue
                if child.status is RunStatus.QUARANTINED:  # its old end is voided too
                    await self.redrive(child.run_id)
                if (entry.kind is StepKind.CHILD_RESULT
                        and child.status not in (RunStatus.FAILED, RunStatus.CANCELLED)):
                    forget.append(entry.position)  # its failure, read: wait for it again
        await self.store.redrive_run(run_id, now=self.clock.time(), forget=forget)
        if self.worker is not None:
            self.worker.poke()
        return RunHandle(self, run_id)

    async def _child_of(self, entry: StepRecord) -> RunRecord | None:
        """The child run `entry` started (a child entry) or whose failure it journaled
        (a child result), if any."""
        if not entry.output or entry.kind not in (StepKind.CHILD, StepKind.CHILD_RESULT):
            return None
        payload = decode(entry.output)
        if entry.kind is StepKind.CHILD:
            return await self.store.get_run(payload) if isinstance(payload, str) else None
        if not (isinstance(payload, dict) and payload.get("status") in (
                RunStatus.FAILED.value, RunStatus.QUARANTINED.value)):
            return None
        return await self.store.get_run(str(payload.get("run_id") or entry.name))

    async def replay(self, run_id: str, *, version: str | None = None,
                     children: bool = False) -> ReplayReport:
        """Re-run a run's workflow code against its journal, with no side effects.

        Every journaled operation must be found at its position (same kind, name and
        arity); no step body runs, no child starts, nothing waits, nothing is written
        (works on runs other workers own, and with `worker=False`). An unfinished run
        replays up to the end of its journal ("consistent so far"); an ended run must
        also come to the same result (or the same error).

        Args:
            version: the code version to replay with. Default: the run's own version if
                registered here, else the version of its workflow registered last, so a
                CI gate can replay old journals against new code.
            children: also replay the run's child workflows (`ctx.start_child`, agents
                as tools, supervised children), and theirs, each with its own version
                chosen as above; their reports are in `ReplayReport.children`.

        Raises:
            NonDeterminismError: the code diverges from the journal (its `run_id`,
                `position`, `journal` and `code` say where and how; position None: the
                outcome); with `children`, the first run of the tree that diverges.
            RunNotFoundError: no such run.
            ConfigurationError: the run's workflow (or `version`) is not registered here.
        """
        self._require_open("replay")
        self._refuse_in_workflow("replay")
        return await replay_run(self, run_id, version=version, children=children)

    async def fork(self, from_run_id: str, /, at_step: int, *, args: Any = None,
                   run_id: str | None = None, version: str | None = None) -> RunHandle[Any]:
        """Start a new run that reuses a run's journal up to `at_step`, then goes live.

        The fork's journal starts with the finished entries of `from_run_id` whose
        top-level position is <= `at_step` (every journaled operation of the workflow
        body counts: steps, sleeps, waits, child starts and results, now/uuid/random;
        a fan-out's entries belong to the position it fans out from); those replay
        without running, everything after runs live. `at_step=0` is a fresh run with the
        same inputs. The fork records where it came from (`RunRecord.forked_from`,
        `forked_at`); reused child starts point at the original run's children.

        Args:
            args: new inputs instead of the original ones: a list of positional
                arguments, or `{"args": [...], "kwargs": {...}}`.
            run_id: the fork's id (default: a new one); idempotent like `start`.
            version: the code version (default: as `replay` chooses).

        Raises:
            RunNotFoundError: no such run.
            ConfigurationError: `at_step` < 0, bad `args`, or the workflow (version) is
                not registered here.
            WorkflowConflictError: `run_id` belongs to another run.
        """
        self._require_open("fork")
        self._refuse_in_workflow("fork")
        return await fork_run(self, from_run_id, at_step, args=args,
                              run_id=run_id or new_run_id(), version=version)

    def _refuse_in_workflow(self, what: str) -> None:
        branch = current_branch()
        if branch is not None:
            raise WorkflowError(
                f"run {branch.execution.run_id}: app.{what}() inside a workflow is not "
                "journaled; call it from a client or a step", run_id=branch.execution.run_id)

    async def list_runs(self, *, statuses: Sequence[RunStatus] | None = None,
                        limit: int = 100) -> list[RunRecord]:
        """Stored runs, newest first."""
        self._require_open("list_runs")
        return await self.store.list_runs(statuses=statuses, limit=limit)

    @property
    def orphaned_runs(self) -> list[RunRecord]:
        """Unfinished runs of workflow versions this process has not registered."""
        return list(self.worker.orphaned.values()) if self.worker is not None else []

    def step_definition(self, step: Any) -> StepDef:
        """The `StepDef` behind a decorated step."""
        definition = getattr(step, "__garrison_step__", None)
        if not isinstance(definition, StepDef):
            raise ConfigurationError(f"{step!r} is not a step; decorate it with @app.step()")
        return definition
