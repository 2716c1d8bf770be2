"""Replay and fork of runs: re-run workflow code against a journal; branch a run off.

Replay (`app.replay`) drives the workflow body the way a worker resumes a run, except
that nothing goes live: every journaled operation must find its entry at its position
(same kind, name and arity, the engine's own check), and an operation the journal does
not have is a divergence unless the run is unfinished and the operation lies past the
end of its journal (the run has not got there yet: the replay stops there, "consistent
so far"). No step body runs, no child starts, no wait waits, nothing is written: the
execution gets a stand-in for the worker that has no store at all.

Fork (`app.fork`) creates a new run whose journal starts as a copy of another run's
entries up to a top-level position; a worker replays those and goes on live.
See docs/operations.md ("Replay and fork") and docs/decisions/0011-replay-and-fork.md.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import datetime as dt
import json
import random
import uuid
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar, cast

from garrison.engine._codec import decode, error_from_data, error_to_data, roundtrip
from garrison.engine._context import Branch, enter_branch, install_task_factory, leave_branch
from garrison.engine._execution import RunExecution
from garrison.engine._handle import RunHandle
from garrison.engine._hooks import HookSet
from garrison.engine._queues import DEFAULT_QUEUE, StartOptions
from garrison.engine._registry import StepDef, WorkflowDef
from garrison.errors import (
    ConfigurationError,
    NonDeterminismError,
    RunNotFoundError,
    WorkflowConflictError,
)
from garrison.store import RunRecord, RunStatus, StepKind, StepRecord, StepStatus, position_key

if TYPE_CHECKING:
    from garrison.engine._app import Garrison
    from garrison.engine._worker import Worker

__all__ = ["ReplayReport", "fork_run", "forked_entries", "replay_run", "replayed_workflow"]

T = TypeVar("T")

_ENDED = frozenset({RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.QUARANTINED})
_DEADLINE_ERROR = "garrison.errors.DeadlineExceeded"
_CHILDREN_LIMIT = 100_000  # child runs of one run replayed by replay(children=True)


@dataclass(frozen=True, slots=True)
class ReplayReport:
    """What `app.replay` found when the code agreed with the run's journal.

    Attributes:
        run_id: the replayed run.
        workflow_name: its workflow.
        workflow_version: the version of the code that was replayed (this process's
            registration; may differ from `run_version`).
        run_version: the version the run was started with.
        run_status: the run's stored status.
        entries: journal entries the code matched.
        finished: the code ran to its end (for an ended run: to the same result).
            False: the run is unfinished and the replay stopped at the end of its
            journal, "consistent so far".
        stopped_at: where the replay stopped (positions, dotted), when not `finished`.
        children: with `replay(children=True)`, the reports of its child runs (each
            replayed with its own code version, and their children in turn), in the
            order they were created.
    """

    run_id: str
    workflow_name: str
    workflow_version: str
    run_version: str
    run_status: RunStatus
    entries: int
    finished: bool
    stopped_at: tuple[str, ...] = ()
    children: tuple[ReplayReport, ...] = ()

    def walk(self) -> list[ReplayReport]:
        """This report and its children's, depth first."""
        return [self, *(r for child in self.children for r in child.walk())]


class _NoStore:
    """Where a replay's worker would keep its store: any use is a bug, refused loudly
    rather than written."""

    def __init__(self, run_id: str) -> None:
        self._run_id = run_id

    def __getattr__(self, name: str) -> NoReturn:
        raise RuntimeError(f"replay of run {self._run_id} reached store.{name}(); a replay "
                           "never touches the store (a Garrison bug: please report it)")


class _ReplaySide:
    """What a replay gives `RunExecution` in place of its worker: the app's clock and
    registrations, no hooks (a replay is not a run), and no store."""

    def __init__(self, app: Garrison, run_id: str) -> None:
        self.app = app
        self.clock = app.clock
        self.hooks = HookSet()
        self.worker_id = f"replay:{app.worker_id}"
        self.store = _NoStore(run_id)

    def schedule_timer(self, run_id: str, position: str, fire_at: float) -> None:
        """A replay waits for no timer (it stops where the journal ends)."""

    def __getattr__(self, name: str) -> NoReturn:
        raise RuntimeError(f"a replay reached worker.{name}; a replay starts, parks and "
                           "finishes nothing (a Garrison bug: please report it)")


