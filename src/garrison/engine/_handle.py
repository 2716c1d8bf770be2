"""`RunHandle`: a reference to one run, from any process that can reach the store."""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from garrison.engine._codec import decode, encode
from garrison.engine._context import current_branch
from garrison.errors import (
    ResultTimeoutError,
    RunNotFoundError,
    WorkflowCancelled,
    WorkflowError,
    WorkflowFailed,
)
from garrison.store import RunRecord, RunStatus

if TYPE_CHECKING:
    from garrison.engine._app import Garrison

__all__ = ["RunHandle"]

R = TypeVar("R")

# How often `result()` re-reads the store: often when another process executes the run,
# rarely as a safety net when this process's worker does (its end resolves a future).
_POLL_S = 0.1
_LOCAL_POLL_S = 5.0


class RunHandle(Generic[R]):
    """A run by id: its status, its result, its cancellation. Cheap to create."""

    __slots__ = ("_app", "_parent_run_id", "run_id")

    def __init__(self, app: Garrison, run_id: str, *, parent_run_id: str | None = None) -> None:
        self._app = app
        self.run_id = run_id
        self._parent_run_id = parent_run_id

    def __repr__(self) -> str:
        return f"RunHandle({self.run_id!r})"

    async def record(self) -> RunRecord:
        """The run's stored record. Raises `RunNotFoundError`."""
        run = await self._app.store.get_run(self.run_id)
        if run is None:
            raise RunNotFoundError(
                f"no run {self.run_id!r} in {self._app.store.safe_url}; check the id "
                "(`garrison runs list` shows the runs)",
                run_id=self.run_id,
            )
        return run

    async def status(self) -> RunStatus:
        """The run's current `RunStatus`."""
        return (await self.record()).status

    async def result(self, timeout: float | None = None) -> R:
        """Wait for the run to end and return its result.

        Inside the parent workflow of a child run this is a durable, journaled wait.

        Raises:
            WorkflowFailed: the run failed (carries the error's type, message, traceback).
            WorkflowCancelled: the run was cancelled.
            ResultTimeoutError: `timeout` seconds passed first; the run goes on.
        """
        branch = current_branch()
        if branch is not None:
            execution = branch.execution
            if execution.run_id != self._parent_run_id and not _is_child_of(execution, self):
                raise WorkflowError(
                    f"run {execution.run_id}: a workflow may await the result of its "
                    f"own children only; {self.run_id} is not one. Start it with "
                    "ctx.start_child(), or read it in a step.",
                    run_id=execution.run_id,
                )
            value: R = await execution.child_result(branch, self.run_id, timeout)
            return value
        try:
            async with asyncio.timeout(timeout):
                return await self._wait()
        except TimeoutError:
            raise ResultTimeoutError(
                f"run {self.run_id} did not end within {timeout} s; it goes on running. "
                "Call result() again or raise timeout=",
                run_id=self.run_id,
            ) from None

    async def _wait(self) -> R:
        worker = self._app.worker
        while True:
            waiter = worker.result_waiter(self.run_id) if worker is not None else None
            run = await self.record()
            if run.status.is_terminal:
                if waiter is not None:
                    waiter.cancel()
                value: R = _outcome(run)
                return value
            if waiter is not None:  # asyncio.wait: a timeout that never cancels anything
                # Only a run executing here resolves the waiter: one another worker of
                # the fleet executes (or nobody has claimed yet) is read again soon.
                local = worker is not None and self.run_id in worker.live
                await asyncio.wait({waiter}, timeout=_LOCAL_POLL_S if local else _POLL_S)
            else:
                await asyncio.sleep(_POLL_S)

    async def cancel(self) -> None:
        """Cancel the run cooperatively (CancelledError at its current await); recorded,
        and propagated to its unfinished children. A finished run is left as it is."""
        await self._app.cancel(self.run_id)


def _is_child_of(execution: Any, handle: RunHandle[Any]) -> bool:
    """Whether `handle`'s run was started by `execution` (found in its journal)."""
    from garrison.store import StepKind

    wanted = encode(handle.run_id)
    return any(entry.kind is StepKind.CHILD and entry.output == wanted
               for entry in execution.journal.values())


def _outcome(run: RunRecord) -> Any:
    if run.status is RunStatus.COMPLETED:
        return decode(run.result) if run.result is not None else None
    if run.status is RunStatus.CANCELLED:
        raise WorkflowCancelled(f"run {run.run_id} was cancelled", run_id=run.run_id)
    error = json.loads(run.error) if run.error else {}
    kept = (f"; it is QUARANTINED: fix the cause, then app.redrive({run.run_id!r})"
            if run.status is RunStatus.QUARANTINED else "")
    raise WorkflowFailed(
        f"run {run.run_id} ({run.workflow_name}) failed: {error.get('type')}: "
        f"{error.get('message')}{kept}",
        run_id=run.run_id, error_type=error.get("type"), error_message=error.get("message"),
        traceback=error.get("traceback"),
    )
