"""`Fallback`: an ordered chain of alternatives, taken on failure, on an open breaker,
or when a result fails validation; the answer says which one served."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from garrison._log import get_logger
from garrison.errors import ConfigurationError, FallbackExhausted

__all__ = ["Fallback", "Served"]

log = get_logger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Served(Generic[T]):
    """What a `Fallback` returns: the value, who served it, and whether it is degraded
    (served by anything but the first alternative)."""

    value: T
    served_by: str
    degraded: bool
    errors: list[tuple[str, BaseException]] = field(default_factory=list)


def _name(fn: Callable[..., Any]) -> str:
    return str(getattr(fn, "__name__", None) or repr(fn))


class Fallback(Generic[T]):
    """`await Fallback([primary, secondary, cached])(*args)` tries each in order.

    Args:
        alternatives: async callables taking the same arguments (steps included: each
            is then journaled on its own).
        fall_on: exception types that move on to the next alternative (default:
            `(Exception,)`, which includes `CircuitOpenError`, `BulkheadFull`,
            `DeadlineExceeded`).
        validate: `(value) -> bool`: a result it rejects moves on too.
    Raises `FallbackExhausted` (with every alternative's error) when none served.
    """

    def __init__(self, alternatives: Sequence[Callable[..., Awaitable[T]]], *,
                 fall_on: tuple[type[BaseException], ...] = (Exception,),
                 validate: Callable[[T], bool] | None = None) -> None:
        if not alternatives:
            raise ConfigurationError("Fallback([]): give at least one alternative")
        self.alternatives = list(alternatives)
        self.fall_on = fall_on
        self.validate = validate

    async def __call__(self, *args: Any, **kwargs: Any) -> Served[T]:
        errors: list[tuple[str, BaseException]] = []
        for index, alternative in enumerate(self.alternatives):
            name = _name(alternative)
            try:
                value = await alternative(*args, **kwargs)
            except self.fall_on as exc:
                errors.append((name, exc))
                log.warning("fallback.skipped", alternative=name, error=repr(exc))
                continue
            if self.validate is not None and not self.validate(value):
                errors.append((name, ValueError(f"{name} returned an invalid result")))
                log.warning("fallback.invalid", alternative=name)
                continue
            return Served(value, name, index > 0, errors)
        summary = "; ".join(f"{n}: {type(e).__name__}: {e}" for n, e in errors)
        raise FallbackExhausted(f"every alternative failed: {summary}",
                                errors=[(n, repr(e)) for n, e in errors])
