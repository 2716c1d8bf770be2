"""The agent loop: workflow code around two kinds of steps (model calls, tool calls).

Everything the loop decides (which tool, whether a budget is spent, whether output is
valid, when to fall back) is a function of the journaled step outputs, so a replay
after a crash takes the same path and only the step that was in flight runs again.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pydantic

from garrison._log import get_logger
from garrison.agents._budget import Budget, call_signature
from garrison.agents._messages import Message, ModelSettings, ToolCall, Usage
from garrison.agents._tools import result_text
from garrison.engine import Context, annotate, current_step, publish, record_event, replaying
from garrison.errors import (
    CircuitOpenError,
    DeadlineExceeded,
    MaxTurnsExceeded,
    OutputValidationError,
    ProviderError,
    ResultTimeoutError,
    ToolCallError,
    WorkflowCancelled,
    WorkflowFailed,
)

if TYPE_CHECKING:
    from garrison.agents._agent import Agent
    from garrison.engine import Garrison

__all__ = ["make_model_step", "make_workflow"]

log = get_logger(__name__)

_FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.DOTALL)


# -- the model step -------------------------------------------------------------------

class _DeltaWriter:
    """Publishes a streamed answer's text so that a re-run of the same model call (after
    a crash or a retry) does not show the client text twice.

    The client has seen, for this step, the text since the last reset. A new attempt
    publishes only what goes beyond that; if it answers differently, it publishes a
    reset and its own text. Keys are derived from the durable stream, never from the
    attempt number (which a crash resets).
    """

    def __init__(self, app: Garrison, agent: str) -> None:
        step = current_step()
        self.app = app
        self.agent = agent
        self.run_id = step.run_id
        self.prefix = f"{step.position}/"
        self.generation = 0
        self.shown = ""
        self.text = ""

    async def load(self) -> None:
        for record in await self.app.store.read_stream(self.run_id, key_prefix=self.prefix,
                                                       limit=100_000):
            if record.kind == "agent.reset":
                self.generation += 1
                self.shown = ""
            elif record.kind == "agent.text":
                self.shown += json.loads(record.data)["text"]

    async def _emit(self, text: str) -> None:
        key = f"{self.prefix}g{self.generation}/t{len(self.shown)}"
        await publish("agent.text", {"agent": self.agent, "text": text}, key=key)
        self.shown += text

    async def _reset(self) -> None:
        self.generation += 1
        await publish("agent.reset", {"agent": self.agent},
                      key=f"{self.prefix}g{self.generation}/reset")
        self.shown = ""

    async def write(self, piece: str) -> None:
        self.text += piece
        if self.shown.startswith(self.text):
            return  # already shown by an earlier attempt
        if not self.text.startswith(self.shown):
            await self._reset()
        await self._emit(self.text[len(self.shown):])

    async def finish(self, content: str | None) -> None:
        final = content or ""
        if self.shown != final:
            if not final.startswith(self.shown):
                await self._reset()
            if final[len(self.shown):]:
                await self._emit(final[len(self.shown):])


def make_model_step(agent: Agent, app: Garrison) -> Callable[..., Coroutine[Any, Any, Any]]:
    """The body of `agent.NAME.model`: one call to one model of the agent's chain."""
    by_name = {m.name: m for m in agent.models}
    tools = agent.tool_specs()

    async def model_call(model: str, messages: list[dict[str, Any]],
                         settings: dict[str, Any], stream: bool) -> dict[str, Any]:
        chosen = by_name[model]
        conversation = [Message.system(agent.instructions)] if agent.instructions else []
        conversation += [Message.from_dict(m) for m in messages]
        writer = _DeltaWriter(app, agent.name) if stream else None
        if writer is not None:
            await writer.load()
        request = (chosen.request if agent.breaker is None
                   else functools.partial(agent.breaker.for_key(chosen.name).call,
                                          chosen.request))
        annotate(**{  # for observers (OpenTelemetry GenAI conventions); content is
            # recorded only if they were told to capture it
            "gen_ai.operation.name": "chat", "gen_ai.provider.name": chosen.provider,
            "gen_ai.request.model": chosen.model_name, "gen_ai.agent.name": agent.name,
            "garrison.span.name": f"chat {chosen.model_name}",
            "gen_ai.input.messages": conversation})
        response = await request(
            conversation, tools=tools, settings=ModelSettings.from_dict(settings),
            output_schema=agent.output_schema,
            on_delta=writer.write if writer is not None else None)
        if writer is not None:
            await writer.finish(response.message.content)
            for i, call in enumerate(response.message.tool_calls):
                await publish("agent.tool_call", {"agent": agent.name, "id": call.id,
                                                  "name": call.name,
                                                  "arguments": call.arguments},
                              key=f"{writer.prefix}call{i}")
        cost = agent.prices.cost_usd(chosen.model_name, response.usage)
        annotate(**{"gen_ai.response.model": response.model,
                    "gen_ai.usage.input_tokens": response.usage.input_tokens,
                    "gen_ai.usage.output_tokens": response.usage.output_tokens,
                    "gen_ai.response.finish_reasons": (response.finish_reason,),
                    "garrison.gen_ai.cost_usd": cost,
                    "gen_ai.output.messages": [response.message]})
        return {"message": response.message.to_dict(), "usage": response.usage.to_dict(),
                "model": response.model, "served_by": chosen.name,
                "finish_reason": response.finish_reason, "cost_usd": cost}

    model_call.__name__ = model_call.__qualname__ = f"model_{agent.name}"
    return model_call


