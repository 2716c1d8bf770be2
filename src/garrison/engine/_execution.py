"""One run executing in this process: replay against the journal, then live steps.

The workflow body runs from the top every time the run starts executing. A journaled
operation first looks at its position in the journal: a completed entry returns its
value (or re-raises its error) without running anything; a missing entry runs live and
is committed before the workflow goes past it. A run whose every branch waits on a
timer or an event, with nothing in flight, is *parked*: its coroutines are released and
the store wakes it later.

The execution owns every task its body creates (the task factory adopts them): when the
body ends, parks or loses its store, every branch is cancelled and awaited before the
outcome is written, so no branch of a finished or parked run ever runs on.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import datetime as dt
import functools
import json
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from garrison._log import get_logger
from garrison.engine._codec import (
    decode,
    encode,
    error_from_data,
    error_text,
    error_to_data,
    roundtrip,
)
from garrison.engine._context import (
    Branch,
    Context,
    StepInfo,
    enter_branch,
    enter_step,
    leave_branch,
    leave_step,
)
from garrison.engine._handle import RunHandle
from garrison.engine._queues import DEFAULT_QUEUE, StartOptions
from garrison.engine._registry import StepDef, WorkflowDef
from garrison.errors import (
    AbortedError,
    DeadlineExceeded,
    LeaseLostError,
    NonDeterminismError,
    ResultTimeoutError,
    SerializationError,
    StoreError,
    WorkflowCancelled,
    WorkflowFailed,
)
from garrison.store import RunRecord, RunStatus, StepKind, StepRecord, StepStatus

if TYPE_CHECKING:
    from garrison.engine._worker import Worker

__all__ = ["RunExecution", "child_event_name"]

log = get_logger(__name__)

T = TypeVar("T")

# Loop passes with no journaled activity before an all-waiting run is parked. A branch
# between two operations runs synchronously, and a finished branch reaches the task
# awaiting it within two passes (done callback, then the waiter's wake-up).
_QUIESCENT_PASSES = 4
# How long closing waits for branches that ignore cancellation before giving up on them.
_CLOSE_TIMEOUT_S = 5.0
_TIMED_OUT = object()
# Waits between tries of a journal write that failed (then the run is abandoned and
# resumed by the worker's backoff). About the time a database takes to restart.
_APPEND_RETRIES_S = (0.2, 0.5, 1.0, 2.0, 4.0)


def child_event_name(child_run_id: str) -> str:
    """The mailbox event through which a child run reports its end to its parent."""
    return f"garrison.child:{child_run_id}"


def _cancel_requested() -> bool:
    """Whether the current task is being cancelled (a run's cancel, park, deadline or
    the worker's shutdown all cancel its task), as opposed to code in it raising a
    CancelledError of its own."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


def _aborted(exc: BaseException, where: str, **fields: Any) -> AbortedError | None:
    """What run code raised that would stop more than that code, as its failure; None
    for a cancel that was asked for (an interruption, not a failure)."""
    if isinstance(exc, SystemExit):
        return AbortedError(f"{where}: called sys.exit({exc.code!r}); handled as its "
                            "failure (run code never ends the worker's process)",
                            raised="SystemExit", **fields)
    if _cancel_requested():
        return None
    return AbortedError(f"{where}: raised CancelledError while its run was not being "
                        "cancelled (a task it awaited was cancelled elsewhere?); handled "
                        "as its failure", raised="CancelledError", **fields)


class _StoreFailure(BaseException):
    """The engine's own journal write failed. A BaseException on purpose: workflow code's
    `except Exception` must not swallow it and go on past an uncommitted step."""

    def __init__(self, error: StoreError) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass(slots=True)
class _Waiter:
    position: str
    future: asyncio.Future[None]
    fire_at: float | None = None
    events: tuple[str, ...] = ()


@dataclass(slots=True)
class _Outcome:
    status: RunStatus
    result: str | None = None
    error: dict[str, Any] | None = None


class RunExecution:
    """Drives one run's workflow coroutine in this process."""

    replay_only = False  # True for `app.replay`'s executions: nothing in them is live

    def __init__(self, worker: Worker, run: RunRecord, workflow: WorkflowDef,
                 journal: Sequence[StepRecord]) -> None:
        self.worker = worker
        self.run = run
        self.workflow = workflow
        self.journal: dict[str, StepRecord] = {entry.position: entry for entry in journal}
        self.context = Context(self)
        self.root = Branch(self, "")
        self.task: asyncio.Task[None] | None = None
        self.branches: set[asyncio.Task[Any]] = set()
        self.waiters: dict[str, _Waiter] = {}
        self.inflight = 0
        self.epoch = 0
        self.nondeterminism: NonDeterminismError | None = None
        self._buffered: list[StepRecord] = []
        self._timers: set[str] = set()
        self._suspending = False
        self._cancelling = False
        self._cancel_after_close = False
        self._deadline_passed = False
        self._cancel_at_start = False
        self.started = False  # set when the body is about to run (see drive)
        self._closing = False
        self._quiescence_scheduled = False
        self._quiet_passes = 0
        self._quiet_epoch = -1
        self._park_plan: tuple[float | None, list[str]] = (None, [])

    # -- lifecycle -----------------------------------------------------------------

    @property
    def run_id(self) -> str:
        return self.run.run_id

    def adopt(self, task: asyncio.Task[Any]) -> None:
        """A task created by this run's body (called by the task factory)."""
        self.branches.add(task)
        task.add_done_callback(self.branches.discard)

    def cancel(self) -> None:
        """Cancel cooperatively: CancelledError at the workflow's current await."""
        if not self.started:  # a task cancelled before it runs never runs its cleanup:
            self._cancel_at_start = True  # end the run as cancelled when it starts instead
            return
        if self._closing:  # the body is over; the outcome being written is replaced
            self._cancel_after_close = True
            return
        if self.task is not None and not self.task.done():
            self._cancelling = True
            self.task.cancel("garrison: run cancelled")

    def abandon(self) -> None:
        """The lease is lost: stop now. The store already refuses this run's writes (the
        worker that claimed it has it); the unwinding writes nothing."""
        if self.task is not None and not self.task.done():
            self.task.cancel("garrison: lease lost")

    async def drive(self) -> None:
        """Run the workflow body to its end, to a park, or until shutdown."""
        self.started = True  # from here a cancel interrupts the body (before: see cancel)
        token = enter_branch(self.root)
        try:
            try:
                outcome: _Outcome | None = await self._execute_body()
            except asyncio.CancelledError:
                if not (self._suspending or self._cancelling or self._deadline_passed):
                    await self._close_branches()
                    raise  # worker shutdown: the run stays RUNNING, resumes on next start
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()
                if self._deadline_passed:
                    outcome = self._failed(self._deadline_error())
                else:
                    outcome = _Outcome(RunStatus.CANCELLED) if self._cancelling else None
            except _StoreFailure as failure:
                await self._close_branches()
                self.worker.store_failed(self.run_id, failure.error)
                return
            await self._close_branches()
            try:
                if outcome is None:
                    await self._park()
                else:
                    await self._finish(outcome)
            except _StoreFailure as failure:  # parking's journal write failed for good
                self.worker.store_failed(self.run_id, failure.error)
                return
        finally:
            leave_branch(token)
        if self._cancel_after_close:
            await self.worker.app.cancel(self.run_id)

    def _body_failed(self, exc: BaseException, cause: BaseException | None) -> _Outcome:
        if cause is not None:
            exc.__cause__ = cause
        error = self.nondeterminism or exc
        log.warning("run.failed", run_id=self.run_id, worker=self.worker.worker_id,
                    error_type=type(error).__name__, error=error_text(error))
        return self._failed(error)

    async def end_broken(self, error: Exception) -> None:
        """The run's execution raised what the engine does not expect (its own bug, or a
        hook's): end the run with that error rather than hold it RUNNING for ever."""
        try:
            await self._finish(self._failed(error))
        except _StoreFailure as failure:
            self.worker.store_failed(self.run_id, failure.error)

    def _failed(self, error: BaseException) -> _Outcome:
        status = RunStatus.QUARANTINED if self.workflow.quarantine else RunStatus.FAILED
        return _Outcome(status, error=error_to_data(error))

    def _deadline_error(self) -> DeadlineExceeded:
        return DeadlineExceeded(
            f"run {self.run_id} ({self.workflow.name}) passed its deadline "
            f"({self.workflow.timeout or 'inherited'} s); its work was cancelled",
            run_id=self.run_id)

    def _deadline_hit(self) -> None:
        if self.task is not None and not self.task.done() and not self._closing:
            self._deadline_passed = True
            self.task.cancel("garrison: deadline passed")

    async def _execute_body(self) -> _Outcome:
        left = self.remaining()
        if left is not None and left <= 0:
            return self._failed(self._deadline_error())
        alarm = (asyncio.get_running_loop().call_later(left, self._deadline_hit)
                 if left is not None else None)
        try:
            return await self._run_body()
        finally:
            if alarm is not None:
                alarm.cancel()

    async def _run_body(self) -> _Outcome:
        try:
            if self.run.cancel_requested or self._cancel_at_start:
                return _Outcome(RunStatus.CANCELLED)
            inputs = decode(self.run.inputs)
            result = await self.workflow.fn(self.context, *inputs["args"], **inputs["kwargs"])
            self._closing = True
            await self._flush_buffered()
            if self.nondeterminism is not None:
                raise self.nondeterminism
            what = f"run {self.run_id}: result of workflow {self.workflow.name!r}"
            text, _ = roundtrip(result, what=what)
            return _Outcome(RunStatus.COMPLETED, result=text)
        except (asyncio.CancelledError, SystemExit) as exc:
            aborted = _aborted(exc, f"run {self.run_id}: workflow {self.workflow.name!r}",
                               run_id=self.run_id)
            if aborted is None:
                raise
            return self._body_failed(aborted, exc)
        except Exception as exc:
            return self._body_failed(exc, None)
        finally:
            self._closing = True

    async def _close_branches(self) -> None:
        """Cancel and await every task the body created; none may outlive the body."""
        self._closing = True
        current = asyncio.current_task()
        pending = [t for t in self.branches if t is not current and not t.done()]
        for task in pending:
            task.cancel("garrison: run closing")
        if pending:
            _, stuck = await asyncio.wait(pending, timeout=_CLOSE_TIMEOUT_S)
            if stuck:
                log.error("run.branches_ignore_cancel", run_id=self.run_id,
                          worker=self.worker.worker_id, count=len(stuck))

    async def _finish(self, outcome: _Outcome) -> None:
        error_text = json.dumps(outcome.error) if outcome.error is not None else None
        await self.worker.finish_run(self, outcome.status, outcome.result, error_text)

    async def _park(self) -> None:
        wake_at, events = self._park_plan
        await self._flush_buffered()
        await self.worker.park_run(self, wake_at, events)

    # -- quiescence ----------------------------------------------------------------

    def _activity(self) -> None:
        self.epoch += 1

    def _maybe_park_soon(self) -> None:
        if self._quiescence_scheduled or self._closing or not self.waiters or self.inflight:
            return
        self._quiescence_scheduled = True
        self._quiet_passes = 0
        self._quiet_epoch = self.epoch
        asyncio.get_running_loop().call_soon(self._check_quiescent)

    def _check_quiescent(self) -> None:
        task = self.task
        if (task is None or task.done() or self._closing or not self.waiters
                or self.inflight):
            self._quiescence_scheduled = False
            return
        if self.epoch != self._quiet_epoch:
            self._quiet_epoch = self.epoch
            self._quiet_passes = 0
        else:
            self._quiet_passes += 1
        if self._quiet_passes >= _QUIESCENT_PASSES:
            self._quiescence_scheduled = False
            self._suspending = True
            # Read the waits now: cancelling the tasks unwinds and forgets them.
            waiters = self.waiters.values()
            deadline = [self.run.deadline_at] if self.run.deadline_at is not None else []
            self._park_plan = (  # a run with a deadline wakes up to meet it
                min([w.fire_at for w in waiters if w.fire_at is not None] + deadline,
                    default=None),
                sorted({event for w in waiters for event in w.events}),
            )
            self._closing = True
            task.cancel("garrison: run parked")
            return
        asyncio.get_running_loop().call_soon(self._check_quiescent)

    # -- journal -------------------------------------------------------------------

    def _gate(self) -> None:
        """Every journaled operation starts here: no operation after the body is over,
        none after a divergence was found (even if the workflow code caught it)."""
        if self._closing:
            raise asyncio.CancelledError("garrison: run closing")
        if self.nondeterminism is not None:
            raise self.nondeterminism

    def _entry(self, position: str, kind: StepKind, name: str, arity: int) -> StepRecord | None:
        self._gate()
        entry = self.journal.get(position)
        if entry is None:
            return None
        if entry.kind is not kind or entry.name != name or entry.arity != arity:
            error = NonDeterminismError(
                f"run {self.run_id} position {position}: journal has {entry.kind.value} "
                f"{entry.name!r} ({entry.arity} args), code called {kind.value} {name!r} "
                f"({arity} args). Pin the run to its code version (@app.workflow(version=...)) "
                "or start a new run.",
                run_id=self.run_id, position=position,
                journal=f"{entry.kind.value}:{entry.name}/{entry.arity}",
                code=f"{kind.value}:{name}/{arity}",
            )
            self.nondeterminism = error
            raise error
        return entry

    def _record(self, position: str, kind: StepKind, name: str, status: StepStatus, *,
                started_at: float, arity: int = 0, inputs: str | None = None,
                output: str | None = None, error: str | None = None,
                fire_at: float | None = None, attempts: int = 1) -> StepRecord:
        done = None if status is StepStatus.PENDING else self.worker.clock.time()
        record = StepRecord(
            run_id=self.run_id, position=position, kind=kind, name=name, status=status,
            started_at=started_at, arity=arity, inputs=inputs, output=output, error=error,
            completed_at=done, fire_at=fire_at, attempts=attempts, worker=self.worker.worker_id,
            tenant_id=self.run.tenant_id,
        )
        self.journal[position] = record
        return record

    async def _store(self, write: Any) -> Any:
        """Await one of the engine's own store writes; a failure aborts the run's body."""
        try:
            return await write
        except StoreError as exc:
            raise _StoreFailure(exc) from exc

    async def workflow_write(self, write: Coroutine[Any, Any, T]) -> T:
        """A store write workflow code makes outside the journal (`publish`): the run is
        busy meanwhile (it does not park), and a failure aborts the body like the
        engine's own writes do (workflow code cannot swallow a lost lease)."""
        try:
            self._gate()
        except BaseException:
            write.close()  # never started: nothing to write
            raise
        self.inflight += 1
        self._activity()
        try:
            result: T = await self._store(write)
            return result
        finally:
            self.inflight -= 1
            self._activity()
            self._maybe_park_soon()

    async def _commit(self, record: StepRecord) -> None:
        if self._buffered:
            records, self._buffered = [*self._buffered, record], []
        else:
            records = [record]
        await self._append(records)

    async def _flush_buffered(self) -> None:
        if self._buffered:
            records, self._buffered = self._buffered, []
            await self._append(records)

    async def _append(self, records: list[StepRecord]) -> None:
        """Journal step outcomes. A failed write is tried again a few times (the write is
        idempotent: a finished entry is never rewritten) before the run is abandoned,
        so that a database restart does not make a finished step run a second time."""
        for delay in _APPEND_RETRIES_S:
            try:
                await self.worker.store.append_steps(records)
                return
            except LeaseLostError as exc:
                raise _StoreFailure(exc) from exc
            except StoreError as exc:
                log.warning("run.journal_write_retry", run_id=self.run_id,
                            worker=self.worker.worker_id, delay_s=delay,
                            error=str(exc))
                await asyncio.sleep(delay)
        await self._store(self.worker.store.append_steps(records))

    def journal_value(self, branch: Branch, kind_name: str) -> Any:
        """`ctx.now()` / `uuid()` / `random()`: journaled, committed before the next step."""
        kind = StepKind(kind_name)
        position = branch.next_position()
        entry = self._entry(position, kind, kind_name, 0)
        if entry is not None and entry.output is not None:
            return decode(entry.output)
        value: Any
        if kind is StepKind.NOW:
            value = dt.datetime.fromtimestamp(self.worker.clock.time(), tz=dt.UTC)
        elif kind is StepKind.UUID:
            value = uuid.uuid4()
        else:
            value = random.random()
        text = encode(value)
        self._buffered.append(self._record(position, kind, kind_name, StepStatus.COMPLETED,
                                           started_at=self.worker.clock.time(), output=text))
        return value

    @staticmethod
    def _emit(listeners: tuple[Callable[..., None], ...], *args: Any) -> None:
        """Call an event's hooks outside the workflow branch: a task one creates is not
        a fan-out."""
        if not listeners:
            return
        token = enter_branch(None)
        try:
            for notify in listeners:
                notify(*args)
        finally:
            leave_branch(token)

    # -- steps ---------------------------------------------------------------------

    async def call_step(self, branch: Branch, step: StepDef, args: tuple[Any, ...],
                        kwargs: dict[str, Any]) -> Any:
        position = branch.next_position()
        arity = len(args) + len(kwargs)
        entry = self._entry(position, StepKind.STEP, step.name, arity)
        retrying: StepRecord | None = None
        if entry is not None:
            if entry.status is StepStatus.COMPLETED:
                return decode(entry.output) if entry.output is not None else None
            if entry.status is StepStatus.FAILED and entry.error is not None:
                raise error_from_data(json.loads(entry.error))
            retrying = entry  # PENDING: a journaled retry wait (attempts so far, fire_at)
        where = f"run {self.run_id} step {position} {step.name!r}"
        inputs = encode({"args": list(args), "kwargs": kwargs}, what=f"{where}: arguments")
        self.inflight += 1
        self._activity()
        try:
            await self._flush_buffered()
            return await self._run_step_live(position, step, args, kwargs, arity, inputs, where,
                                             retrying)
        finally:
            self.inflight -= 1
            self._activity()
            self._maybe_park_soon()

    def remaining(self) -> float | None:
        """Seconds left before the run's deadline (None: no deadline)."""
        if self.run.deadline_at is None:
            return None
        return self.run.deadline_at - self.worker.clock.time()

    async def _attempt(self, step: StepDef, args: tuple[Any, ...], kwargs: dict[str, Any],
                       where: str) -> Any:
        """One attempt: through the step's guards, within its timeout and the run's
        deadline (past either, it is cancelled and fails with `DeadlineExceeded`)."""
        async def invoke() -> Any:
            if step.is_async:
                return await step.fn(*args, **kwargs)
            call = functools.partial(step.fn, *args, **kwargs)
            return await asyncio.get_running_loop().run_in_executor(
                self.worker.executor, contextvars.copy_context().run, call)

        limits = [t for t in (step.timeout, self.remaining()) if t is not None]
        limit = min(limits) if limits else None
        if limit is not None and limit <= 0:
            raise DeadlineExceeded(f"{where}: the run's deadline has passed",
                                   run_id=self.run_id, seconds=limit)

        async def bounded() -> Any:
            """The call itself within the time limit: the guards around it (a breaker)
            see a timeout as the call's failure, `DeadlineExceeded`."""
            if limit is None:
                return await invoke()
            scope = asyncio.timeout(limit)
            try:
                async with scope:
                    return await invoke()
            except TimeoutError as exc:
                if not scope.expired():
                    raise  # the step's own timeout, not ours
                raise DeadlineExceeded(
                    f"{where}: attempt cancelled after {limit:.3g} s ("
                    + ("its timeout" if limit == step.timeout else "the run's deadline")
                    + ")", run_id=self.run_id, seconds=limit) from exc

        attempt: Callable[[], Awaitable[Any]] = bounded if limit is not None else invoke
        for guard in reversed(step.guards):
            attempt = functools.partial(guard.call, attempt)
        return await attempt()

    async def _retry_delay(self, step: StepDef, attempt: int, error: Exception,
                           started_at: float, where: str) -> float | None:
        """The wait before the next attempt, or None: no retry. A retry policy that
        raises (a `retry_on` predicate's bug, a retry budget's store down) does not
        retry: the step fails with its own error, and the policy's is logged."""
        if step.retry is None:
            return None
        try:
            elapsed = self.worker.clock.time() - started_at
            delay = step.retry.delay_s(attempt, error, elapsed_s=elapsed)
            admit = getattr(step.retry, "admit", None)
            if delay is not None and callable(admit) and not await admit(error):
                return None  # a shared retry budget is spent
            return delay
        except Exception as exc:
            log.error("step.retry_policy_failed", run_id=self.run_id,
                      worker=self.worker.worker_id, step=step.name, where=where,
                      attempt=attempt, error=f"{type(exc).__qualname__}: {exc}",
                      fix="the step's retry policy (retry_on=, its budget) raised; "
                          "the step fails without a retry until it is fixed")
            return None

    async def _attempt_contained(self, step: StepDef, args: tuple[Any, ...],
                                 kwargs: dict[str, Any], where: str) -> Any:
        """One attempt; what the step's code raises that would stop more than the step
        (a CancelledError nobody asked for, SystemExit) comes out as its failure."""
        try:
            return await self._attempt(step, args, kwargs, where)
        except (asyncio.CancelledError, SystemExit) as exc:
            aborted = _aborted(exc, where)
            if aborted is None:
                raise  # the run is cancelled, parked or shut down: an interruption
            raise aborted from exc

    async def _wait_until(self, position: str, fire_at: float) -> None:
        """A durable timer at `position` (its entry is journaled): the run may park."""
        while self.worker.clock.time() < fire_at:
            future = self._register(position, fire_at)
            try:
                await self._block(future)
            finally:
                self.waiters.pop(position, None)
            self._gate()

    async def _run_step_live(self, position: str, step: StepDef, args: tuple[Any, ...],
                             kwargs: dict[str, Any], arity: int, inputs: str, where: str,
                             retrying: StepRecord | None) -> Any:
        """Attempts of a step. Between attempts the retry wait is journaled (a PENDING
        entry with the attempts made, the next wake-up and the last error), so a crash
        during the backoff resumes the wait and keeps the count."""
        started_at = self.worker.clock.time()
        attempt = 1
        if retrying is not None:
            started_at, attempt = retrying.started_at, retrying.attempts + 1
            await self._wait_until(position, retrying.fire_at or 0.0)
        while True:
            info = StepInfo(self.run_id, position, step.name, attempt, f"{self.run_id}:{position}")
            self._emit(self.worker.hooks.step_started, info)
            began = time.perf_counter()
            deadline = self.run.deadline_at
            tokens = enter_step(info, (deadline, self.worker.clock.time)
                                if deadline is not None else None, self)
            try:
                result = await self._attempt_contained(step, args, kwargs, where)
            except Exception as exc:
                leave_step(tokens)
                try:
                    delay = await self._retry_delay(step, attempt, exc, started_at, where)
                except BaseException as stop:  # cancelled while a retry budget was asked
                    self._emit(self.worker.hooks.step_interrupted, info, stop)
                    raise
                self._emit(self.worker.hooks.step_failed, info, exc, delay is not None)
                if delay is not None:
                    log.info("step.retry_scheduled", run_id=self.run_id,
                             worker=self.worker.worker_id, position=position,
                             step=step.name, attempt=attempt + 1, delay_s=delay)
                    fire_at = self.worker.clock.time() + max(0.0, delay)
                    await self._commit(self._record(
                        position, StepKind.STEP, step.name, StepStatus.PENDING,
                        started_at=started_at, arity=arity, inputs=inputs,
                        error=json.dumps(error_to_data(exc)), fire_at=fire_at,
                        attempts=attempt))
                    await self._wait_until(position, fire_at)
                    attempt += 1
                    continue
                data = error_to_data(exc)
                record = self._record(position, StepKind.STEP, step.name, StepStatus.FAILED,
                                      started_at=started_at, arity=arity, inputs=inputs,
                                      error=json.dumps(data), attempts=attempt)
                await self._commit(record)
                self._emit(self.worker.hooks.step_committed, info)
                # What the workflow sees now is what a replay will see: the journaled error.
                raise error_from_data(data) from exc
            except BaseException as exc:
                leave_step(tokens)  # cancelled (timeout, run cancel): the branch goes on
                self._emit(self.worker.hooks.step_interrupted, info, exc)
                raise
            leave_step(tokens)
            took = time.perf_counter() - began
            try:
                output, value = roundtrip(result, what=f"{where}: result")
            except SerializationError as exc:  # journaled FAILED: reported as a failure
                self._emit(self.worker.hooks.step_failed, info, exc, False)
                record = self._record(position, StepKind.STEP, step.name, StepStatus.FAILED,
                                      started_at=started_at, arity=arity, inputs=inputs,
                                      error=json.dumps(error_to_data(exc)), attempts=attempt)
                await self._commit(record)
                self._emit(self.worker.hooks.step_committed, info)
                raise
            self._emit(self.worker.hooks.step_completed, info, took)
            succeeded = getattr(step.retry, "succeeded", None)
            if callable(succeeded):
                succeeded(attempt)  # e.g. refund a retry budget
            record = self._record(position, StepKind.STEP, step.name, StepStatus.COMPLETED,
                                  started_at=started_at, arity=arity, inputs=inputs,
                                  output=output, attempts=attempt)
            await self._commit(record)
            self._emit(self.worker.hooks.step_committed, info)
            return value

    # -- waits ---------------------------------------------------------------------

    def _register(self, position: str, fire_at: float | None, events: tuple[str, ...] = ()
                  ) -> asyncio.Future[None]:
        """Register a wait *before* looking for what it waits for, so a delivery that
        lands in between is not lost."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters[position] = _Waiter(position, future, fire_at, events)
        if fire_at is not None and position not in self._timers:
            self._timers.add(position)
            self.worker.schedule_timer(self.run_id, position, fire_at)
        return future

    async def _block(self, future: asyncio.Future[None]) -> None:
        """Wait outside the in-flight count, so the run may park meanwhile."""
        self.inflight -= 1
        self._activity()
        self._maybe_park_soon()
        try:
            await future
        finally:
            self.inflight += 1

    def fire(self, position: str) -> None:
        """A timer came due while this run is live."""
        waiter = self.waiters.get(position)
        if waiter is not None and not waiter.future.done() and not self._closing:
            waiter.future.set_result(None)
            self._activity()

    def deliver(self, event: str | None = None) -> None:
        """An event arrived (or might have, from another process): let its waiters look."""
        if self._closing:
            return
        for waiter in list(self.waiters.values()):
            wanted = bool(waiter.events) and (event is None or event in waiter.events)
            if wanted and not waiter.future.done():
                waiter.future.set_result(None)
                self._activity()

    async def sleep(self, branch: Branch, seconds: float) -> None:
        position = branch.next_position()
        entry = self._entry(position, StepKind.SLEEP, "sleep", 0)
        if entry is not None and entry.status is StepStatus.COMPLETED:
            return
        clock = self.worker.clock
        self.inflight += 1
        self._activity()
        try:
            if entry is None:
                started = clock.time()
                entry = self._record(position, StepKind.SLEEP, "sleep", StepStatus.PENDING,
                                     started_at=started, fire_at=started + max(seconds, 0.0))
                await self._commit(entry)
            fire_at = entry.fire_at or 0.0
            await self._wait_until(position, fire_at)
            await self._commit(self._record(position, StepKind.SLEEP, "sleep",
                                            StepStatus.COMPLETED, started_at=entry.started_at,
                                            fire_at=fire_at))
        finally:
            self.inflight -= 1
            self._activity()
            self._maybe_park_soon()

    async def wait_for(self, branch: Branch, name: str, timeout: float | None,
                       default: Any) -> Any:
        return await self._wait_event(branch.next_position(), StepKind.WAIT, name, name,
                                      timeout, default)

    async def _wait_event(self, position: str, kind: StepKind, name: str, event: str,
                          timeout: float | None, default: Any) -> Any:
        entry = self._entry(position, kind, name, 0)
        if entry is not None and entry.status is StepStatus.COMPLETED:
            return decode(entry.output) if entry.output is not None else default
        clock = self.worker.clock
        store = self.worker.store
        persisted = entry is not None
        self.inflight += 1
        self._activity()
        try:
            await self._flush_buffered()
            if entry is None:
                started = clock.time()
                deadline = started + timeout if timeout is not None else None
                entry = self._record(position, kind, name, StepStatus.PENDING,
                                     started_at=started, fire_at=deadline)
            while True:
                future = self._register(position, entry.fire_at, (event,))
                try:
                    attempt = dataclasses.replace(entry, completed_at=clock.time())
                    taken = await self._store(store.consume_event(self.run_id, event, attempt))
                    if taken is not None:
                        self.journal[position] = taken
                        assert taken.output is not None
                        return decode(taken.output)
                    if kind is StepKind.CHILD_RESULT:
                        ended = await self._child_already_reported(position, entry, name)
                        if ended is not None:
                            return ended
                    if entry.fire_at is not None and clock.time() >= entry.fire_at:
                        done = self._record(position, kind, name, StepStatus.COMPLETED,
                                            started_at=entry.started_at, fire_at=entry.fire_at)
                        await self._commit(done)
                        return default
                    if not persisted:
                        await self._commit(entry)  # the deadline must survive a crash
                        persisted = True
                    await self._block(future)
                finally:
                    self.waiters.pop(position, None)
                self._gate()
        finally:
            self.inflight -= 1
            self._activity()
            self._maybe_park_soon()

    # -- children ------------------------------------------------------------------

    async def start_child(self, branch: Branch, workflow: Any, args: tuple[Any, ...],
                          kwargs: dict[str, Any], run_id: str | None) -> RunHandle[Any]:
        definition = self.worker.app.workflow_definition(workflow)
        position = branch.next_position()
        entry = self._entry(position, StepKind.CHILD, definition.name, len(args) + len(kwargs))
        if entry is not None and entry.output is not None:
            return RunHandle(self.worker.app, decode(entry.output), parent_run_id=self.run_id)
        # "/" never occurs in a position, so "a" at "1.2" and "a/1" at "2" cannot collide.
        child_id = run_id or f"{self.run_id}/{position}"
        self.inflight += 1
        self._activity()
        try:
            await self._flush_buffered()
            now = self.worker.clock.time()
            app = self.worker.app
            queue = app.queues[DEFAULT_QUEUE]
            local = self.worker.reserve(queue)
            try:
                child = app.new_run_record(definition, child_id, args, kwargs,
                                           parent=(self.run_id, position), now=now,
                                           options=StartOptions(queue), local=local,
                                           deadline_at=self.run.deadline_at)
                record = self._record(position, StepKind.CHILD, definition.name,
                                      StepStatus.COMPLETED, started_at=now,
                                      arity=len(args) + len(kwargs), output=encode(child_id))
                stored, created = await self.worker.store.create_child_run(child, record)
            except StoreError as exc:
                raise _StoreFailure(exc) from exc
            except Exception:
                self.journal.pop(position, None)  # refused (a conflict): nothing journaled
                raise
            finally:
                if local:
                    self.worker.unreserve()
            if created and stored.owner == self.worker.worker_id:
                self.worker.launch(stored, definition, journal=())
            elif created:
                self.worker.poke()  # queued: claimed by whichever worker has room
            return RunHandle(self.worker.app, child_id, parent_run_id=self.run_id)
        finally:
            self.inflight -= 1
            self._activity()
            self._maybe_park_soon()

    async def _child_already_reported(self, position: str, entry: StepRecord,
                                      child_run_id: str) -> Any:
        """A child's end is one mailbox event; a second await of its result reads the run."""
        child = await self._store(self.worker.store.get_run(child_run_id))
        if child is None or not child.status.is_terminal:
            return None
        payload = json.dumps({"status": child.status.value, "result": child.result,
                              "error": json.loads(child.error) if child.error else None})
        done = self._record(position, entry.kind, entry.name, StepStatus.COMPLETED,
                            started_at=entry.started_at, output=payload)
        await self._commit(done)
        return decode(payload)

    async def first_ended(self, branch: Branch, child_run_ids: Sequence[str],
                          timeout: float | None) -> dict[str, Any] | None:
        """Durably wait until one of these children ends; journaled (which one ended and
        how), so a replay sees the same one. None on `timeout`. Each child's end is
        consumed once: a later wait on the same child would wait forever."""
        position = branch.next_position()
        kind, name = StepKind.CHILD_RESULT, "first_ended"
        entry = self._entry(position, kind, name, len(child_run_ids))
        if entry is not None and entry.status is StepStatus.COMPLETED:
            return json.loads(entry.output) if entry.output is not None else None
        events = tuple(child_event_name(c) for c in child_run_ids)
        clock = self.worker.clock
        self.inflight += 1
        self._activity()
        try:
            await self._flush_buffered()
            if entry is None:
                started = clock.time()
                entry = self._record(position, kind, name, StepStatus.PENDING,
                                     started_at=started, arity=len(child_run_ids),
                                     fire_at=started + timeout if timeout is not None else None)
                await self._commit(entry)  # its deadline must survive a crash
            while True:
                future = self._register(position, entry.fire_at, events)
                try:
                    for event in events:
                        attempt = dataclasses.replace(entry, completed_at=clock.time())
                        taken = await self._store(self.worker.store.consume_event(
                            self.run_id, event, attempt))
                        if taken is not None:
                            self.journal[position] = taken
                            assert taken.output is not None
                            ended: dict[str, Any] = json.loads(taken.output)
                            return ended
                    if entry.fire_at is not None and clock.time() >= entry.fire_at:
                        await self._commit(self._record(
                            position, kind, name, StepStatus.COMPLETED, arity=entry.arity,
                            started_at=entry.started_at, fire_at=entry.fire_at))
                        return None
                    await self._block(future)
                finally:
                    self.waiters.pop(position, None)
                self._gate()
        finally:
            self.inflight -= 1
            self._activity()
            self._maybe_park_soon()

    async def child_result(self, branch: Branch, child_run_id: str,
                           timeout: float | None = None) -> Any:
        """Durably wait for a child run's end; return its result or raise its failure."""
        position = branch.next_position()
        payload = await self._wait_event(position, StepKind.CHILD_RESULT, child_run_id,
                                         child_event_name(child_run_id), timeout, _TIMED_OUT)
        if payload is _TIMED_OUT or payload is None:
            raise ResultTimeoutError(
                f"run {self.run_id}: child run {child_run_id} did not end within {timeout} s "
                "(a durable deadline); it goes on running",
                run_id=child_run_id,
            )
        status = RunStatus(payload["status"])
        if status is RunStatus.COMPLETED:
            return decode(payload["result"]) if payload.get("result") is not None else None
        if status is RunStatus.CANCELLED:
            raise WorkflowCancelled(f"child run {child_run_id} was cancelled",
                                    run_id=child_run_id)
        error = payload.get("error") or {}
        raise WorkflowFailed(
            f"child run {child_run_id} failed: {error.get('type')}: {error.get('message')}",
            run_id=child_run_id, error_type=error.get("type"),
            error_message=error.get("message"), traceback=error.get("traceback"),
        )