class ReplayExecution(RunExecution):
    """A `RunExecution` that only replays: journaled operations return their entries;
    anything the journal lacks is a divergence or, past the end of an unfinished run's
    journal, a stop."""

    replay_only = True

    def __init__(self, app: Garrison, run: RunRecord, workflow: WorkflowDef,
                 journal: Sequence[StepRecord]) -> None:
        # The stand-in offers what the replay paths below use of a worker; the rest
        # raises (see _ReplaySide), so a path that would go live fails instead.
        super().__init__(cast("Worker", _ReplaySide(app, run.run_id)), run, workflow, journal)
        self.visited: set[str] = set()
        self.stopped: list[str] = []
        self.outcome: tuple[str, Any] = ("stopped", None)
        error = json.loads(run.error) if run.error else {}
        interrupted = error.get("type") == _DEADLINE_ERROR  # cut short at some await
        # An ended run went exactly where its journal says: nothing more, nothing else.
        self.ended = run.status in _ENDED and not interrupted
        self.compare = self.ended  # its outcome must come out the same too

    # -- driving -------------------------------------------------------------------

    async def replay(self) -> ReplayReport:
        loop = asyncio.get_running_loop()
        install_task_factory(loop)  # fan-out branches get their positions (worker=False too)
        context = contextvars.copy_context()
        context.run(enter_branch, None)
        self.started = True
        self.task = loop.create_task(self._body(), name=f"garrison-replay:{self.run_id}",
                                     context=context)
        try:
            await self.task
        finally:
            await self._close_branches()
        return self._verdict()

    async def _body(self) -> None:
        token = enter_branch(self.root)
        try:
            inputs = decode(self.run.inputs)
            what = f"run {self.run_id}: result of workflow {self.workflow.name!r}"
            try:
                value = await self.workflow.fn(self.context, *inputs["args"],
                                               **inputs["kwargs"])
                text, _ = roundtrip(value, what=what)
                self.outcome = ("returned", text)
            except asyncio.CancelledError:
                if not self._suspending:
                    raise  # the caller of replay() was cancelled
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()
            except Exception as exc:
                self.outcome = ("raised", exc)
            finally:
                self._closing = True
            if self._suspending:  # every branch stopped (even if the code swallowed it)
                self.outcome = ("stopped", None)
        finally:
            leave_branch(token)

    def _verdict(self) -> ReplayReport:
        if self.nondeterminism is not None:
            raise self.nondeterminism
        kind, value = self.outcome
        if kind == "raised" and isinstance(value, NonDeterminismError):
            raise value
        unreached = sorted(set(self.journal) - self.visited, key=position_key)
        if unreached:
            entry = self.journal[unreached[0]]
            raise self._diverged(
                entry.position,
                f"journal has {entry.kind.value} {entry.name!r} ({entry.arity} args), which "
                "the code never reached (an operation removed, or moved into a branch "
                "the code no longer takes)",
                journal=_label(entry.kind, entry.name, entry.arity), code="nothing")
        if self.compare and kind != "stopped":
            self._compare_outcome(kind, value)
        return ReplayReport(
            run_id=self.run_id, workflow_name=self.workflow.name,
            workflow_version=self.workflow.version, run_version=self.run.workflow_version,
            run_status=self.run.status, entries=len(self.visited),
            finished=kind != "stopped",
            stopped_at=tuple(sorted(set(self.stopped), key=position_key)))

    def _compare_outcome(self, kind: str, value: Any) -> None:
        status = self.run.status.value
        if self.run.status is RunStatus.COMPLETED:
            stored = json.loads(self.run.result) if self.run.result is not None else None
            if kind == "returned" and json.loads(value) == stored:
                return
            got = (f"returns {_short(value)}" if kind == "returned"
                   else f"raises {type(value).__name__}: {value}")
            raise self._diverged(
                None, f"the run COMPLETED with {_short(self.run.result or 'null')}, the code "
                f"{got}", journal=self.run.result or "null",
                code=value if kind == "returned" else type(value).__name__)
        error = json.loads(self.run.error) if self.run.error else {}
        if kind == "raised":
            data = error_to_data(value)
            if (data["type"], data["message"]) == (error.get("type"), error.get("message")):
                return
            got = f"raises {data['type']}: {data['message']}"
        else:
            got = f"returns {_short(value)}"
        raise self._diverged(
            None, f"the run ended {status} with {error.get('type')}: {error.get('message')}, "
            f"the code {got}", journal=str(error.get("type")), code=got)

    def _diverged(self, position: str | None, what: str, *, journal: str, code: str
                  ) -> NonDeterminismError:
        where = f"position {position}" if position is not None else "outcome"
        error = NonDeterminismError(
            f"run {self.run_id} {where}: {what}. Replayed with workflow "
            f"{self.workflow.name!r} version {self.workflow.version!r} (the run has "
            f"{self.run.workflow_version!r}); pin the run to its code version or start a "
            "new run.", run_id=self.run_id, position=position, journal=journal, code=code)
        if self.nondeterminism is None:
            self.nondeterminism = error
        return self.nondeterminism

    # -- the journal ---------------------------------------------------------------

    def _later(self, position: str) -> str | None:
        """The first entry at or past `position` in its branch (the journal goes on
        there), or None: `position` lies past the end of that branch's journal."""
        key = position_key(position)
        branch, number = key[:-1], key[-1]
        depth = len(branch)
        later = [p for p in self.journal
                 if (k := position_key(p))[:depth] == branch and len(k) > depth
                 and k[depth] >= number]
        return min(later, key=position_key) if later else None

    def _absent(self, position: str, kind: StepKind, name: str, arity: int) -> None:
        """The code reached an operation the journal does not have: a divergence,
        unless the run is unfinished and this is past the end of its journal."""
        later = self._later(position)
        if not self.ended and later is None:
            return
        found = self.journal[later] if later is not None else None
        where = (f"the journal has nothing there but goes on at {later} "
                 f"({found.kind.value} {found.name!r})" if found is not None
                 else f"the run ended {self.run.status.value} without it")
        raise self._diverged(
            position, f"code called {kind.value} {name!r} ({arity} args), {where}: the "
            "code goes where the run never went", journal="nothing",
            code=_label(kind, name, arity))

    async def _replayed(self, position: str, kind: StepKind, name: str, arity: int
                        ) -> StepRecord:
        """The finished entry at `position`; never returns where the run is unfinished
        (an absent entry past the journal's end, a pending wait or retry): stops there."""
        entry = self._entry(position, kind, name, arity)
        if entry is None:
            self._absent(position, kind, name, arity)
        else:
            self.visited.add(position)
            self._activity()  # progress: not quiescent yet
            if entry.status is not StepStatus.PENDING:
                return entry
            if self.ended:
                raise self._diverged(
                    position, f"the run ended {self.run.status.value}, but its {kind.value} "
                    f"{name!r} here is still pending in the journal",
                    journal=_label(kind, name, arity), code=_label(kind, name, arity))
        await self._halt(position)

    async def _halt(self, position: str) -> NoReturn:
        """Stop this branch: it waits until every branch has stopped or ended, then the
        replay closes it (the quiescence a worker parks a run on)."""
        self.stopped.append(position)
        self.inflight += 1
        try:
            while True:
                future = self._register(position, None)
                try:
                    await self._block(future)
                finally:
                    self.waiters.pop(position, None)
                self._gate()
        finally:
            self.inflight -= 1

    # -- the operations workflow code calls ----------------------------------------

    async def call_step(self, branch: Branch, step: StepDef, args: tuple[Any, ...],
                        kwargs: dict[str, Any]) -> Any:
        position = branch.next_position()
        entry = await self._replayed(position, StepKind.STEP, step.name,
                                     len(args) + len(kwargs))
        if entry.status is StepStatus.FAILED and entry.error is not None:
            raise error_from_data(json.loads(entry.error))
        return decode(entry.output) if entry.output is not None else None

    async def sleep(self, branch: Branch, seconds: float) -> None:
        await self._replayed(branch.next_position(), StepKind.SLEEP, "sleep", 0)

    async def _wait_event(self, position: str, kind: StepKind, name: str, event: str,
                          timeout: float | None, default: Any) -> Any:
        entry = await self._replayed(position, kind, name, 0)
        return decode(entry.output) if entry.output is not None else default

    async def first_ended(self, branch: Branch, child_run_ids: Sequence[str],
                          timeout: float | None) -> dict[str, Any] | None:
        entry = await self._replayed(branch.next_position(), StepKind.CHILD_RESULT,
                                     "first_ended", len(child_run_ids))
        ended: dict[str, Any] | None = (json.loads(entry.output) if entry.output is not None
                                        else None)
        return ended

    async def start_child(self, branch: Branch, workflow: Any, args: tuple[Any, ...],
                          kwargs: dict[str, Any], run_id: str | None) -> RunHandle[Any]:
        app = self.worker.app
        definition = app.workflow_definition(workflow)
        entry = await self._replayed(branch.next_position(), StepKind.CHILD, definition.name,
                                     len(args) + len(kwargs))
        child_id = decode(entry.output) if entry.output is not None else run_id
        return RunHandle(app, str(child_id), parent_run_id=self.run_id)

    def journal_value(self, branch: Branch, kind_name: str) -> Any:
        kind = StepKind(kind_name)
        position = branch.next_position()
        entry = self._entry(position, kind, kind_name, 0)
        if entry is not None and entry.output is not None:
            self.visited.add(position)
            return decode(entry.output)
        self._absent(position, kind, kind_name, 0)
        # Past the end of an unfinished run's journal: a fresh value, as the run will
        # get; the next awaited operation stops the replay (nothing is journaled).
        if kind is StepKind.NOW:
            return dt.datetime.fromtimestamp(self.worker.clock.time(), tz=dt.UTC)
        if kind is StepKind.UUID:
            return uuid.uuid4()
        return random.random()

    async def workflow_write(self, write: Coroutine[Any, Any, T]) -> T:
        """`publish` from workflow code: a replay writes nothing and gets None, as a run
        whose stream already holds the event does."""
        write.close()
        self._gate()
        return cast(T, None)