# -- the workflow ---------------------------------------------------------------------

@dataclass(slots=True)
class _State:
    """One run's conversation and totals, rebuilt from the journal on every replay."""

    run_id: str
    agent: Agent
    budget: Budget | None
    stream: bool
    messages: list[Message]
    usage: Usage = field(default_factory=Usage)
    cost_usd: float = 0.0
    turns: int = 0
    model_floor: dict[str, int] = field(default_factory=dict)  # agent -> first model left
    models_used: list[str] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)  # tool call signatures, for loops
    last_model: str = ""
    output_repairs: int = 0
    tool_repairs: int = 0
    output_errors: dict[str, str] = field(default_factory=dict)

    async def publish(self, kind: str, data: dict[str, Any], key: str) -> None:
        if self.stream:
            await publish(kind, data, key=key)


def make_workflow(agent: Agent, app: Garrison) -> Callable[..., Coroutine[Any, Any, Any]]:
    """The workflow `agent:NAME`."""

    async def agent_run(ctx: Context, prompt: str, history: list[dict[str, Any]],
                        options: dict[str, Any]) -> dict[str, Any]:
        state = _State(ctx.run_id, agent,
                       Budget.from_dict(options.get("budget")) or agent.budget,
                       bool(options.get("stream")),
                       [Message.from_dict(m) for m in history] + [Message.user(prompt)])
        while True:
            active = state.agent
            if state.turns >= active.max_turns:
                raise MaxTurnsExceeded(
                    f"run {state.run_id} (agent {active.name!r}): {active.max_turns} model "
                    "calls without a final answer; raise max_turns or check the tools' "
                    "results", run_id=state.run_id, agent=active.name)
            if state.budget is not None:
                state.budget.check_model_call(state.usage, state.cost_usd,
                                              run_id=state.run_id, agent=active.name)
            reply = await _call_models(app, state)
            message = reply.message
            if message.tool_calls:
                await _run_tool_calls(ctx, app, state, message.tool_calls)
                continue
            done = await _final_output(state, message)
            if done is not None:
                return done

    agent_run.__name__ = agent_run.__qualname__ = f"agent_{agent.name}"
    return agent_run


@dataclass(frozen=True, slots=True)
class _Reply:
    message: Message


async def _call_models(app: Garrison, state: _State) -> _Reply:
    """One model call, through the active agent's chain from its floor: a model that
    fails (after its retries) hands the same call to the next one."""
    active = state.agent
    binding = active.bind(app)
    settings = active.model_settings
    if state.budget is not None:
        settings = settings.capped(state.budget.tokens_left(state.usage))
    start = state.model_floor.get(active.name, 0)
    errors: list[Exception] = []
    for index, model in enumerate(active.models[start:], start):
        state.turns += 1
        try:
            out = await binding.model_step(model.name, [m.to_dict() for m in state.messages],
                                           settings.to_dict(), state.stream)
        except (ProviderError, DeadlineExceeded, CircuitOpenError) as exc:  # retries spent
            errors.append(exc)
            if not replaying():  # once, when it happened; not again on each replay
                log.warning("agent.model_failed", run_id=state.run_id, agent=active.name,
                            model=model.name, kind=getattr(exc, "kind", None),
                            error=str(exc))
            if index + 1 < len(active.models):
                # The rest of this run goes to the next model: a model that failed its
                # retries (or cannot serve at all) is not paid again on every turn.
                state.model_floor[active.name] = index + 1
                state.fallbacks.append(model.name)
                record_event("garrison.model.fallback", **{
                    "gen_ai.agent.name": active.name, "garrison.fallback.from": model.name,
                    "garrison.fallback.to": active.models[index + 1].name,
                    "garrison.fallback.reason": "error",
                    "error.type": getattr(exc, "kind", None) or type(exc).__name__})
                # Whatever it streamed before failing is not the answer.
                await state.publish("agent.reset", {"agent": active.name},
                                    f"fallback:{state.turns}")
            continue
        usage = Usage.from_dict(out["usage"])
        state.usage += usage
        state.cost_usd += float(out["cost_usd"])
        state.last_model = str(out["served_by"])
        if state.last_model not in state.models_used:
            state.models_used.append(state.last_model)
        data = dict(out["message"])
        data["agent"] = active.name
        message = Message.from_dict(data)
        state.messages.append(message)
        return _Reply(message)
    raise errors[-1]


