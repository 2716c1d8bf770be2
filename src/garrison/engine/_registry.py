"""What `@app.step()` and `@app.workflow()` register: definitions and the registry."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from garrison.errors import ConfigurationError

__all__ = ["Registry", "RetryPolicy", "StepDef", "WorkflowDef", "default_name"]


def default_name(fn: Callable[..., Any]) -> str:
    """The journal name of a function: its qualified name, or its plain name when it is
    defined inside another function (where `<locals>` would leak into the journal)."""
    qualname = str(getattr(fn, "__qualname__", None) or getattr(fn, "__name__", repr(fn)))
    return str(getattr(fn, "__name__", qualname)) if "<locals>" in qualname else qualname


class RetryPolicy(Protocol):
    """Decides whether a failed step runs again. `garrison.resilience.Retry` implements it."""

    def delay_s(self, attempt: int, error: BaseException, *,
                elapsed_s: float = 0.0) -> float | None:
        """Seconds to wait before attempt `attempt + 1`, or None to give up.

        `elapsed_s` is the time since the step's first attempt began (journaled, so it
        survives restarts). The wait is a durable timer.
        """
        ...


class Guard(Protocol):
    """Middleware around each attempt of a step: `await guard.call(fn, *args)` runs `fn`
    or refuses (raising). `garrison.resilience`'s CircuitBreaker, Bulkhead and RateLimiter
    are guards; so is any object with this method."""

    async def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any: ...


@dataclass(frozen=True, slots=True)
class StepDef:
    """A registered step: its journal name, function and options.

    `guards` wrap each attempt, the first outermost; `timeout` (seconds) bounds each
    attempt (capped by the run's remaining time).
    """

    name: str
    fn: Callable[..., Any]
    is_async: bool
    retry: RetryPolicy | None = None
    guards: tuple[Guard, ...] = ()
    timeout: float | None = None


@dataclass(frozen=True, slots=True)
class WorkflowDef:
    """A registered workflow: its journal name, version and function."""

    name: str
    version: str
    fn: Callable[..., Any]
    timeout: float | None = None  # run-level deadline, seconds from the start
    quarantine: bool = True  # a failed run ends QUARANTINED (redrivable), else FAILED

    def check_arguments(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
        """Refuse inputs the function cannot take (after its `Context`), before a run is
        stored with them: such a run could only fail on its first execution.

        Raises:
            ConfigurationError: naming the workflow, its parameters and what is wrong.
        """
        signature = _signature(self.fn)
        if signature is None:  # not introspectable (a builtin, some wrappers): unchecked
            return
        try:
            signature.bind(None, *args, **kwargs)
        except TypeError as exc:
            inputs = signature.replace(parameters=[  # after the Context, without annotations
                p.replace(annotation=inspect.Parameter.empty)
                for p in list(signature.parameters.values())[1:]])
            raise ConfigurationError(
                f"workflow {self.name!r} v{self.version} takes ctx, then {inputs}: {exc} "
                f"(given {len(args)} positional and keyword "
                f"{sorted(kwargs) if kwargs else 'none'}); pass the inputs it declares"
            ) from exc


@functools.lru_cache(maxsize=4096)
def _signature(fn: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return None


class Registry:
    """Steps by name; workflows by (name, version)."""

    def __init__(self) -> None:
        self.steps: dict[str, StepDef] = {}
        self.workflows: dict[tuple[str, str], WorkflowDef] = {}

    def add_step(
        self, fn: Callable[..., Any], name: str | None, retry: RetryPolicy | None,
        guards: tuple[Guard, ...] = (), timeout: float | None = None,
    ) -> StepDef:
        if not callable(fn):
            raise ConfigurationError(f"@app.step() decorates a function, got {fn!r}")
        step_name = name or default_name(fn)
        if retry is not None and not callable(getattr(retry, "delay_s", None)):
            raise ConfigurationError(
                f"step {step_name!r}: retry= takes an object with a delay_s(attempt, error, *, "
                "elapsed_s) "
                f"method (such as garrison.resilience.Retry), got {retry!r}",
                step_name=step_name,
            )
        for guard in guards:
            if not callable(getattr(guard, "call", None)):
                raise ConfigurationError(
                    f"step {step_name!r}: {guard!r} is not a guard (an object with an async "
                    "call(fn, *args) method, such as a CircuitBreaker)", step_name=step_name)
        if timeout is not None and (not isinstance(timeout, int | float) or timeout <= 0):
            raise ConfigurationError(
                f"step {step_name!r}: timeout={timeout!r} must be seconds > 0",
                step_name=step_name)
        existing = self.steps.get(step_name)
        if existing is not None and existing.fn is not fn:
            raise ConfigurationError(
                f"two steps are named {step_name!r}; give one another name with "
                "@app.step(name=...)",
                step_name=step_name,
            )
        definition = StepDef(step_name, fn, inspect.iscoroutinefunction(fn), retry,
                             tuple(guards), timeout)
        self.steps[step_name] = definition
        return definition

    def add_workflow(self, fn: Callable[..., Any], name: str | None, version: str,
                     timeout: float | None = None, quarantine: bool = True) -> WorkflowDef:
        if not inspect.iscoroutinefunction(fn):
            raise ConfigurationError(
                f"@app.workflow() takes an `async def` function whose first parameter is the "
                f"Context; {getattr(fn, '__qualname__', fn)!r} is not a coroutine function"
            )
        wf_name = name or default_name(fn)
        key = (wf_name, version)
        existing = self.workflows.get(key)
        if existing is not None and existing.fn is not fn:
            raise ConfigurationError(
                f"workflow {wf_name!r} version {version!r} is registered twice; bump version= "
                "on the new code or give it another name",
                workflow_name=wf_name,
            )
        if timeout is not None and (not isinstance(timeout, int | float) or timeout <= 0):
            raise ConfigurationError(
                f"workflow {wf_name!r}: timeout={timeout!r} must be seconds > 0",
                workflow_name=wf_name)
        definition = WorkflowDef(wf_name, version, fn, timeout, quarantine)
        self.workflows[key] = definition
        return definition

    def workflow(self, name: str, version: str) -> WorkflowDef | None:
        return self.workflows.get((name, version))