def _label(kind: StepKind, name: str, arity: int) -> str:
    return f"{kind.value}:{name}/{arity}"


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


# -- entry points (Garrison.replay / Garrison.fork) --------------------------------


def replayed_workflow(app: Garrison, run: RunRecord, version: str | None) -> WorkflowDef:
    """The code to replay or fork `run` with: `version` if given; else the run's own
    version if registered here; else the version of its workflow registered last."""
    registry = app.registry
    if version is not None:
        found = registry.workflow(run.workflow_name, version)
        if found is None:
            raise ConfigurationError(
                f"run {run.run_id}: workflow {run.workflow_name!r} version {version!r} is not "
                "registered in this app (registered: "
                f"{_versions(app, run.workflow_name) or 'none'}); check --app and version=",
                run_id=run.run_id, workflow_name=run.workflow_name)
        return found
    own = registry.workflow(run.workflow_name, run.workflow_version)
    if own is not None:
        return own
    named = [d for (name, _), d in registry.workflows.items() if name == run.workflow_name]
    if not named:
        raise ConfigurationError(
            f"run {run.run_id}: workflow {run.workflow_name!r} is not registered in this app; "
            "pass the application that defines it (`--app module:app`) or register it with "
            "@app.workflow()", run_id=run.run_id, workflow_name=run.workflow_name)
    return named[-1]