async def _run_tool_calls(ctx: Context, app: Garrison, state: _State,
                          calls: tuple[ToolCall, ...]) -> None:
    """Answer every tool call of one assistant message, in order."""
    from garrison.agents._agent import AgentTool

    active = state.agent
    turn = state.turns
    failed = False
    for i, call in enumerate(calls):
        key = f"tool:{turn}:{i}"
        handoff = active.handoffs.get(call.name)
        if handoff is not None:
            _tool_message(state, call, f"Transferred to {handoff.agent.name}.")
            await state.publish("agent.handoff", {"from": active.name,
                                                  "to": handoff.agent.name}, key)
            for rest in calls[i + 1:]:
                _tool_message(state, rest, "Not run: the conversation was handed off.",
                              error=True)
            state.agent = handoff.agent
            return
        target = active.tools.get(call.name)
        if target is None:
            failed = True
            known = ", ".join(sorted([*active.tools, *active.handoffs])) or "none"
            await _answer(state, call, f"Error: there is no tool {call.name!r}; the tools "
                          f"are: {known}.", key, error=True)
            continue
        try:
            arguments = target.validate(call.arguments)
        except ValueError as exc:
            failed = True
            await _answer(state, call, f"Error: {exc}", key, error=True)
            continue
        state.calls.append(call_signature(call))
        active.loop_guard.check(state.calls, run_id=state.run_id, agent=active.name)
        if state.budget is not None:
            state.budget.check_tool_call(state.usage, run_id=state.run_id, agent=active.name)
        if target.requires_approval:
            await state.publish("agent.approval", {"agent": active.name, "id": call.id,
                                                   "name": call.name,
                                                   "arguments": call.arguments},
                                f"approval:{turn}:{i}")
            approved, reason = _decision(await ctx.wait_for(
                "approval", timeout=active.approval_timeout_s, default=None))
            if not approved:
                await _answer(state, call, "The call was not approved"
                              + (f": {reason.rstrip('.')}." if reason else ".")
                              + " Do not retry it; tell the user.", key, error=True)
                continue
        state.usage += Usage(tool_calls=1)
        if isinstance(target, AgentTool):
            text, is_error = await _delegate(ctx, app, state, target, call,
                                             arguments["input"])
        else:
            text, is_error = await _call_tool(active.bind(app).tool_steps[call.name],
                                              call, arguments)
        await _answer(state, call, text, key, error=is_error)
    state.tool_repairs = state.tool_repairs + 1 if failed else 0
    if state.tool_repairs > active.max_tool_repairs:
        raise ToolCallError(
            f"run {state.run_id} (agent {active.name!r}): {state.tool_repairs} rounds of "
            "unknown tools or invalid arguments in a row; last: "
            f"{state.messages[-1].content}", run_id=state.run_id, agent=active.name,
            last_error=state.messages[-1].content)


async def _call_tool(step: Callable[..., Any], call: ToolCall,
                     arguments: dict[str, Any]) -> tuple[str, bool]:
    try:
        return result_text(await step(call.id, arguments)), False
    except Exception as exc:  # a tool's failure is the model's to handle, not the run's
        return f"Error: the tool failed: {type(exc).__name__}: {exc}", True


async def _delegate(ctx: Context, app: Garrison, state: _State, target: Any,
                    call: ToolCall, prompt: str) -> tuple[str, bool]:
    """Run another agent as a child run; its usage and cost count here too. The two
    events tell observability which tool call the child run is (`execute_tool` span)."""
    tool = {"gen_ai.tool.name": call.name, "gen_ai.tool.call.id": call.id}
    record_event("garrison.agent.tool_call", **tool)
    try:
        text, is_error = await _run_child(ctx, app, state, target, prompt)
    except Exception as exc:  # the child could not be started or awaited: the run fails
        record_event("garrison.agent.tool_result", **tool, **{"error.type": type(exc).__qualname__})
        raise
    record_event("garrison.agent.tool_result", **tool,
                 **({"error.type": "AgentToolError"} if is_error else {}))
    return text, is_error


