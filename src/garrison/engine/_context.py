"""What workflow code sees: the `Context`, the step it is in, and its position path.

Positions. Each branch of a run (the workflow body, and every task it creates with
`asyncio.gather`, `TaskGroup` or `create_task`) owns a counter; a journaled operation
takes the next number of its branch. A new task takes a number from its parent's counter
*when it is created* (in program order), so `gather(a(), b())` gives branch a the path
"4" and branch b "5" whichever finishes first, and their steps "4.1", "5.1", ...
"""

from __future__ import annotations

import asyncio
import contextvars
import datetime as dt
import uuid
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from garrison.errors import NotInWorkflowError, WorkflowError

if TYPE_CHECKING:
    from garrison.engine._execution import RunExecution
    from garrison.engine._handle import RunHandle

__all__ = ["Branch", "Context", "StepInfo", "current_step", "install_task_factory",
           "log_fields", "run_trace_context"]


class Branch:
    """One sequential strand of a run, with its own position counter."""

    __slots__ = ("counter", "execution", "path", "published")

    def __init__(self, execution: RunExecution, path: str) -> None:
        self.execution = execution
        self.path = path
        self.counter = 0
        # Stream events published from this branch's workflow code: (counter, how many
        # since the counter last moved), for deterministic default keys (`publish`).
        self.published = (0, 0)

    def next_position(self) -> str:
        self.counter += 1
        return f"{self.path}.{self.counter}" if self.path else str(self.counter)

    def fork(self) -> Branch:
        return Branch(self.execution, self.next_position())

    def replaying(self) -> bool:
        """Whether this branch's next operation is already in the journal: the code
        running now ran before, in an earlier segment of the run."""
        following = f"{self.path}.{self.counter + 1}" if self.path else str(self.counter + 1)
        return following in self.execution.journal


_branch: contextvars.ContextVar[Branch | None] = contextvars.ContextVar(
    "garrison_branch", default=None
)


@dataclass(frozen=True, slots=True)
class StepInfo:
    """The step being executed. `idempotency_key` is stable across retries and recoveries."""

    run_id: str
    position: str
    step_name: str
    attempt: int
    idempotency_key: str


_step: contextvars.ContextVar[StepInfo | None] = contextvars.ContextVar(
    "garrison_step", default=None
)


def current_step() -> StepInfo:
    """The step whose body is running now (works in sync steps' threads too).

    Hand `current_step().idempotency_key` to external systems so that a step that runs
    again after a crash (at-least-once) is recognised as the same request.

    Raises:
        NotInWorkflowError: outside a step body.
    """
    info = _step.get()
    if info is None:
        raise NotInWorkflowError(
            "current_step() is only available inside a step's body (a function decorated "
            "with @app.step() called from a running workflow)"
        )
    return info


def current_branch() -> Branch | None:
    """The branch of the running workflow, or None (outside workflows and inside steps)."""
    return _branch.get()


def enter_branch(branch: Branch | None) -> contextvars.Token[Branch | None]:
    return _branch.set(branch)


def leave_branch(token: contextvars.Token[Branch | None]) -> None:
    _branch.reset(token)


class StepCall:
    """One attempt of a step body, as `publish` needs it: its run and how many stream
    events this attempt has published so far (private)."""

    __slots__ = ("execution", "info", "published")

    def __init__(self, execution: RunExecution, info: StepInfo) -> None:
        self.execution = execution
        self.info = info
        self.published = 0


_step_call: contextvars.ContextVar[StepCall | None] = contextvars.ContextVar(
    "garrison_step_call", default=None
)


def current_step_call() -> StepCall | None:
    """The step attempt whose body is running now, or None."""
    return _step_call.get()