def _versions(app: Garrison, name: str) -> str:
    return ", ".join(repr(v) for (n, v) in app.registry.workflows if n == name)


async def _load_run(app: Garrison, run_id: str) -> RunRecord:
    run = await app.store.get_run(run_id)
    if run is None:
        raise RunNotFoundError(f"no run {run_id!r} in {app.store.safe_url}; check the id "
                               "(`garrison runs list` shows the runs)", run_id=run_id)
    return run


async def replay_run(app: Garrison, run_id: str, *, version: str | None = None,
                     children: bool = False) -> ReplayReport:
    """Replay one run, and with `children` its child runs in turn (see
    `Garrison.replay`)."""
    run = await _load_run(app, run_id)
    definition = replayed_workflow(app, run, version)
    journal = await app.store.load_journal(run_id)
    report = await ReplayExecution(app, run, definition, journal).replay()
    if not children:
        return report
    kids = await app.store.list_runs(parent_run_id=run_id, limit=_CHILDREN_LIMIT)
    kids = sorted(kids, key=lambda kid: (kid.created_at, kid.run_id))
    return dataclasses.replace(report, children=tuple(
        [await replay_run(app, kid.run_id, children=True) for kid in kids]))


def forked_entries(journal: Sequence[StepRecord], at_step: int) -> list[StepRecord]:
    """The entries a fork at `at_step` reuses, in position order: every finished entry
    whose top-level position is <= `at_step` (a fan-out's entries "4.1", "4.2" belong
    to position 4); pending ones (a timer, a wait, a retry backoff) start afresh."""
    kept = [e for e in journal
            if position_key(e.position)[0] <= at_step and e.status is not StepStatus.PENDING]
    return sorted(kept, key=lambda e: position_key(e.position))