async def _run_child(ctx: Context, app: Garrison, state: _State, target: Any,
                     prompt: str) -> tuple[str, bool]:
    child = target.agent
    budget = target.budget or child.budget
    handle = await ctx.start_child(child.bind(app).workflow, prompt, [],
                                   {"stream": False,
                                    "budget": budget.to_dict() if budget else None})
    try:
        data = await handle.result(timeout=target.timeout_s)
    except WorkflowFailed as exc:
        return f"Error: the {child.name} agent failed: {getattr(exc, 'error_message', exc)}", True
    except ResultTimeoutError:
        await handle.cancel()
        return (f"Error: the {child.name} agent did not answer within {target.timeout_s} s; "
                "its run was cancelled"), True
    except WorkflowCancelled:
        return f"Error: the {child.name} agent's run was cancelled", True
    state.usage += Usage.from_dict(data.get("usage") or {})
    state.cost_usd += float(data.get("cost_usd", 0.0))
    output = data.get("output")
    return (output if isinstance(output, str) else json.dumps(output)), False


def _tool_message(state: _State, call: ToolCall, text: str, *, error: bool = False) -> None:
    state.messages.append(Message("tool", text, tool_call_id=call.id, name=call.name,
                                  agent=state.agent.name, is_error=error))


async def _answer(state: _State, call: ToolCall, text: str, key: str, *,
                  error: bool = False) -> None:
    _tool_message(state, call, text, error=error)
    await state.publish("agent.tool_result", {"agent": state.agent.name, "id": call.id,
                                              "name": call.name, "result": text,
                                              "is_error": error}, key)


def _decision(value: Any) -> tuple[bool, str]:
    """An approval event's value: True/False, or {"approved": bool, "reason": str}."""
    if isinstance(value, Mapping):
        return bool(value.get("approved")), str(value.get("reason") or "")
    if value is None:
        return False, "no decision before the approval timeout"
    return bool(value), ""


async def _final_output(state: _State, message: Message) -> dict[str, Any] | None:
    """The run's result when the answer is valid; else a repair turn (None)."""
    active = state.agent
    text = message.content or ""
    output: Any = text
    adapter = active._adapter
    if adapter is not None:
        fenced = _FENCE.match(text)
        try:
            value = adapter.validate_json(fenced.group(1) if fenced else text)
        except pydantic.ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}"
                for e in exc.errors())
            state.output_errors[state.last_model] = problems
            state.output_repairs += 1
            # The streamed invalid answer is taken back before the repaired one comes.
            await state.publish("agent.reset", {"agent": active.name}, f"repair:{state.turns}")
            if state.output_repairs > active.output_retries:
                _next_model_for_output(state)
            state.messages.append(Message.user(
                "Your answer does not match the required output: " + problems
                + ". Reply with only JSON matching this schema: "
                + json.dumps(active.output_schema)))
            return None
        output = adapter.dump_python(value, mode="json")
    return {"output": output, "usage": state.usage.to_dict(), "cost_usd": state.cost_usd,
            "model": state.last_model, "models_used": state.models_used,
            "agent": active.name, "messages": [m.to_dict() for m in state.messages],
            "turns": state.turns, "fallbacks": state.fallbacks}


def _next_model_for_output(state: _State) -> None:
    """Repairs are spent on this model: the next model of the chain takes over."""
    active = state.agent
    names = [m.name for m in active.models]
    current = names.index(state.last_model) if state.last_model in names else 0
    if current + 1 >= len(names):
        raise OutputValidationError(
            f"run {state.run_id} (agent {active.name!r}): no model produced output "
            f"matching {getattr(active.output_type, '__name__', active.output_type)} "
            f"after {active.output_retries} repairs each; last errors: "
            f"{state.output_errors}", run_id=state.run_id, agent=active.name,
            errors=dict(state.output_errors))
    state.model_floor[active.name] = current + 1
    state.fallbacks.append(state.last_model)
    record_event("garrison.model.fallback", **{
        "gen_ai.agent.name": active.name, "garrison.fallback.from": state.last_model,
        "garrison.fallback.to": names[current + 1],
        "garrison.fallback.reason": "output_validation"})
    state.output_repairs = 0
    if not replaying():
        log.warning("agent.output_fallback", run_id=state.run_id, agent=active.name,
                    model=state.last_model, to=names[current + 1])

