"""Run streams: events a run publishes while it runs, read by clients from an offset.

A step (or workflow code) calls `publish(kind, data)`; the event is appended to the run's
stream in the store and is durable when the call returns. A client follows the stream
with `app.stream(run_id, after=offset)` and, after a reconnect, passes the last offset it
saw to resume exactly after it.

Keys make publishing idempotent. An event's key is unique within its run; an append
whose key exists writes nothing. The default key of a step's n-th publish is
`"{position}/{n}"`, counted per attempt, so a step that runs again after a crash (or a
retry) and publishes the same sequence adds nothing to the stream. In workflow code the
default key is `"w{branch path}:{branch counter}/{n}"`, n counting publishes since the
branch's last journaled operation: a replay publishes the same keys, which are no-ops.
Delivery: at-least-once per publish call, exactly once per key in the stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import TYPE_CHECKING, Any

from garrison.engine._codec import encode
from garrison.engine._context import current_branch, current_step_call
from garrison.errors import ConfigurationError, NotInWorkflowError, RunNotFoundError, WorkflowError
from garrison.store import StreamRecord

if TYPE_CHECKING:
    from garrison.engine._app import Garrison
    from garrison.engine._execution import RunExecution

__all__ = ["StreamSignals", "follow_stream", "publish"]

# Events read per store round trip while a reader catches up.
_READ_BATCH = 500


class StreamSignals:
    """Wakes this process's stream readers at once when a run's stream may have grown
    (a publish here, a notification from another process, the run's end)."""

    def __init__(self) -> None:
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}

    def waiter(self, run_id: str) -> asyncio.Future[None]:
        """A future resolved at the next `notify(run_id)`; `discard` it when done."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(run_id, set()).add(future)
        return future

    def discard(self, run_id: str, future: asyncio.Future[None]) -> None:
        waiters = self._waiters.get(run_id)
        if waiters is not None:
            waiters.discard(future)
            if not waiters:
                del self._waiters[run_id]

    def notify(self, run_id: str) -> None:
        """`run_id`'s stream grew or its run ended: wake its readers."""
        for future in self._waiters.pop(run_id, ()):
            if not future.done():
                future.set_result(None)

    def notify_all(self) -> None:
        """Anything may have changed (a missed notification): wake every reader."""
        for run_id in list(self._waiters):
            self.notify(run_id)


def publish(kind: str, data: Any = None, *, key: str | None = None) -> Awaitable[int | None]:
    """Append an event to the current run's stream; await it to know it is durable.

    Call it from a step's body (the usual place: model tokens, tool calls, results) or
    from workflow code. The awaitable returns the event's offset, or None when the run's
    stream already held its key (a step running again, a replay): nothing was written.
    Workflow code must not branch on that answer: a replay gets None where the first
    execution got an offset.

    Args:
        kind: what the event is, e.g. "token", "tool_call" (readers dispatch on it).
        data: any JSON-able value (the journal codec: dataclasses, pydantic models, ...).
        key: the event's key, unique within the run (default: the step's position and the
            number of events this attempt published before, `"3/0"`, `"3/1"`, ...; in
            workflow code a key derived from the branch, stable across replays). Pass
            your own (a message id) to make a publish idempotent across attempts that do
            not publish the same sequence; keep it clear of the default forms.

    Raises:
        NotInWorkflowError: outside a running workflow or step.
        SerializationError: `data` cannot be stored.
        WorkflowError: called from a synchronous (`def`) step's thread.
        LeaseLostError: (when awaited, in a step) this worker no longer holds the run.
    """
    if not isinstance(kind, str) or not kind:
        raise ConfigurationError(f"garrison.publish(kind={kind!r}): kind is a non-empty str, "
                                 "e.g. 'token'")
    if key is not None and (not isinstance(key, str) or not key):
        raise ConfigurationError(f"garrison.publish(key={key!r}): a key is a non-empty str "
                                 "(or None for the default key)")
    call = current_step_call()
    if call is not None:
        execution = call.execution
        _require_loop(execution.run_id, call.info.step_name)
        if key is None:
            key = f"{call.info.position}/{call.published}"
        call.published += 1
        text = encode(data, what=f"run {execution.run_id} step {call.info.position} "
                                 f"{call.info.step_name!r}: stream event {kind!r}")
        return _append(execution, key, kind, text)
    branch = current_branch()
    if branch is None:
        raise NotInWorkflowError(
            "garrison.publish() was called outside a run; call it from a step's body or "
            "from workflow code of a running workflow (clients read streams with "
            "app.stream(run_id))")
    execution = branch.execution
    counter, published = branch.published
    if counter != branch.counter:  # a journaled operation since the last publish
        published = 0
    if key is None:
        key = f"w{branch.path}:{branch.counter}/{published}"
    branch.published = (branch.counter, published + 1)
    text = encode(data, what=f"run {execution.run_id}: stream event {kind!r}")
    return execution.workflow_write(_append(execution, key, kind, text))


def _require_loop(run_id: str, step_name: str) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        raise WorkflowError(
            f"run {run_id} step {step_name!r}: garrison.publish() in a synchronous step "
            "cannot be awaited from its thread; make the step an `async def`",
            run_id=run_id) from None


async def _append(execution: RunExecution, key: str, kind: str, text: str) -> int | None:
    worker = execution.worker
    [offset] = await worker.store.append_stream(execution.run_id, [(key, kind, text)],
                                                at=worker.clock.time())
    worker.app.stream_signals.notify(execution.run_id)
    return offset


async def follow_stream(app: Garrison, run_id: str, *, after: int,
                        poll_s: float) -> AsyncIterator[StreamRecord]:
    """Yield the run's events after offset `after`, in order, waiting for more, until the
    run has ended and every event is read (see `Garrison.stream`)."""
    store = app.store
    if await store.get_run(run_id) is None:
        raise RunNotFoundError(
            f"no run {run_id!r} in {store.safe_url}: cannot stream it; "
            "check the id (`garrison runs list` shows the runs)", run_id=run_id)
    signals = app.stream_signals
    offset = after
    while True:
        # Registered before reading: a publish landing in between still wakes this reader.
        waiter = signals.waiter(run_id)
        try:
            # The run's status first: if it had ended, this read sees all it published.
            run = await store.get_run(run_id)
            ended = run is None or run.status.is_terminal
            batch = await store.read_stream(run_id, after=offset, limit=_READ_BATCH)
            for record in batch:
                offset = record.offset
                yield record
            if len(batch) == _READ_BATCH:
                continue  # catching up: read on at once
            if ended:
                return
            # Woken at once by this process; every poll_s for runs executed elsewhere.
            await asyncio.wait({waiter}, timeout=poll_s)
        finally:
            signals.discard(run_id, waiter)