def _fork_inputs(run: RunRecord, args: Any) -> tuple[list[Any], dict[str, Any]]:
    if args is None:
        inputs = decode(run.inputs)
        return list(inputs["args"]), dict(inputs["kwargs"])
    if isinstance(args, list | tuple):
        return list(args), {}
    if (isinstance(args, dict) and set(args) <= {"args", "kwargs"}
            and isinstance(args.get("args", []), list | tuple)
            and isinstance(args.get("kwargs", {}), dict)):
        return list(args.get("args", [])), dict(args.get("kwargs", {}))
    raise ConfigurationError(
        f"app.fork({run.run_id!r}, args={args!r}): a list of positional arguments, or "
        '{"args": [...], "kwargs": {...}}', run_id=run.run_id)


async def fork_run(app: Garrison, from_run_id: str, at_step: int, *, args: Any,
                   run_id: str, version: str | None) -> RunHandle[Any]:
    """Fork a run (see `Garrison.fork`)."""
    if isinstance(at_step, bool) or not isinstance(at_step, int) or at_step < 0:
        raise ConfigurationError(
            f"app.fork({from_run_id!r}, at_step={at_step!r}): a whole number >= 0 (a "
            "top-level journal position; 0 reuses nothing)", run_id=from_run_id)
    source = await _load_run(app, from_run_id)
    definition = replayed_workflow(app, source, version)
    positional, keywords = _fork_inputs(source, args)
    kept = forked_entries(await app.store.load_journal(from_run_id), at_step)
    queue = app.queues.get(source.queue) or app.queues[DEFAULT_QUEUE]
    options = StartOptions(queue, source.priority if queue.priority else 0,
                           source.partition_key if queue.partition else None)
    local = app.worker is not None and app.worker.reserve(queue)
    try:
        record = app.new_run_record(definition, run_id, positional, keywords, parent=None,
                                    now=app.clock.time(), options=options, local=local)
        record = dataclasses.replace(record, tenant_id=source.tenant_id,
                                     forked_from=source.run_id, forked_at=at_step)
        steps = [dataclasses.replace(e, run_id=run_id, tenant_id=record.tenant_id)
                 for e in kept]
        stored, created = await app.store.create_run_with_journal(record, steps)
    finally:
        if local and app.worker is not None:
            app.worker.unreserve()
    if not created and (stored.workflow_name != definition.name
                        or (stored.forked_from, stored.forked_at) != (source.run_id, at_step)):
        raise WorkflowConflictError(
            f"run id {stored.run_id!r} already belongs to another run (workflow "
            f"{stored.workflow_name!r}, forked from {stored.forked_from!r}); choose another "
            "run_id for the fork", run_id=stored.run_id, existing=stored.workflow_name,
            requested=definition.name)
    if created and app.worker is not None:
        if stored.owner == app.worker_id:
            app.worker.launch(stored, definition, journal=steps)
        else:
            app.worker.poke()
    return RunHandle(app, stored.run_id)
