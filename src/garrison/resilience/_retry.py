"""`Retry`: attempts, backoff with full jitter, classification, Retry-After; `RetryBudget`.

A `Retry` attached to a step (`@app.step(retry=Retry(...))`) decides after each failed
attempt whether and when the next one runs; the engine journals the wait as a durable
timer, so a crash during the backoff neither resets the count nor skips the wait.
"""

from __future__ import annotations

import email.utils
import random as _random
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from garrison.errors import ConfigurationError

__all__ = ["Retry", "RetryBudget", "retry_after_s"]


def retry_after_s(error: BaseException) -> float | None:
    """Seconds the failed server asked us to wait, if it said so.

    Looks at `error.retry_after` (seconds) and at an HTTP response's `Retry-After`
    header (`error.response.headers`, as httpx/openai/anthropic errors carry): either
    delta-seconds or an HTTP date.
    """
    value: Any = getattr(error, "retry_after", None)
    if value is None:
        headers = getattr(getattr(error, "response", None), "headers", None)
        if headers is not None and hasattr(headers, "get"):
            value = headers.get("retry-after") or headers.get("Retry-After")
    if value is None:
        return None
    if isinstance(value, int | float):
        return max(0.0, float(value))
    text = str(value).strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclass(slots=True)
class _Bucket:
    tokens: float
    lock: threading.Lock = field(default_factory=threading.Lock)


_BUCKETS: dict[str, _Bucket] = {}
_BUCKETS_LOCK = threading.Lock()


class RetryBudget:
    """A token bucket shared by every retry aimed at one target (botocore's retry quota).

    A retry spends `retry_cost` tokens (`timeout_cost` after a timeout); a success gives
    back `refund`. When the bucket cannot pay, the retry is not made: the error surfaces
    at once. So when a dependency fails, retries stop multiplying the load on it after
    `capacity / retry_cost` of them, and they come back as successes refill the bucket.
    Budgets of the same `name` share one bucket in the process (the capacity of the
    first one made wins).
    """

    def __init__(self, name: str, *, capacity: float = 500, retry_cost: float = 5,
                 timeout_cost: float = 10, refund: float = 1) -> None:
        if capacity <= 0 or retry_cost <= 0 or timeout_cost <= 0 or refund < 0:
            raise ConfigurationError(
                f"RetryBudget({name!r}): capacity, retry_cost and timeout_cost must be > 0, "
                "refund >= 0")
        self.name = name
        self.capacity = float(capacity)
        self.retry_cost = float(retry_cost)
        self.timeout_cost = float(timeout_cost)
        self.refund_tokens = float(refund)
        with _BUCKETS_LOCK:
            self._bucket = _BUCKETS.setdefault(name, _Bucket(self.capacity))
        self._take: Callable[[str, float, float], Awaitable[bool]] | None = None
        self._give: Callable[[str, float, float], None] | None = None

    @property
    def shared(self) -> bool:
        """Whether the bucket lives in the store (fleet-wide) rather than the process."""
        return self._take is not None

    def share(self, take: Callable[[str, float, float], Awaitable[bool]],
              give: Callable[[str, float, float], None]) -> None:
        """Keep the bucket in a shared place: `await take(name, cost, capacity)` pays for
        a retry (False: spent), `give(name, amount, capacity)` refunds (in the
        background). The engine wires them to the store for a budget on a step."""
        self._take, self._give = take, give

    async def withdraw_shared(self, error: BaseException | None = None) -> bool:
        """`withdraw` on the shared bucket (the engine awaits it before a retry)."""
        if self._take is None:
            return self.withdraw(error)
        cost = self.timeout_cost if isinstance(error, TimeoutError) else self.retry_cost
        return await self._take(self.name, cost, self.capacity)

    @property
    def tokens(self) -> float:
        return self._bucket.tokens

    def withdraw(self, error: BaseException | None = None) -> bool:
        """Pay for one retry after `error`; False when the budget is spent."""
        cost = self.timeout_cost if isinstance(error, TimeoutError) else self.retry_cost
        with self._bucket.lock:
            if self._bucket.tokens < cost:
                return False
            self._bucket.tokens -= cost
            return True

    def refund(self, *, retried: bool = False) -> None:
        """A call succeeded: give back `refund`, or, when it succeeded on a retry, what
        that retry cost (botocore releases the retry's cost)."""
        amount = self.retry_cost if retried else self.refund_tokens
        if self._give is not None:
            self._give(self.name, amount, self.capacity)
            return
        with self._bucket.lock:
            self._bucket.tokens = min(self.capacity, self._bucket.tokens + amount)

    def reset(self) -> None:
        """Fill the bucket (tests, or after an operator fixed the dependency)."""
        with self._bucket.lock:
            self._bucket.tokens = self.capacity


