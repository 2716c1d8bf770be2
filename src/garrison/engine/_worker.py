"""The in-process worker: owns live runs, fires timers, wakes and recovers runs.

Every run task is owned here and awaited at shutdown. A shutdown leaves unfinished runs
RUNNING in the store; the next start resumes them (as after a crash).
"""

from __future__ import annotations

import asyncio
import contextvars
import heapq
import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from garrison._log import get_logger
from garrison.engine._clock import Clock
from garrison.engine._context import enter_branch
from garrison.engine._execution import RunExecution, child_event_name
from garrison.engine._hooks import EngineHooks
from garrison.engine._registry import WorkflowDef
from garrison.errors import StoreError
from garrison.store import EventRecord, RunRecord, RunStatus, StepRecord, Store

if TYPE_CHECKING:
    from garrison.engine._app import Garrison

__all__ = ["Worker"]

log = get_logger(__name__)

_RETRY_BASE_S = 0.5
_RETRY_CAP_S = 30.0
# At most this many orphaned runs are listed in memory (`garrison runs list --orphaned`
# shows them all).
_ORPHAN_REPORT_LIMIT = 10_000
# How long stopping waits for run tasks to unwind after their cancellation.
_STOP_TIMEOUT_S = 10.0


class Worker:
    """Executes this process's runs. Created and owned by `Garrison`."""

    def __init__(self, app: Garrison, store: Store, clock: Clock, hooks: Sequence[EngineHooks],
                 worker_id: str, poll_interval_s: float, sync_step_threads: int) -> None:
        self.app = app
        self.store = store
        self.clock = clock
        self.hooks = tuple(hooks)
        self.worker_id = worker_id
        self.poll_interval_s = poll_interval_s
        self.executor = ThreadPoolExecutor(max_workers=sync_step_threads,
                                           thread_name_prefix="garrison-step")
        self.live: dict[str, RunExecution] = {}
        self.orphaned: dict[str, RunRecord] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._timers: list[tuple[float, str, str]] = []
        self._retry_at: dict[str, tuple[float, int]] = {}
        self._store_failures: dict[str, int] = {}
        self._stopping = False
        self._poke = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._result_waiters: dict[str, list[asyncio.Future[None]]] = {}

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        await self.store.register_worker(self.worker_id)
        await self.recover()
        self._loop_task = self._spawn(self._loop(), name="garrison-worker")
        subscribe = getattr(self.clock, "subscribe", None)
        if callable(subscribe):
            subscribe(self.poke)

    async def stop(self) -> None:
        # The flag ends the loop even if a cancellation is lost: on Python 3.11 a cancel
        # that lands as asyncio.timeout() expires can be swallowed (fixed in 3.12).
        self._stopping = True
        self.poke()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel("garrison: worker stopping")
        if tasks:
            _, stuck = await asyncio.wait(tasks, timeout=_STOP_TIMEOUT_S)
            for task in stuck:
                log.error("worker.task_ignores_stop", task=task.get_name())
        self.live.clear()
        self.executor.shutdown(wait=False, cancel_futures=True)

    def _spawn(self, coro: object, *, name: str) -> asyncio.Task[None]:
        # A fresh context without any workflow branch, so the task factory does not
        # number this task as a branch of whichever run happens to be creating it.
        context = contextvars.copy_context()
        context.run(enter_branch, None)
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(
            coro, name=name, context=context  # type: ignore[arg-type]  # a coroutine
        )
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            error = task.exception()
            log.error("worker.task_crashed", task=task.get_name(), error=repr(error))

    def poke(self) -> None:
        """Wake the worker loop now (a timer moved, a run became due)."""
        self._poke.set()

    # -- launching -----------------------------------------------------------------

    def launch(self, run: RunRecord, definition: WorkflowDef,
               journal: Sequence[StepRecord] | None) -> None:
        """Start executing `run` here unless it already is. `journal=None` loads it."""
        if run.run_id in self.live:
            return
        execution = RunExecution(self, run, definition, journal or ())
        self.live[run.run_id] = execution
        execution.task = self._spawn(self._execute(execution, journal is None),
                                     name=f"garrison-run:{run.run_id}")

    async def _execute(self, execution: RunExecution, load: bool) -> None:
        run = execution.run
        try:
            if load:
                entries = await self.store.load_journal(run.run_id)
                execution.journal = {e.position: e for e in entries}
                if run.status is not RunStatus.RUNNING:
                    await self.store.set_run_status(run.run_id, RunStatus.RUNNING,
                                                    owner=self.worker_id)
                for hook in self.hooks:
                    hook.run_resumed(run, len(entries))
                log.debug("run.resumed", run_id=run.run_id, workflow=run.workflow_name,
                         journal_entries=len(entries))
            else:
                for hook in self.hooks:
                    hook.run_started(run)
            await execution.drive()
        except StoreError as exc:
            log.error("run.store_error", run_id=run.run_id, error=str(exc))
            self.retry_later(run.run_id)
        finally:
            if self.live.get(run.run_id) is execution:
                del self.live[run.run_id]

    def resume(self, run: RunRecord) -> bool:
        """Resume a stored run if this process has its workflow version; else report it."""
        if run.run_id in self.live:
            return True
        definition = self.app.registry.workflow(run.workflow_name, run.workflow_version)
        if definition is None:
            if run.run_id not in self.orphaned:
                log.warning("run.orphaned", run_id=run.run_id, workflow=run.workflow_name,
                            version=run.workflow_version)
            self.orphaned[run.run_id] = run
            return False
        self.orphaned.pop(run.run_id, None)
        self.launch(run, definition, None)
        return True

    async def recover(self) -> None:
        """Resume every unfinished run this process can run, and every due parked run;
        report unfinished runs of workflow versions not registered here (orphaned)."""
        registered = list(self.app.registry.workflows)
        for run in await self.store.recoverable_runs(workflows=registered):
            if run.cancel_requested:
                await self.app.cancel(run.run_id)
            else:
                self.resume(run)
        registry = self.app.registry
        unfinished = [s for s in RunStatus if not s.is_terminal]
        for run in await self.store.list_runs(statuses=unfinished, limit=_ORPHAN_REPORT_LIMIT):
            if registry.workflow(run.workflow_name, run.workflow_version) is None:
                self.resume(run)  # records and logs it as orphaned; runs nothing
        await self._wake_due()

    def retry_later(self, run_id: str) -> None:
        """The store failed under this run: drop it from memory, resume it after a backoff
        that doubles (0.5 s to 30 s) until the run parks or finishes."""
        self.live.pop(run_id, None)
        attempts = self._store_failures.get(run_id, 0)
        delay = min(_RETRY_CAP_S, _RETRY_BASE_S * 2**attempts)
        self._store_failures[run_id] = attempts + 1
        self._retry_at[run_id] = (self.clock.time() + delay, attempts + 1)
        log.warning("run.retry_scheduled", run_id=run_id, delay_s=delay)

    # -- timers and wake-ups -------------------------------------------------------

    def schedule_timer(self, run_id: str, position: str, fire_at: float) -> None:
        heapq.heappush(self._timers, (fire_at, run_id, position))
        if self._timers[0][0] == fire_at:
            self.poke()

    def _fire_due_timers(self, now: float) -> None:
        while self._timers and self._timers[0][0] <= now:
            _, run_id, position = heapq.heappop(self._timers)
            execution = self.live.get(run_id)
            if execution is not None:
                execution.fire(position)

    async def _wake_due(self) -> None:
        registered = list(self.app.registry.workflows)
        for run in await self.store.due_runs(self.clock.time(), workflows=registered):
            if run.run_id not in self.live:
                if run.cancel_requested:
                    await self.app.cancel(run.run_id)
                else:
                    self.resume(run)

    async def _retry_due(self, now: float) -> None:
        for run_id, (at, _) in list(self._retry_at.items()):
            if at <= now and run_id not in self.live:
                run = await self.store.get_run(run_id)
                if run is None or run.status.is_terminal or self.resume(run):
                    del self._retry_at[run_id]

    async def _foreign_changes(self) -> None:
        """Another process wrote: new runs, events for live runs, cancellations."""
        registered = list(self.app.registry.workflows)
        for run in await self.store.recoverable_runs(workflows=registered):
            if run.run_id in self.live:
                if run.cancel_requested:
                    self.live[run.run_id].cancel()
            elif run.status is RunStatus.PENDING:
                self.resume(run)
        for execution in list(self.live.values()):
            execution.deliver(None)

    async def _loop(self) -> None:
        while not self._stopping:
            try:
                now = self.clock.time()
                self._fire_due_timers(now)
                await self._wake_due()
                if self._retry_at:
                    await self._retry_due(now)
                if await self.store.changed():
                    await self._foreign_changes()
            except StoreError as exc:
                log.error("worker.poll_failed", error=str(exc))
            timeout = self.poll_interval_s
            if self._timers:
                timeout = max(0.0, min(timeout, self._timers[0][0] - self.clock.time()))
            self._poke.clear()
            # A timer that pokes, rather than asyncio.timeout(): no cancellation involved.
            alarm = asyncio.get_running_loop().call_later(timeout, self._poke.set)
            try:
                await self._poke.wait()
            finally:
                alarm.cancel()

    # -- run ends ------------------------------------------------------------------

    async def park_run(self, execution: RunExecution, wake_at: float | None,
                       events: Sequence[str]) -> None:
        await self.store.park_run(execution.run_id, wake_at, events, now=self.clock.time())
        self._store_failures.pop(execution.run_id, None)
        if self.live.get(execution.run_id) is execution:
            del self.live[execution.run_id]
        for hook in self.hooks:
            hook.run_parked(execution.run_id, wake_at)
        if wake_at is not None and wake_at <= self.clock.time():
            self.poke()

    async def finish_run(self, execution: RunExecution, status: RunStatus,
                         result: str | None, error: str | None) -> None:
        run = execution.run
        await self.finish_stored(run, status, result, error)
        if self.live.get(run.run_id) is execution:
            del self.live[run.run_id]

    async def finish_stored(self, run: RunRecord, status: RunStatus, result: str | None,
                            error: str | None) -> bool:
        """End a run durably (once), tell its parent, wake result waiters, cascade cancels."""
        notify = None
        now = self.clock.time()
        if run.parent_run_id is not None:
            payload = {"status": status.value, "result": result,
                       "error": json.loads(error) if error else None}
            notify = EventRecord(run_id=run.parent_run_id, seq=0,
                                 name=child_event_name(run.run_id),
                                 payload=json.dumps(payload), sent_at=now)
        changed = await self.store.finish_run(run.run_id, status, result=result, error=error,
                                              completed_at=now, notify=notify)
        self._store_failures.pop(run.run_id, None)
        if not changed:
            return False
        log.debug("run.finished", run_id=run.run_id, status=status.value)
        for hook in self.hooks:
            hook.run_finished(run.run_id, status)
        for future in self._result_waiters.pop(run.run_id, []):
            if not future.done():
                future.set_result(None)
        if notify is not None:
            self.notify_event(notify.run_id, notify.name)
        if status is RunStatus.CANCELLED:
            for child in await self.store.list_runs(parent_run_id=run.run_id, limit=10_000):
                if not child.status.is_terminal:
                    await self.app.cancel(child.run_id)
        return True

    def notify_event(self, run_id: str, name: str) -> None:
        """An event was queued for `run_id` in this process: deliver or wake."""
        execution = self.live.get(run_id)
        if execution is not None:
            execution.deliver(name)
        else:
            self.poke()

    def result_waiter(self, run_id: str) -> asyncio.Future[None]:
        """A future resolved when `run_id` ends in this process."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters = [f for f in self._result_waiters.get(run_id, []) if not f.done()]
        waiters.append(future)
        self._result_waiters[run_id] = waiters
        return future