def log_fields() -> dict[str, str | int]:
    """What a log line should say about the code running now: `run_id` and `worker`
    (in workflow code and step bodies), `step`, `position` and `attempt` (in step
    bodies); empty outside runs. For `garrison.observability.configure_logging`."""
    call = _step_call.get()
    if call is not None:
        info = call.info
        return {"run_id": info.run_id, "step": info.step_name, "position": info.position,
                "attempt": info.attempt, "worker": call.execution.worker.worker_id}
    bare = _step.get()
    if bare is not None:  # a step body entered without its execution
        return {"run_id": bare.run_id, "step": bare.step_name, "position": bare.position,
                "attempt": bare.attempt}
    branch = _branch.get()
    if branch is not None:
        execution = branch.execution
        return {"run_id": execution.run.run_id, "worker": execution.worker.worker_id}
    return {}


def run_trace_context() -> str | None:
    """The trace context stored with the run whose code is running now (W3C traceparent
    text, as its starter recorded it), or None: logs carry its trace id where no span
    is current (a worker without `instrument`)."""
    call = _step_call.get()
    if call is not None:
        return call.execution.run.trace_context
    branch = _branch.get()
    return branch.execution.run.trace_context if branch is not None else None


# Inside a step body: the run's deadline and the engine's clock, for `remaining()`.
_Deadline = tuple[float, Callable[[], float]] | None
_step_deadline: contextvars.ContextVar[_Deadline] = contextvars.ContextVar(
    "garrison_step_deadline", default=None
)
_StepTokens = tuple[contextvars.Token[StepInfo | None], contextvars.Token[Branch | None],
                    contextvars.Token[_Deadline], contextvars.Token[StepCall | None]]


def enter_step(info: StepInfo, deadline: _Deadline = None,
               execution: RunExecution | None = None) -> _StepTokens:
    call = StepCall(execution, info) if execution is not None else None
    return (_step.set(info), _branch.set(None), _step_deadline.set(deadline),
            _step_call.set(call))


def leave_step(tokens: _StepTokens) -> None:
    _step.reset(tokens[0])
    _branch.reset(tokens[1])
    _step_deadline.reset(tokens[2])
    _step_call.reset(tokens[3])


def install_task_factory(loop: asyncio.AbstractEventLoop) -> None:
    """Give every task created inside a workflow its own branch, numbered at creation.

    Chains any factory already installed; idempotent.
    """
    previous = loop.get_task_factory()
    if getattr(previous, "_garrison", False):
        return

    def factory(
        loop: asyncio.AbstractEventLoop,
        coro: Coroutine[Any, Any, Any],
        **kwargs: Any,
    ) -> asyncio.Future[Any]:
        # `is None`, not `or`: an empty Context is falsy, and an empty Context is exactly
        # what infrastructure passes to say "not part of any workflow".
        context: contextvars.Context | None = kwargs.pop("context", None)
        if context is None:
            context = contextvars.copy_context()
        parent = context.get(_branch)
        if parent is not None:
            context.run(_branch.set, parent.fork())
        task: asyncio.Task[Any]
        if previous is not None:
            task = previous(loop, coro, context=context, **kwargs)  # type: ignore[call-arg,assignment]  # 3.11 factories take context
        else:
            task = asyncio.Task(coro, loop=loop, context=context, **kwargs)
        if parent is not None:
            parent.execution.adopt(task)  # the run owns its branches (closes them at exit)
        return task

    factory._garrison = True  # type: ignore[attr-defined]  # marks our factory for idempotency
    loop.set_task_factory(factory)  # type: ignore[arg-type]  # typeshed lags the 3.11 signature


def _require_branch(ctx: Context, operation: str) -> Branch:
    branch = _branch.get()
    if branch is None or branch.execution is not ctx._execution:
        where = "inside a step" if _step.get() is not None else "outside its workflow"
        raise NotInWorkflowError(
            f"run {ctx.run_id}: ctx.{operation}() was called {where}; call it from the "
            "workflow body (or a task it created), not from a step or another run",
            run_id=ctx.run_id,
        )
    return branch