@dataclass(frozen=True, slots=True)
class Retry:
    """When a failed step runs again.

    Args:
        max_attempts: attempts in all, the first included (default 3).
        base, cap: backoff before attempt n+1 is `random(0, min(cap, base * 2**(n-1)))`
            seconds ("full jitter"); defaults 0.2 s and 10 s.
        max_elapsed: give up when the next attempt would start later than this many
            seconds after the first began (default: no limit).
        retry_on: exception types that are transient (retried), or a predicate
            `(error) -> bool`. Default: `(Exception,)`.
        give_up_on: exception types never retried, even if `retry_on` matches
            (permanent errors: bad input, auth).
        budget: a `RetryBudget` shared per target; no retry when it is spent.
        honor_retry_after: wait at least what the server asked (`Retry-After`), even
            beyond `cap` (default True).
        random: the jitter source, `() -> float in [0, 1)` (seed it in tests).
    """

    max_attempts: int = 3
    base: float = 0.2
    cap: float = 10.0
    max_elapsed: float | None = None
    retry_on: tuple[type[BaseException], ...] | Callable[[BaseException], bool] = (Exception,)
    give_up_on: tuple[type[BaseException], ...] = ()
    budget: RetryBudget | None = None
    honor_retry_after: bool = True
    random: Callable[[], float] = _random.random

    def __post_init__(self) -> None:
        if not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ConfigurationError(f"Retry(max_attempts={self.max_attempts!r}): an int >= 1")
        if self.base < 0 or self.cap < 0:
            raise ConfigurationError(f"Retry(base={self.base}, cap={self.cap}): seconds >= 0")
        if self.max_elapsed is not None and self.max_elapsed <= 0:
            raise ConfigurationError(f"Retry(max_elapsed={self.max_elapsed}): seconds > 0")

    def is_transient(self, error: BaseException) -> bool:
        """Whether `error` may go away on its own (and is worth another attempt)."""
        if self.give_up_on and isinstance(error, self.give_up_on):
            return False
        if isinstance(self.retry_on, tuple):
            return isinstance(error, self.retry_on)
        return bool(self.retry_on(error))

    def backoff_s(self, attempt: int) -> float:
        """The jittered wait after failed attempt `attempt` (1 = the first)."""
        return float(self.random() * min(self.cap, self.base * 2 ** (attempt - 1)))

    def delay_s(self, attempt: int, error: BaseException, *,
                elapsed_s: float = 0.0) -> float | None:
        """Seconds before attempt `attempt + 1`, or None to give up (see the class)."""
        if attempt >= self.max_attempts or not self.is_transient(error):
            return None
        delay = self.backoff_s(attempt)
        if self.honor_retry_after:
            asked = retry_after_s(error)
            if asked is not None:
                delay = max(delay, asked)
        if self.max_elapsed is not None and elapsed_s + delay > self.max_elapsed:
            return None
        if (self.budget is not None and not self.budget.shared
                and not self.budget.withdraw(error)):
            return None
        return delay

    async def admit(self, error: BaseException) -> bool:
        """For a budget shared through the store: pay for the retry `delay_s` allowed
        (the engine awaits this; False: spent, no retry)."""
        if self.budget is None or not self.budget.shared:
            return True
        return await self.budget.withdraw_shared(error)

    def succeeded(self, attempt: int = 1) -> None:
        """Attempt `attempt` succeeded (the engine calls this): refund the budget."""
        if self.budget is not None:
            self.budget.refund(retried=attempt > 1)
