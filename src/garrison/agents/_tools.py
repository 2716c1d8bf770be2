"""`@tool`: typed Python functions the model may call, with a JSON schema and validation.

The schema comes from the signature (pydantic builds it) and the docstring (its first
paragraph describes the tool, an `Args:` section describes each parameter). Arguments
are validated in the workflow, before any step runs: invalid arguments or an unknown
tool name go back to the model to repair, and never reach the function.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, get_type_hints, overload

import pydantic
import pydantic_core

from garrison.engine import annotate, current_step
from garrison.errors import ConfigurationError

__all__ = ["Tool", "ToolContext", "tool"]

_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


@dataclass(frozen=True, slots=True)
class ToolContext:
    """Given to a tool that declares a parameter annotated `ToolContext` (it is not part
    of the schema the model sees).

    `idempotency_key` is stable across retries and crash recoveries of this call: pass
    it to the external system (a payment API's Idempotency-Key) so a call that runs
    again after a crash is recognised as the same request.
    """

    run_id: str
    tool_call_id: str
    idempotency_key: str
    attempt: int


def _doc_parts(fn: Callable[..., Any]) -> tuple[str, dict[str, str]]:
    """The description (first paragraph) and the `Args:` entries of a docstring."""
    doc = inspect.getdoc(fn) or ""
    description = doc.split("\n\n", 1)[0].strip()
    params: dict[str, str] = {}
    match = re.search(r"^(?:Args|Arguments|Parameters):\s*$(.*?)(?=^\S|\Z)", doc,
                      re.MULTILINE | re.DOTALL)
    if match:
        current: str | None = None
        for line in match.group(1).splitlines():
            entry = re.match(r"^\s+(\w+)(?:\s*\([^)]*\))?\s*:\s*(.*)$", line)
            if entry:
                current = entry.group(1)
                params[current] = entry.group(2).strip()
            elif current and line.strip():
                params[current] += " " + line.strip()
    return description, params


class Tool:
    """A function the model may call. Made by `@tool`; `Agent(tools=[...])` takes it.

    Attributes:
        name: what the model calls it (the function's name by default).
        description: what the model reads (the docstring's first paragraph).
        side_effects: the tool changes the world (a refund, an email). It runs at most
            once per completed call, at least once if a crash interrupts it: it gets
            `ToolContext.idempotency_key` to make the repeat harmless. Not retried
            automatically unless `retry=` says so.
        idempotent: running it twice is harmless (reads; writes keyed by the
            idempotency key). Defaults to `not side_effects`.
        requires_approval: the run parks on a durable wait until
            `app.send(run_id, "approval", True | False | {"approved": bool, "reason":
            str})`; a rejection goes back to the model as the tool's result.
        retry, timeout: the step policies for the call (`garrison.resilience.Retry`,
            seconds).
    """

    def __init__(self, fn: Callable[..., Any], *, name: str | None = None,
                 description: str | None = None, side_effects: bool = False,
                 idempotent: bool | None = None, requires_approval: bool = False,
                 retry: Any = None, timeout: float | None = None) -> None:
        if not callable(fn):
            raise ConfigurationError(f"@tool decorates a function, got {fn!r}")
        self.fn = fn
        self.name = name or fn.__name__
        if not _NAME.match(self.name):
            raise ConfigurationError(
                f"tool name {self.name!r}: 1-64 letters, digits, '_' or '-' (what providers "
                "accept); pass @tool(name=...)")
        doc_description, param_docs = _doc_parts(fn)
        self.description = description or doc_description or self.name
        self.side_effects = side_effects
        self.idempotent = (not side_effects) if idempotent is None else idempotent
        self.requires_approval = requires_approval
        self.retry = retry
        self.timeout = timeout
        self.is_async = inspect.iscoroutinefunction(fn)
        self._context_param: str | None = None
        fields: dict[str, Any] = {}
        try:
            hints = get_type_hints(fn)
        except Exception as exc:
            raise ConfigurationError(
                f"tool {self.name!r}: its annotations cannot be resolved ({exc}); import the "
                "types it names at module level") from exc
        for param in inspect.signature(fn).parameters.values():
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                raise ConfigurationError(
                    f"tool {self.name!r}: *{param.name} cannot be described to a model; "
                    "give every parameter a name and a type")
            annotation = hints.get(param.name, Any)
            if annotation is ToolContext:
                self._context_param = param.name
                continue
            default = ... if param.default is param.empty else param.default
            fields[param.name] = (annotation, pydantic.Field(
                default, description=param_docs.get(param.name)))
        try:
            self.arguments_model: type[pydantic.BaseModel] = pydantic.create_model(
                f"{self.name}_arguments", **fields)
            schema = self.arguments_model.model_json_schema()
        except pydantic.PydanticUserError as exc:
            raise ConfigurationError(f"tool {self.name!r}: {exc}") from exc
        schema.pop("title", None)
        self.parameters: dict[str, Any] = schema
        # The step body, made once so every agent (and app) registers the same function.
        self.step_fn: Callable[..., Any] = self._make_step_fn()

    def __repr__(self) -> str:
        return f"Tool({self.name!r})"

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the function directly (not journaled), as in a unit test."""
        result = self.fn(*args, **kwargs)
        return await result if inspect.isawaitable(result) else result

    def spec(self) -> dict[str, Any]:
        """What the model is told: name, description and the JSON schema."""
        return {"name": self.name, "description": self.description,
                "parameters": self.parameters}

    def validate(self, arguments: str) -> dict[str, Any]:
        """The model's raw JSON arguments, validated, as JSON-able values.

        Raises `ValueError` with a message meant for the model to repair its call.
        """
        try:
            parsed = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as exc:
            raise ValueError(f"arguments are not valid JSON ({exc.msg} at char {exc.pos}); "
                             f"send a JSON object matching {json.dumps(self.parameters)}"
                             ) from None
        if not isinstance(parsed, dict):
            raise ValueError(f"arguments must be a JSON object, got {type(parsed).__name__}")
        try:
            model = self.arguments_model.model_validate(parsed)
        except pydantic.ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}"
                for e in exc.errors())
            raise ValueError(f"invalid arguments for {self.name}: {problems}") from None
        dumped: dict[str, Any] = model.model_dump(mode="json")
        return dumped

    def _make_step_fn(self) -> Callable[..., Any]:
        def prepare(tool_call_id: str, arguments: Mapping[str, Any]) -> dict[str, Any]:
            annotate(**{"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": self.name,
                        "gen_ai.tool.call.id": tool_call_id, "gen_ai.tool.type": "function",
                        "garrison.span.name": f"execute_tool {self.name}"})
            values = dict(self.arguments_model.model_validate(dict(arguments)))
            if self._context_param is not None:
                step = current_step()
                values[self._context_param] = ToolContext(
                    step.run_id, tool_call_id, step.idempotency_key, step.attempt)
            return values

        if self.is_async:
            async def run_async(tool_call_id: str, arguments: Mapping[str, Any]) -> Any:
                result = await self.fn(**prepare(tool_call_id, arguments))
                return pydantic_core.to_jsonable_python(result)

            run_async.__name__ = run_async.__qualname__ = f"tool_{self.name}"
            return run_async

        def run_sync(tool_call_id: str, arguments: Mapping[str, Any]) -> Any:
            return pydantic_core.to_jsonable_python(self.fn(**prepare(tool_call_id, arguments)))

        run_sync.__name__ = run_sync.__qualname__ = f"tool_{self.name}"
        return run_sync


@overload
def tool(fn: Callable[..., Any], /) -> Tool: ...


@overload
def tool(*, name: str | None = None, description: str | None = None,
         side_effects: bool = False, idempotent: bool | None = None,
         requires_approval: bool = False, retry: Any = None,
         timeout: float | None = None) -> Callable[[Callable[..., Any]], Tool]: ...


def tool(fn: Callable[..., Any] | None = None, /, *, name: str | None = None,
         description: str | None = None, side_effects: bool = False,
         idempotent: bool | None = None, requires_approval: bool = False,
         retry: Any = None, timeout: float | None = None
         ) -> Tool | Callable[[Callable[..., Any]], Tool]:
    """Make a function (sync or async) a tool: `@tool` or `@tool(side_effects=True, ...)`.

    Each call the model makes is a journaled step: a completed call never runs again
    for that run. See `Tool` for the options.
    """
    def make(f: Callable[..., Any]) -> Tool:
        return Tool(f, name=name, description=description, side_effects=side_effects,
                    idempotent=idempotent, requires_approval=requires_approval,
                    retry=retry, timeout=timeout)

    return make(fn) if fn is not None else make


def result_text(value: Any) -> str:
    """A tool's result as the text the model reads."""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)
