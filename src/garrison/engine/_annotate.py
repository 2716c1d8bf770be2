"""`annotate`: a step body describes itself to observers, without importing them."""

from __future__ import annotations

from typing import Any

from garrison.engine._context import current_step_call

__all__ = ["annotate"]


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