class Context:
    """A workflow's handle on the durable world. Every method is journaled.

    Workflow code must be deterministic: take time, randomness and ids from here, call
    side effects through steps, and wait with `sleep`/`wait_for` (never `asyncio.sleep`).
    """

    __slots__ = ("_execution",)

    def __init__(self, execution: RunExecution) -> None:
        self._execution = execution

    @property
    def run_id(self) -> str:
        """This run's id."""
        return self._execution.run.run_id

    @property
    def workflow_name(self) -> str:
        return self._execution.run.workflow_name

    @property
    def workflow_version(self) -> str:
        return self._execution.run.workflow_version

    def now(self) -> dt.datetime:
        """The current UTC time, journaled: a replay sees the same instant."""
        value = self._execution.journal_value(_require_branch(self, "now"), "now")
        assert isinstance(value, dt.datetime)
        return value

    def uuid(self) -> uuid.UUID:
        """A random UUID, journaled: a replay sees the same id."""
        value = self._execution.journal_value(_require_branch(self, "uuid"), "uuid")
        assert isinstance(value, uuid.UUID)
        return value

    def random(self) -> float:
        """A float in [0, 1), journaled: a replay sees the same number."""
        value = self._execution.journal_value(_require_branch(self, "random"), "random")
        assert isinstance(value, float)
        return value

    async def sleep(self, seconds: float | dt.timedelta) -> None:
        """A durable timer. The run is parked in the store (no coroutine held) and resumes
        after `seconds`, even across restarts; a timer that came due while the process was
        down fires at once on start."""
        if isinstance(seconds, dt.timedelta):
            seconds = seconds.total_seconds()
        await self._execution.sleep(_require_branch(self, "sleep"), float(seconds))

    async def wait_for(
        self, name: str, *, timeout: float | None = None, default: Any = None
    ) -> Any:
        """Wait durably for an event sent with `app.send(run_id, name, value)`; return its value.

        Events sent before the run reaches this call are kept; events of one name are
        consumed in send order. On `timeout` (seconds) return `default`.
        """
        branch = _require_branch(self, "wait_for")
        return await self._execution.wait_for(branch, name, timeout, default)

    async def first_ended(self, handles: Sequence[RunHandle[Any]], *,
                          timeout: float | None = None) -> dict[str, Any] | None:
        """Durably wait until one of these child runs ends; return `{"run_id", "status",
        "result", "error"}` (result and error as journal data), or None after `timeout`.

        Each child's end is reported once: wait on it with either this or
        `handle.result()`, not both. Supervisors are built on this.
        """
        ids = [h.run_id for h in handles]
        if not ids:
            raise WorkflowError(f"run {self.run_id}: first_ended() of no children")
        return await self._execution.first_ended(_require_branch(self, "first_ended"), ids,
                                                 timeout)

    async def start_child(self, workflow: Any, *args: Any, run_id: str | None = None,
                          **kwargs: Any) -> RunHandle[Any]:
        """Start a child workflow run (journaled: started once) and return its handle.

        `await handle.result()` inside this workflow is a durable wait. Cancelling this
        run cancels its unfinished children.
        """
        branch = _require_branch(self, "start_child")
        return await self._execution.start_child(branch, workflow, args, kwargs, run_id)


def remaining() -> float | None:
    """Seconds left before the current run's deadline (`@app.workflow(timeout=)`, or
    inherited from a parent); None outside a run or when it has no deadline. Inside a
    step too, so an outbound call can pass it on as its own timeout."""
    branch = current_branch()
    if branch is not None:  # workflow code: from the journaled clock, so replay agrees
        # Journaled with or without a deadline: the journal's shape must not depend on
        # one (a redrive lifts it; later steps would move to other positions).
        now = branch.execution.journal_value(branch, "now")
        deadline_at = branch.execution.run.deadline_at
        if deadline_at is None:
            return None
        return float(deadline_at - now.timestamp())
    deadline = _step_deadline.get()
    return deadline[0] - deadline[1]() if deadline is not None else None
