"""The in-process worker: claims runs, owns the live ones, keeps their leases, fires timers.

A worker executes only runs it has claimed in the store (see `store._claims`): new runs
of the queues it takes, parked runs whose wake-up came, and runs whose last worker died
(lease ran out) or handed them back. A heartbeat renews its leases; a run whose lease is
found lost is dropped at once (its new owner has it, and the store would refuse any
write of ours). On stop it claims nothing more, lets in-flight runs finish or park for
a grace period, and hands the rest back so that another worker resumes them at once.
"""

from __future__ import annotations

import asyncio
import contextvars
import heapq
import json
import traceback
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from garrison._log import get_logger
from garrison.engine._clock import Clock
from garrison.engine._codec import error_text
from garrison.engine._context import enter_branch
from garrison.engine._execution import RunExecution, child_event_name
from garrison.engine._hooks import EngineHooks, HookSet
from garrison.engine._queues import Queue
from garrison.engine._registry import WorkflowDef
from garrison.errors import LeaseLostError, StoreError
from garrison.store import Changes, EventRecord, RunRecord, RunStatus, StepRecord, Store

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
# Runs claimed per due claim when the worker has no concurrency limit.
_DUE_BATCH = 200


class Worker:
    """Executes this process's runs. Created and owned by `Garrison`."""

    def __init__(self, app: Garrison, store: Store, clock: Clock, hooks: Sequence[EngineHooks],
                 worker_id: str, poll_interval_s: float, sync_step_threads: int) -> None:
        self.app = app
        self.store = store
        self.clock = clock
        self.hooks = HookSet(hooks)
        self.worker_id = worker_id
        self.poll_interval_s = poll_interval_s
        self.executor = ThreadPoolExecutor(max_workers=sync_step_threads,
                                           thread_name_prefix="garrison-step")
        self.live: dict[str, RunExecution] = {}
        self.orphaned: dict[str, RunRecord] = {}
        self.claims = 0  # claim round trips made (tests and benchmarks read it)
        self._tasks: set[asyncio.Task[None]] = set()
        self._runs: set[asyncio.Task[None]] = set()
        self._timers: list[tuple[float, str, str]] = []
        self._wake_hints: list[float] = []
        self._reserved = 0  # slots promised to runs being created or claimed
        self._bursts: dict[str, float] = {}  # rate-limited queue -> last claim that took
        self._retry_at: dict[str, tuple[float, int]] = {}
        self._store_failures: dict[str, int] = {}
        self._stopping = False
        # Each run's latest execution task here, until it ends (also once out of `live`).
        self._run_tasks: dict[str, asyncio.Task[None]] = {}
        self._claiming = True
        self._poke = asyncio.Event()
        self._claim_due = True
        self._claim_new = False  # a queue was notified: claim new runs only
        self._next_claim_at = 0.0
        self._loop_task: asyncio.Task[None] | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._result_waiters: dict[str, list[asyncio.Future[None]]] = {}

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        await self.store.register_worker(self.worker_id, lease_ttl_s=self.app.lease_ttl_s)
        await self._report_orphans()
        await self.app.follow_breakers()
        await self._claim()
        self._loop_task = self._spawn(self._loop(), name="garrison-worker")
        self._heartbeat_task = self._spawn(self._heartbeat(), name="garrison-heartbeat")
        subscribe = getattr(self.clock, "subscribe", None)
        if callable(subscribe):
            subscribe(self.poke)

    async def stop(self, grace_s: float = 0.0) -> None:
        """Claim nothing more; give live runs `grace_s` to finish or park; hand back the
        rest (their leases released: another worker resumes them at once)."""
        self._claiming = False
        runs = [t for t in self._runs if not t.done()]
        if grace_s > 0 and runs:
            log.info("worker.draining", worker=self.worker_id, runs=len(runs), grace_s=grace_s)
            await asyncio.wait(runs, timeout=grace_s)
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
                log.error("worker.task_ignores_stop", worker=self.worker_id, task=task.get_name())
        self.live.clear()
        # Everything this worker owns: runs stopped just now, runs waiting for a retry,
        # runs whose task died, and runs a claim in flight at the stop commits first.
        # This process runs none of them any more.
        known = len(self.store.held())
        try:
            await self.store.release_runs(None)
            if known:
                log.info("worker.handed_back", worker=self.worker_id, runs=known)
        except StoreError as exc:  # their leases run out instead
            log.warning("worker.hand_back_failed", worker=self.worker_id, runs=known,
                        error=str(exc))
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
        self._runs.discard(task)
        if not task.cancelled() and task.exception() is not None:
            error = task.exception()
            log.error("worker.task_crashed", worker=self.worker_id, task=task.get_name(),
                      error=repr(error))
        if not self._stopping:
            self.poke()  # a slot is free

    def poke(self) -> None:
        """Wake the worker loop now and let it claim (a run was queued, a timer moved)."""
        self._claim_due = True
        self._poke.set()

    # -- what this worker takes ----------------------------------------------------

    @property
    def queues(self) -> list[Queue]:
        served = self.app.served_queues
        return [q for name, q in self.app.queues.items() if served is None or name in served]

    def _live_in(self, queue: str) -> int:
        return sum(1 for e in self.live.values() if e.run.queue == queue)

    def _room(self) -> int:
        limit = self.app.concurrency
        if limit is None:
            return _DUE_BATCH
        return max(0, limit - len(self.live) - self._reserved)

    def reserve(self, queue: Queue) -> bool:
        """Reserve a slot for a run this process starts in `queue`, to claim it at its
        creation (no limits on the queue, this worker takes it, and has room). The
        caller `unreserve`s once the run is created (and launched) or not."""
        served = self.app.served_queues
        if (queue.unlimited and self._claiming and self._room() > 0
                and (served is None or queue.name in served)):
            self._reserved += 1
            return True
        return False

    def unreserve(self) -> None:
        self._reserved -= 1

    # -- launching -----------------------------------------------------------------

    def launch(self, run: RunRecord, definition: WorkflowDef,
               journal: Sequence[StepRecord] | None, *, first: bool = False) -> None:
        """Start executing a claimed `run` here unless it already is. `journal=None`
        loads it; `first`: the run's first execution all the same (a fork, created with
        the entries it reuses), announced as started, not resumed."""
        if run.run_id in self.live:
            return
        previous = self._run_tasks.get(run.run_id)
        if previous is not None and not previous.done():
            # Claimed back (its lease was lost, as after a stalled loop) while the last
            # execution here still unwinds: one execution of a run at a time in a
            # process, so hooks, logs and the journal never see two interleaved.
            previous.add_done_callback(
                lambda _: None if self._stopping else self.launch(
                    run, definition, journal, first=first))
            return
        execution = RunExecution(self, run, definition, journal or ())
        self.live[run.run_id] = execution
        execution.task = self._spawn(
            self._execute(execution, journal is None, first=first or journal is not None),
            name=f"garrison-run:{run.run_id}")
        self._runs.add(execution.task)
        self._run_tasks[run.run_id] = execution.task
        # However the task ends (even cancelled before it ran), the run leaves `live`.
        execution.task.add_done_callback(lambda _: self._forget_live(execution))

    def _forget_live(self, execution: RunExecution) -> None:
        if self.live.get(execution.run_id) is execution:
            del self.live[execution.run_id]
        if self._run_tasks.get(execution.run_id) is execution.task:
            del self._run_tasks[execution.run_id]

    async def _execute(self, execution: RunExecution, load: bool, *, first: bool) -> None:
        run = execution.run
        announced = False
        try:
            if load:
                entries = await self.store.load_journal(run.run_id)
                execution.journal = {e.position: e for e in entries}
            if not first:  # (then the journal was loaded)
                announced = True
                for on_resumed in self.hooks.run_resumed:
                    on_resumed(run, len(execution.journal))
                log.debug("run.resumed", worker=self.worker_id, run_id=run.run_id,
                          workflow=run.workflow_name, journal_entries=len(execution.journal),
                          fence=run.fence, claim_reason=run.claim_reason,
                          previous_owner=run.previous_owner)
            else:
                announced = True
                for on_started in self.hooks.run_started:
                    on_started(run)
            await execution.drive()
        except StoreError as exc:
            self.store_failed(run.run_id, exc)
        except Exception as exc:  # never a run held RUNNING for ever by an error here
            log.error("run.engine_error", worker=self.worker_id, run_id=run.run_id,
                      error_type=type(exc).__qualname__, error=error_text(exc),
                      exc_info=exc, fix="the run ends with this error (a bug in Garrison "
                      "or in a hook: please report it); redrive it once fixed")
            try:
                await execution.end_broken(exc)
            except StoreError as store_error:
                self.store_failed(run.run_id, store_error)
        finally:
            if announced:
                for on_detached in self.hooks.run_detached:
                    on_detached(run.run_id)
        # The run leaves `live` in the task's done callback (`_forget_live`), however the
        # task ended.

    def store_failed(self, run_id: str, error: StoreError) -> None:
        """A write for `run_id` failed: if the lease is gone, the run is someone else's
        now (drop it); otherwise retry after a backoff."""
        if isinstance(error, LeaseLostError):
            log.warning("run.lease_lost", worker=self.worker_id, run_id=run_id, error=str(error))
            for on_lease_lost in self.hooks.lease_lost:
                on_lease_lost(run_id)
            self.live.pop(run_id, None)
            self.store.forget(run_id)
            return
        log.error("run.store_error", worker=self.worker_id, run_id=run_id, error=str(error))
        self.retry_later(run_id)

    def _adopt(self, run: RunRecord, *, fresh: bool = False) -> None:
        """A run this worker just claimed: resume it (or end it, if cancelled). `fresh`:
        a PENDING run claimed for the first time (fence 1), which has no journal yet."""
        definition = self.app.registry.workflow(run.workflow_name, run.workflow_version)
        if definition is None:  # filtered out by the claim; only a racing registration
            self.store.forget(run.run_id)
            return
        if run.cancel_requested and run.run_id not in self.live:
            self._spawn(self._cancel_claimed(run), name=f"garrison-cancel:{run.run_id}")
            return
        # A fresh claim has no journal to load, unless the run is a fork (app.fork):
        # it was created with the entries it reuses.
        first = fresh and run.fence == 1
        self.launch(run, definition, () if first and run.forked_from is None else None,
                    first=first)

    async def _cancel_claimed(self, run: RunRecord) -> None:
        try:
            await self.finish_stored(run, RunStatus.CANCELLED, None, None)
        except StoreError as exc:
            self.store_failed(run.run_id, exc)

    async def _report_orphans(self) -> None:
        """Log and list unfinished runs of workflow versions not registered here."""
        registry = self.app.registry
        unfinished = [s for s in RunStatus if not s.is_terminal]
        for run in await self.store.list_runs(statuses=unfinished, limit=_ORPHAN_REPORT_LIMIT):
            if registry.workflow(run.workflow_name, run.workflow_version) is None:
                if run.run_id not in self.orphaned:
                    log.warning("run.orphaned", worker=self.worker_id, run_id=run.run_id,
                                workflow=run.workflow_name, version=run.workflow_version)
                self.orphaned[run.run_id] = run

    async def _claim(self, *, due: bool = True) -> None:
        """Claim what is due (unless `due` is False), then new runs of each queue this
        worker takes, within room."""
        if not self._claiming:
            return
        registered = list(self.app.registry.workflows)
        served = self.app.served_queues
        self._claim_new = False
        if due:
            self._claim_due = False
            self._next_claim_at = self.clock.time() + self.app.claim_interval_s
            await self._claim_woken(registered, served)
        for queue in self.queues:
            slots = self._room()
            if queue.worker_concurrency is not None:
                slots = min(slots, queue.worker_concurrency - self._live_in(queue.name))
            if slots <= 0 or not self._claiming:
                continue
            self._reserved += slots  # no start takes these slots while the claim is out
            try:
                taken = await self.store.claim_queued(queue.limits, slots,
                                                      workflows=registered)
            finally:
                self._reserved -= slots
            self.claims += 1
            for run in taken:
                self._adopt(run, fresh=True)
            if len(taken) >= slots:
                self._claim_new = True  # more may be queued
            if queue.rate_limit is not None:
                self._pace(queue.name, queue.rate_limit, bool(taken))

    def _pace(self, queue: str, rate_limit: tuple[int, float], took: bool) -> None:
        """A rate-limited queue in a burst: look again as soon as a start may have left
        the window (every seconds/n), until two windows pass without a claim."""
        count, seconds = rate_limit
        now = self.clock.time()
        if took:
            self._bursts[queue] = now
        if now - self._bursts.get(queue, -seconds * 3) <= 2 * seconds:
            heapq.heappush(self._wake_hints, now + seconds / count)

    async def _claim_woken(self, registered: list[tuple[str, str]],
                           served: list[str] | None) -> None:
        """Claim due, abandoned and cancelled runs."""
        # Due runs: a queue with a per-worker cap is claimed on its own, within the cap.
        capped = [q for q in self.queues if q.worker_concurrency is not None]
        rounds: list[tuple[list[str] | None, int | None]] = [(served, None)]
        if capped:
            rounds = [([q.name for q in self.queues if q.worker_concurrency is None], None)]
            rounds += [([q.name], q.worker_concurrency) for q in capped]
        for queues, cap in rounds:
            if queues is not None and not queues:
                continue
            room = self._room()
            if cap is not None and queues:
                room = min(room, cap - self._live_in(queues[0]))
            if room <= 0:
                continue
            self._reserved += room
            try:
                due = await self.store.claim_due(now=self.clock.time(), queues=queues,
                                                 workflows=registered, limit=room)
            finally:
                self._reserved -= room
            self.claims += 1
            for run in due:
                self._adopt(run)
            if len(due) >= min(room, _DUE_BATCH):
                self._claim_due = True  # more may be waiting

    def retry_later(self, run_id: str) -> None:
        """The store failed under this run: drop it from memory, claim and resume it after
        a backoff that doubles (0.5 s to 30 s) until the run parks or finishes."""
        self.live.pop(run_id, None)
        attempts = self._store_failures.get(run_id, 0)
        delay = min(_RETRY_CAP_S, _RETRY_BASE_S * 2**attempts)
        self._store_failures[run_id] = attempts + 1
        self._retry_at[run_id] = (self.clock.time() + delay, attempts + 1)
        log.warning("run.retry_scheduled", worker=self.worker_id, run_id=run_id, delay_s=delay)

    # -- timers and wake-ups -------------------------------------------------------

    def schedule_timer(self, run_id: str, position: str, fire_at: float) -> None:
        heapq.heappush(self._timers, (fire_at, run_id, position))
        if self._timers[0][0] == fire_at:
            self._poke.set()

    def _fire_due_timers(self, now: float) -> None:
        while self._timers and self._timers[0][0] <= now:
            _, run_id, position = heapq.heappop(self._timers)
            execution = self.live.get(run_id)
            if execution is not None:
                execution.fire(position)

    async def _retry_due(self, now: float) -> None:
        for run_id, (at, _) in list(self._retry_at.items()):
            if at <= now and run_id not in self.live:
                try:
                    claimed = await self.store.claim_run(run_id, now=now, mine=True)
                except StoreError as exc:  # still failing: back off further
                    log.warning("run.retry_failed", worker=self.worker_id, run_id=run_id,
                                error=str(exc))
                    self.retry_later(run_id)
                    continue
                del self._retry_at[run_id]
                if claimed is not None:  # else: it ended, or another worker holds it
                    self._adopt(claimed)

    async def _foreign_changes(self, changes: Changes) -> None:
        """Other processes wrote: cancellations and events for live runs, new work,
        stream events for this process's readers."""
        for run_id in changes.streams:
            self.app.stream_signals.notify(run_id)
        if changes.everything:
            self.app.stream_signals.notify_all()
        if changes.breakers or changes.everything:
            await self.app.follow_breakers()
        if changes.everything:
            # A cancel of any live run (read each: however many runs wait in the store,
            # a scan of them could stop before the one cancelled).
            for run_id in list(self.live):
                run = await self.store.get_run(run_id)
                if run is not None and run.cancel_requested and run_id in self.live:
                    self.live[run_id].cancel()
            for execution in list(self.live.values()):
                execution.deliver(None)
            self._claim_due = True
            return
        for run_id in changes.cancels:
            if run_id in self.live:
                self.live[run_id].cancel()
        for run_id in changes.events:
            if run_id in self.live:
                self.live[run_id].deliver(None)
        if (changes.wakeups or not changes.cancels <= self.live.keys()
                or not changes.events <= self.live.keys()):
            self._claim_due = True
        elif changes.queues:
            self._claim_new = True  # new runs or a freed slot: the queues only

    async def _loop(self) -> None:
        watch = getattr(self.store, "watch", None)
        if callable(watch):
            watch(self._poke.set)  # a notification wakes the loop at once
        while not self._stopping:
            try:
                now = self.clock.time()
                self._fire_due_timers(now)
                changes = await self.store.changes()
                if changes:
                    await self._foreign_changes(changes)
                while self._wake_hints and self._wake_hints[0] <= now:
                    heapq.heappop(self._wake_hints)
                    self._claim_due = True
                if self._claim_due or now >= self._next_claim_at:
                    await self._claim()
                elif self._claim_new:
                    await self._claim(due=False)
                if self._retry_at:
                    await self._retry_due(now)
            except StoreError as exc:
                log.error("worker.poll_failed", worker=self.worker_id, error=str(exc))
                self._next_claim_at = self.clock.time() + self.app.claim_interval_s
            except Exception as exc:  # a bug: never let it end the loop (a worker that
                # renews its leases but claims nothing would strand every run it holds)
                log.error("worker.loop_error", worker=self.worker_id, error=repr(exc),
                          traceback=traceback.format_exc())
                self._next_claim_at = self.clock.time() + self.app.claim_interval_s
            now = self.clock.time()
            timeout = self.poll_interval_s
            if self._timers:
                timeout = min(timeout, self._timers[0][0] - now)
            if self._wake_hints:
                timeout = min(timeout, self._wake_hints[0] - now)
            timeout = min(timeout, self._next_claim_at - now)  # the fallback claim
            self._poke.clear()
            # A timer that pokes, rather than asyncio.timeout(): no cancellation involved.
            alarm = asyncio.get_running_loop().call_later(max(0.0, timeout), self._poke.set)
            try:
                await self._poke.wait()
            finally:
                alarm.cancel()

    async def _heartbeat(self) -> None:
        """Renew this worker's leases every third of their TTL; drop runs found lost."""
        interval = self.app.lease_ttl_s / 3
        while not self._stopping:
            await asyncio.sleep(interval)
            try:
                lost = await self.store.renew_leases()
                await self.store.renew_permits()  # fleet-wide bulkhead places held here
            except StoreError as exc:  # the store is down: writes fail too; try again
                log.warning("worker.heartbeat_failed", worker=self.worker_id, error=str(exc))
                continue
            for run_id in lost:
                execution = self.live.pop(run_id, None)
                self._retry_at.pop(run_id, None)
                if execution is not None:
                    log.warning("run.lease_lost", worker=self.worker_id, run_id=run_id)
                    for on_lease_lost in self.hooks.lease_lost:
                        on_lease_lost(run_id)
                    execution.abandon()

    # -- run ends ------------------------------------------------------------------

    async def park_run(self, execution: RunExecution, wake_at: float | None,
                       events: Sequence[str]) -> None:
        await self.store.park_run(execution.run_id, wake_at, events, now=self.clock.time())
        self._store_failures.pop(execution.run_id, None)
        if self.live.get(execution.run_id) is execution:
            del self.live[execution.run_id]
        for on_parked in self.hooks.run_parked:
            on_parked(execution.run_id, wake_at)
        if wake_at is not None:  # claim it back when it is due (any worker may)
            heapq.heappush(self._wake_hints, wake_at)
            if wake_at <= self.clock.time():
                self.poke()

    async def finish_run(self, execution: RunExecution, status: RunStatus,
                         result: str | None, error: str | None) -> None:
        run = execution.run
        await self.finish_stored(run, status, result, error)
        if self.live.get(run.run_id) is execution:
            del self.live[run.run_id]

    async def finish_stored(self, run: RunRecord, status: RunStatus, result: str | None,
                            error: str | None, *, force: bool = False) -> bool:
        """End a run durably (once), tell its parent, wake result waiters, cascade cancels."""
        notify = None
        now = self.clock.time()
        if run.parent_run_id is not None:
            payload = {"status": status.value, "result": result, "run_id": run.run_id,
                       "error": json.loads(error) if error else None}
            notify = EventRecord(run_id=run.parent_run_id, seq=0,
                                 name=child_event_name(run.run_id),
                                 payload=json.dumps(payload), sent_at=now)
        changed = await self.store.finish_run(run.run_id, status, result=result, error=error,
                                              completed_at=now, notify=notify, force=force)
        self.app.stream_signals.notify(run.run_id)  # its readers stop once they have read all
        if force:
            self.store.forget(run.run_id)
            execution = self.live.pop(run.run_id, None)
            if execution is not None:
                execution.abandon()
        self._store_failures.pop(run.run_id, None)
        if not changed:
            return False
        log.debug("run.finished", worker=self.worker_id, run_id=run.run_id, status=status.value)
        for on_finished in self.hooks.run_finished:
            on_finished(run.run_id, status)
        for on_ended in self.hooks.run_ended:
            on_ended(run, status)
        for future in self._result_waiters.pop(run.run_id, []):
            if not future.done():
                future.set_result(None)
        if notify is not None:
            self.notify_event(notify.run_id, notify.name)
        if status is RunStatus.CANCELLED:
            for child in await self.store.list_runs(parent_run_id=run.run_id, limit=10_000):
                if not child.status.is_terminal:
                    # The engine's own cascade, not workflow code's cancel (this may run
                    # inside the ending run's branch, which refuses writes by then).
                    await self.app._cancel(child.run_id, False)
        return True

    def notify_event(self, run_id: str, name: str) -> None:
        """An event was queued for `run_id` in this process: deliver or wake."""
        execution = self.live.get(run_id)
        if execution is not None:
            execution.deliver(name)
        else:
            self.poke()  # parked here or anywhere: the event made it due

    def result_waiter(self, run_id: str) -> asyncio.Future[None]:
        """A future resolved when `run_id` ends in this process."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters = [f for f in self._result_waiters.get(run_id, []) if not f.done()]
        waiters.append(future)
        self._result_waiters[run_id] = waiters
        return future
