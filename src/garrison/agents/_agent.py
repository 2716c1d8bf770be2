"""`Agent`: a model, instructions and tools, run as a durable Garrison workflow.

An agent run is an ordinary run of the workflow `agent:NAME`: each model call is a
journaled step (`agent.NAME.model`) and each tool call too (`tool.TOOL`), so a crash
mid-conversation resumes without paying again for model calls that answered and
without repeating a completed tool call. The loop itself (`_loop.py`) is workflow code:
deterministic, a function of the journal.
"""

from __future__ import annotations

import json
import re
import weakref
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pydantic

from garrison.agents._budget import Budget, LoopGuard
from garrison.agents._events import AgentEvent, FinalOutput, event_from_record
from garrison.agents._messages import Message, ModelSettings, Usage, messages_from
from garrison.agents._model import Model, resolve_model
from garrison.agents._pricing import PriceTable
from garrison.agents._tools import Tool
from garrison.errors import ConfigurationError, GarrisonError, WorkflowFailed
from garrison.resilience import CircuitBreaker, Retry

if TYPE_CHECKING:
    from garrison.engine import Garrison, RunHandle
    from garrison.engine._registry import WorkflowDef

__all__ = ["Agent", "AgentResult", "AgentTool", "Handoff"]

_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,48}$")


def _retryable(error: BaseException) -> bool:
    """Provider errors marked retryable, and a step attempt past its `model_timeout_s`."""
    return bool(getattr(error, "retryable", False)) or isinstance(error, TimeoutError)


DEFAULT_MODEL_RETRY = Retry(max_attempts=3, base=0.5, cap=10.0, retry_on=_retryable)


@dataclass(frozen=True, slots=True)
class AgentResult:
    """What an agent run produced.

    Attributes:
        output: the final answer: a `str`, or an instance of the agent's `output_type`.
        usage: tokens and calls of the whole run (delegated agents included).
        cost_usd: what those tokens cost, from the price table, at the time of each call.
        model: the model that served the last call ("openai:gpt-4o-mini").
        models_used: every model that served a call, in order of first use.
        agent: the agent that gave the answer (after handoffs, maybe another one).
        messages: the conversation (without system prompts); pass it as `history=` to
            go on with it.
        run_id: the run; `app.handle(run_id)` and `garrison runs show` work on it.
    """

    output: Any
    usage: Usage
    cost_usd: float
    model: str
    models_used: list[str]
    agent: str
    messages: list[Message]
    run_id: str
    turns: int = 0
    fallbacks: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Handoff:
    """A handoff target as the model sees it: the tool `transfer_to_NAME`."""

    agent: Agent
    tool_name: str
    description: str

    def spec(self) -> dict[str, Any]:
        return {"name": self.tool_name, "description": self.description,
                "parameters": {"type": "object", "properties": {}}}


class AgentTool:
    """Another agent offered as a tool (`Agent.as_tool`): each call is a child run of it,
    with its own budget and deadline; its usage and cost count in the caller's too."""

    def __init__(self, agent: Agent, *, name: str | None = None,
                 description: str | None = None, budget: Budget | None = None,
                 timeout_s: float | None = None) -> None:
        self.agent = agent
        self.name = name or agent.name
        self.description = description or agent.description or f"Ask the {agent.name} agent"
        self.budget = budget
        self.timeout_s = timeout_s
        self.requires_approval = False
        self.side_effects = False
        self.parameters: dict[str, Any] = {
            "type": "object",
            "properties": {"input": {"type": "string",
                                     "description": "What to ask, in full sentences."}},
            "required": ["input"]}

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description,
                "parameters": self.parameters}

    def validate(self, arguments: str) -> dict[str, Any]:
        try:
            parsed = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as exc:
            raise ValueError(f"arguments are not valid JSON ({exc.msg}); send "
                             '{"input": "..."}') from None
        if not isinstance(parsed, dict) or not isinstance(parsed.get("input"), str):
            raise ValueError(f'{self.name} takes {{"input": "<text>"}}')
        return {"input": parsed["input"]}


