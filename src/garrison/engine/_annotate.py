"""`annotate` and `record_event`: running code describes itself to observers (the
engine's hooks), without importing them."""

from __future__ import annotations

from typing import Any

from garrison.engine._context import current_branch, current_step_call, enter_branch, leave_branch

__all__ = ["annotate", "record_event", "replaying"]


def annotate(**attributes: Any) -> None:
    """Describe the running step to the engine's hooks (`EngineHooks.step_annotated`).

    Observability turns the attributes into span attributes and metrics: the agents
    layer annotates its model steps with the GenAI semantic-convention names
    (`gen_ai.operation.name`, `gen_ai.request.model`, `gen_ai.usage.input_tokens`, ...)
    and its tool steps with `gen_ai.tool.name`. Values are str, bool, int, float or
    sequences of them; message content (`gen_ai.input.messages`) may be JSON-able data,
    which observers record only when asked to.

    Not journaled: an annotation describes one attempt and is not replayed. Outside a
    step body (a step called outside a workflow, workflow code) it does nothing, so the
    same function works in and out of runs. Without hooks it costs one lookup.
    """
    call = current_step_call()
    if call is None:
        return
    for notify in call.execution.worker.hooks.step_annotated:
        notify(call.info, attributes)


def record_event(name: str, **attributes: Any) -> None:
    """Tell the engine's hooks that something happened now (`EngineHooks.run_event`):
    observability adds it as a span event (on the step's span in a step body, on the
    run's span in workflow code) and counts Garrison's own events (`garrison.*`).

    In workflow code an event is reported only where the run is live, not while it
    replays its journal after a crash or a wake-up: an event between two journaled
    operations is reported once, or again if the process died before the next one
    was journaled (at least once). Values as for `annotate`. Not journaled; outside
    runs, or without hooks, it does nothing.
    """
    call = current_step_call()
    if call is not None:
        for notify in call.execution.worker.hooks.run_event:
            notify(call.info.run_id, call.info, name, attributes)
        return
    branch = current_branch()
    if branch is None:
        return
    execution = branch.execution
    listeners = execution.worker.hooks.run_event
    if not listeners or branch.replaying() or execution.replay_only:
        return
    token = enter_branch(None)  # a task a hook creates is not a fan-out of the run
    try:
        for notify in listeners:
            notify(execution.run_id, None, name, attributes)
    finally:
        leave_branch(token)


def replaying() -> bool:
    """Whether the workflow code calling this goes over what its run already did: its
    next journaled operation is in the journal (a resume after a crash or a wake-up, the
    reused part of a fork), or it runs under `app.replay` (`garrison runs replay`). A
    side effect of workflow code that must happen once, a log line or a counter, is
    made when this is False. False in a step body (it runs live) and outside runs."""
    if current_step_call() is not None:
        return False
    branch = current_branch()
    if branch is None:
        return False
    return branch.execution.replay_only or branch.replaying()
