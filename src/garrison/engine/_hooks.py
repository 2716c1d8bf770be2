"""Engine hooks: the points where resilience, observability and governance attach.

Subclass `EngineHooks`, override what you need and pass it to `Garrison(hooks=[...])`.
Hooks run synchronously on the event loop: keep them short. An exception raised by a
hook propagates into the engine at that point (tests use this to simulate crashes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from garrison.engine._context import StepInfo
    from garrison.store import RunRecord, RunStatus

__all__ = ["EngineHooks", "HookSet"]


class EngineHooks:
    """No-op base; every method is optional."""

    def run_started(self, run: RunRecord) -> None:
        """A run began executing in this process for the first time."""

    def run_resumed(self, run: RunRecord, replayed_entries: int) -> None:
        """A run with a journal began executing again (after a crash, restart or wake-up)."""

    def run_parked(self, run_id: str, wake_at: float | None) -> None:
        """A run's coroutine was released; it waits in the store."""

    def run_finished(self, run_id: str, status: RunStatus) -> None:
        """A run ended (COMPLETED, FAILED or CANCELLED) and that is durable."""

    def run_ended(self, run: RunRecord, status: RunStatus) -> None:
        """As `run_finished`, with the run's record (its workflow, queue and trace
        context; `status` is the new one): also for a run that ended without executing
        in this process (a cancel of a queued or parked run)."""

    def step_started(self, step: StepInfo) -> None:
        """A step's body is about to run (not replayed: replays return from the journal)."""

    def step_completed(self, step: StepInfo, duration_s: float) -> None:
        """A step's body returned a result that can be stored; it is not committed yet.
        (A result that cannot be stored is a `step_failed`, `will_retry=False`: it is
        journaled FAILED.)"""

    def step_committed(self, step: StepInfo) -> None:
        """A step's outcome is durable in the journal."""

    def step_failed(self, step: StepInfo, error: BaseException, will_retry: bool) -> None:
        """A step's body raised."""

    def step_interrupted(self, step: StepInfo, error: BaseException) -> None:
        """A step's attempt was cancelled (run cancelled or parked, a deadline, worker
        shutdown): nothing is journaled for it; it runs again if the run resumes."""

    def step_annotated(self, step: StepInfo, attributes: Mapping[str, Any]) -> None:
        """The step's body described itself with `garrison.engine.annotate(...)`. Called
        from the body's own thread (a synchronous step runs in the step thread pool)."""

    def run_event(self, run_id: str, step: StepInfo | None, name: str,
                  attributes: Mapping[str, Any]) -> None:
        """Running code reported an event (`garrison.engine.record_event`): `step` is
        the step whose body reported it, None for workflow code (reported only where
        the run is live, not during a replay). Called from a synchronous step's thread
        for such a step."""

    def run_detached(self, run_id: str) -> None:
        """This process stopped executing the run: it finished, parked, was handed back,
        lost its lease or hit a store failure. Once per `run_started`/`run_resumed`, in
        the same task (context variables set by those are still visible)."""

    def lease_lost(self, run_id: str) -> None:
        """Another worker took the run over (this worker's lease ran out): dropped here."""

    def trace_context(self, run: RunRecord) -> str | None:
        """The trace context to record with a new run (`app.start`, `ctx.start_child`),
        called in the starting code's context: a W3C `traceparent`, optionally followed by
        one space and a `tracestate`. The first hook returning a value wins."""
        return None


# The events a HookSet dispatches (every EngineHooks method).
_EVENTS = ("run_started", "run_resumed", "run_parked", "run_finished", "run_ended",
           "step_started",
           "step_completed", "step_committed", "step_failed", "step_interrupted",
           "step_annotated", "run_event", "run_detached", "lease_lost", "trace_context")


class HookSet:
    """A worker's hooks, sorted by event: for each `EngineHooks` method, the bound methods
    of the hooks that override it, in order. An event no hook overrides costs the engine
    one attribute read; a hook pays only for the events it listens to."""

    __slots__ = ("hooks", *_EVENTS)

    run_started: tuple[Callable[[RunRecord], None], ...]
    run_resumed: tuple[Callable[[RunRecord, int], None], ...]
    run_parked: tuple[Callable[[str, float | None], None], ...]
    run_finished: tuple[Callable[[str, RunStatus], None], ...]
    run_ended: tuple[Callable[[RunRecord, RunStatus], None], ...]
    step_started: tuple[Callable[[StepInfo], None], ...]
    step_completed: tuple[Callable[[StepInfo, float], None], ...]
    step_committed: tuple[Callable[[StepInfo], None], ...]
    step_failed: tuple[Callable[[StepInfo, BaseException, bool], None], ...]
    step_interrupted: tuple[Callable[[StepInfo, BaseException], None], ...]
    step_annotated: tuple[Callable[[StepInfo, Mapping[str, Any]], None], ...]
    run_event: tuple[Callable[[str, StepInfo | None, str, Mapping[str, Any]], None], ...]
    run_detached: tuple[Callable[[str], None], ...]
    lease_lost: tuple[Callable[[str], None], ...]
    trace_context: tuple[Callable[[RunRecord], str | None], ...]

    def __init__(self, hooks: Iterable[EngineHooks] = ()) -> None:
        self.hooks = tuple(hooks)
        for event in _EVENTS:
            default = getattr(EngineHooks, event)
            listeners = []
            for hook in self.hooks:
                method = getattr(hook, event, None)
                if method is not None and getattr(method, "__func__", None) is not default:
                    listeners.append(method)
            setattr(self, event, tuple(listeners))

    def added(self, hook: EngineHooks) -> HookSet:
        """These hooks and `hook` (last)."""
        return HookSet((*self.hooks, hook))

    def __bool__(self) -> bool:
        return bool(self.hooks)

    def __iter__(self) -> Iterator[EngineHooks]:
        return iter(self.hooks)

    def __len__(self) -> int:
        return len(self.hooks)