@dataclass(slots=True)
class _Binding:
    """An agent's registration on one app: its workflow and step callables."""

    workflow: Callable[..., Any]
    definition: WorkflowDef
    model_step: Callable[..., Any]
    tool_steps: dict[str, Callable[..., Any]]


class Agent:
    """A durable agent: `await agent.run(app, "...")`.

    Args:
        name: the agent's name (workflow `agent:NAME`); letters, digits, '_' and '-'.
        model: "openai:NAME", "anthropic:NAME" or a `Model`.
        instructions: the system prompt.
        tools: `@tool` functions, and other agents' `as_tool()`.
        output_type: validate the final answer into this type (a pydantic model, a
            dataclass, any type pydantic validates); invalid answers are sent back with
            the error `output_retries` times, then the next model of the chain tries.
        fallback_models: tried in order when a model fails (after its retries) or
            cannot produce valid output.
        handoffs: agents this one may pass the conversation to (`transfer_to_NAME`).
        max_turns: model calls per run at most (`MaxTurnsExceeded`).
        budget: limits per run (`BudgetExceeded`).
        model_settings: temperature, max tokens, ...
        retry: how a failed model call is retried (default: 3 attempts, jittered
            backoff, only errors the provider marks retryable, honouring Retry-After);
            the wait is a durable timer.
        model_timeout_s: a deadline per model call attempt.
        breaker: a `garrison.resilience.CircuitBreaker`, one per model of the chain
            (keyed by the model's name, shared across the fleet): an open breaker sends
            the call straight to the next model instead of waiting on a dead one.
        prices: the price table for cost (default: common models' list prices).
        loop_guard: loop detection (default: 3 identical calls, or a cycle repeated 3
            times).
        max_tool_repairs: rounds of invalid or unknown tool calls sent back to the model
            before `ToolCallError`.
        approval_timeout_s: how long a tool waits for approval before it counts as
            rejected (None: forever).
        description: what other agents are told about this one (handoffs, as_tool).
        version: the workflow's code version (default: the app's).
    """

    def __init__(self, name: str, *, model: str | Model, instructions: str = "",
                 tools: Sequence[Tool | AgentTool] = (), output_type: Any = str,
                 fallback_models: Sequence[str | Model] = (),
                 handoffs: Sequence[Agent] = (), max_turns: int = 10,
                 budget: Budget | None = None, model_settings: ModelSettings | None = None,
                 retry: Retry | None = DEFAULT_MODEL_RETRY,
                 model_timeout_s: float | None = None, breaker: CircuitBreaker | None = None,
                 prices: PriceTable | None = None,
                 loop_guard: LoopGuard | None = None, output_retries: int = 2,
                 max_tool_repairs: int = 3, approval_timeout_s: float | None = None,
                 description: str = "", version: str | None = None) -> None:
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigurationError(
                f"Agent(name={name!r}): 1-48 letters, digits, '_' or '-' (it names the "
                "workflow and the handoff tool)")
        if not isinstance(max_turns, int) or max_turns < 1:
            raise ConfigurationError(f"Agent({name!r}, max_turns={max_turns!r}): an int >= 1")
        if output_retries < 0 or max_tool_repairs < 0:
            raise ConfigurationError(
                f"Agent({name!r}): output_retries and max_tool_repairs are >= 0")
        self.name = name
        self.models: list[Model] = [resolve_model(model)] + [
            resolve_model(m) for m in fallback_models]
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ConfigurationError(
                f"Agent({name!r}): the model chain names a model twice ({names}); each "
                "model appears once")
        self.instructions = instructions
        self.description = description
        self.output_type = output_type
        self.max_turns = max_turns
        self.budget = budget
        self.model_settings = model_settings or ModelSettings()
        self.retry = retry
        self.model_timeout_s = model_timeout_s
        self.breaker = breaker
        self.prices = prices or PriceTable()
        self.loop_guard = loop_guard or LoopGuard()
        self.output_retries = output_retries
        self.max_tool_repairs = max_tool_repairs
        self.approval_timeout_s = approval_timeout_s
        self.version = version
        self.tools: dict[str, Tool | AgentTool] = {}
        for t in tools:
            if not isinstance(t, Tool | AgentTool):
                raise ConfigurationError(
                    f"Agent({name!r}, tools=...): {t!r} is not a tool; decorate the function "
                    "with @tool, or pass other_agent.as_tool()")
            if t.name in self.tools:
                raise ConfigurationError(f"Agent({name!r}): two tools are named {t.name!r}")
            self.tools[t.name] = t
        self.handoffs: dict[str, Handoff] = {}
        for other in handoffs:
            handoff = Handoff(other, f"transfer_to_{other.name}",
                              f"Hand the conversation to the {other.name} agent"
                              + (f": {other.description}" if other.description else ""))
            if handoff.tool_name in self.tools:
                raise ConfigurationError(
                    f"Agent({name!r}): tool {handoff.tool_name!r} clashes with a handoff")
            self.handoffs[handoff.tool_name] = handoff
        self._adapter: pydantic.TypeAdapter[Any] | None = (
            None if output_type is str else pydantic.TypeAdapter(output_type))
        self.output_schema: dict[str, Any] | None = (
            self._adapter.json_schema() if self._adapter is not None else None)
        self._bindings: weakref.WeakKeyDictionary[Garrison, _Binding] = (
            weakref.WeakKeyDictionary())

    def __repr__(self) -> str:
        return f"Agent({self.name!r}, model={self.models[0].name!r})"

    @property
    def workflow_name(self) -> str:
        return f"agent:{self.name}"

    def as_tool(self, *, name: str | None = None, description: str | None = None,
                budget: Budget | None = None, timeout_s: float | None = None) -> AgentTool:
        """This agent as a tool of another: each call is a child run with its own budget
        (default: this agent's) and an optional deadline (seconds, durable)."""
        return AgentTool(self, name=name, description=description, budget=budget,
                         timeout_s=timeout_s)

    def tool_specs(self) -> list[dict[str, Any]]:
        """What the model is offered: the tools, then the handoffs."""
        return [t.spec() for t in self.tools.values()] + [
            h.spec() for h in self.handoffs.values()]

    # -- registration ----------------------------------------------------------------

    def __garrison_register__(self, app: Garrison) -> WorkflowDef:
        """Register the agent's workflow and steps on `app` (once; `app.add_agent`)."""
        return self.bind(app).definition

    def bind(self, app: Garrison) -> _Binding:
        """This agent's workflow and steps on `app`, registered on first use, with every
        agent it hands off to or delegates to."""
        binding = self._bindings.get(app)
        if binding is not None:
            return binding
        from garrison.agents._loop import make_model_step, make_workflow

        if f"agent.{self.name}.model" in app.registry.steps:
            raise ConfigurationError(
                f"another Agent named {self.name!r} is registered on this app; agent names "
                "are unique per app (they name the workflow agent:NAME): reuse that Agent "
                "object or give this one another name")
        if self.breaker is not None:
            app.share_breaker(self.breaker)
        model_step = app.step(name=f"agent.{self.name}.model", retry=self.retry,
                              timeout=self.model_timeout_s)(make_model_step(self, app))
        tool_steps: dict[str, Callable[..., Any]] = {}
        for t in self.tools.values():
            if isinstance(t, Tool):
                tool_steps[t.name] = app.step(name=f"tool.{t.name}", retry=t.retry,
                                              timeout=t.timeout)(t.step_fn)
        workflow = app.workflow(name=self.workflow_name, version=self.version)(
            make_workflow(self, app))
        binding = _Binding(workflow, app.workflow_definition(workflow), model_step,
                           tool_steps)
        self._bindings[app] = binding
        for other in [h.agent for h in self.handoffs.values()] + [
                t.agent for t in self.tools.values() if isinstance(t, AgentTool)]:
            other.bind(app)
        return binding

    # -- running ---------------------------------------------------------------------

    def _options(self, stream: bool, budget: Budget | None) -> dict[str, Any]:
        chosen = budget or self.budget
        return {"stream": stream, "budget": chosen.to_dict() if chosen else None}

    async def start(self, app: Garrison, prompt: str, *, run_id: str | None = None,
                    history: Sequence[Message | Mapping[str, Any]] | None = None,
                    budget: Budget | None = None, stream: bool = False,
                    queue: str | None = None) -> RunHandle[Any]:
        """Start a run and return its handle at once (idempotent on `run_id`)."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ConfigurationError(f"agent {self.name!r}: the prompt is a non-empty str")
        binding = self.bind(app)
        past = [m.to_dict() for m in messages_from(history)]
        return await app.start(binding.workflow, prompt, past, self._options(stream, budget),
                               run_id=run_id, queue=queue)

    async def run(self, app: Garrison, prompt: str, *, run_id: str | None = None,
                  history: Sequence[Message | Mapping[str, Any]] | None = None,
                  budget: Budget | None = None, queue: str | None = None) -> AgentResult:
        """Run the agent durably to its answer (idempotent on `run_id`: a finished run's
        result is returned again, an unfinished one is waited for).

        Raises the run's error as its own type when it is loaded here
        (`BudgetExceeded`, `LoopDetected`, a `ProviderError` ...), else `WorkflowFailed`.
        """
        handle = await self.start(app, prompt, run_id=run_id, history=history,
                                  budget=budget, queue=queue)
        return await self.result(handle)

    async def result(self, handle: RunHandle[Any]) -> AgentResult:
        """The `AgentResult` of a run of this agent (waits for its end)."""
        try:
            data = await handle.result()
        except WorkflowFailed as failed:
            raise await _original_error(handle, failed) from failed
        return self.result_from(data, handle.run_id)

    def result_from(self, data: Mapping[str, Any], run_id: str) -> AgentResult:
        """An `AgentResult` from a run's stored result."""
        output = data.get("output")
        answered_by = self._reachable().get(str(data.get("agent")), self)
        if answered_by._adapter is not None:  # after a handoff: the answering agent's type
            output = answered_by._adapter.validate_python(output)
        return AgentResult(
            output=output, usage=Usage.from_dict(data.get("usage") or {}),
            cost_usd=float(data.get("cost_usd", 0.0)), model=str(data.get("model", "")),
            models_used=list(data.get("models_used") or []), agent=str(data.get("agent")),
            messages=messages_from(data.get("messages")), run_id=run_id,
            turns=int(data.get("turns", 0)), fallbacks=list(data.get("fallbacks") or []))

    def _reachable(self) -> dict[str, Agent]:
        """This agent and every agent it can hand the conversation to, by name."""
        found: dict[str, Agent] = {}
        todo = [self]
        while todo:
            agent = todo.pop()
            if agent.name not in found:
                found[agent.name] = agent
                todo.extend(h.agent for h in agent.handoffs.values())
        return found

    async def stream(self, app: Garrison, prompt: str, *, run_id: str | None = None,
                     history: Sequence[Message | Mapping[str, Any]] | None = None,
                     budget: Budget | None = None, after: int = 0
                     ) -> AsyncIterator[AgentEvent]:
        """Run the agent and yield its events as they happen: text deltas, tool calls
        and results, handoffs, approvals, then `FinalOutput`.

        The events are journaled: a client that lost its connection calls this again
        with the same `run_id` and `after=` the last offset it saw (or
        `app.stream(run_id, after=)` for the raw records) and goes on from there; a
        run that crashed mid-stream resumes without repeating what was shown.
        """
        handle = await self.start(app, prompt, run_id=run_id, history=history,
                                  budget=budget, stream=True)
        last = after
        async for record in app.stream(handle.run_id, after=after):
            last = record.offset
            event = event_from_record(record)
            if event is not None:
                yield event
        yield FinalOutput(last, await self.result(handle))


async def _original_error(handle: RunHandle[Any], failed: WorkflowFailed) -> BaseException:
    """The run's journaled error rebuilt as its own type (when loaded), else `failed`."""
    from garrison.engine._codec import error_from_data

    record = await handle.record()
    if not record.error:
        return failed
    error = error_from_data(json.loads(record.error))
    return error if isinstance(error, GarrisonError) else failed
