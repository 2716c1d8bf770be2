"""`Bulkhead` (at most N concurrent calls, bounded wait) and `RateLimiter` (token bucket).

Both are keyed (`for_key`) and usable as `async with`, with `.call(fn, ...)`, or on a step
(`@app.step(bulkhead=...)`). Attached to a step (or passed to `app.share_bulkhead` /
`app.share_limiter`), a bulkhead keeps its places and a rate limiter its bucket in the
store, so they hold across the fleet; used alone, they count in the process.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, TypeVar

from garrison.errors import BulkheadFull, ConfigurationError, RateLimited

__all__ = ["Bulkhead", "RateLimiter"]

# A fleet-wide bulkhead with no free place looks again this often (within max_wait).
_SHARED_POLL_S = 0.05


def _task_key() -> int:
    task = asyncio.current_task()
    return id(task) if task is not None else 0

T = TypeVar("T")


class Bulkhead:
    """At most `max_concurrent` calls at once; a caller waits at most `max_wait` seconds
    for a place (0: never waits), then gets `BulkheadFull`. One slow dependency can then
    hold only its own places, never every worker task."""

    def __init__(self, name: str, *, max_concurrent: int = 10, max_wait: float = 0.0) -> None:
        if max_concurrent < 1 or max_wait < 0:
            raise ConfigurationError(
                f"Bulkhead({name!r}): max_concurrent >= 1 and max_wait >= 0 seconds")
        self.name = name
        self.max_concurrent = max_concurrent
        self.max_wait = max_wait
        self._semaphore = asyncio.Semaphore(max_concurrent)
        self._keyed: dict[str, Bulkhead] = {}
        self.active = 0
        self.rejected = 0
        self._take: Callable[[str, str, int], Awaitable[bool]] | None = None
        self._give: Callable[[str], Awaitable[None]] | None = None
        self._permits: dict[int, list[str]] = {}

    def share(self, take: Callable[[str, str, int], Awaitable[bool]],
              give: Callable[[str], Awaitable[None]]) -> None:
        """Keep the places in a shared place: `await take(name, permit_id, limit)` takes
        one (False: all taken), `await give(permit_id)` gives it back. The engine wires
        them to the store for a bulkhead on a step."""
        self._take, self._give = take, give
        for keyed in self._keyed.values():
            keyed.share(take, give)

    def for_key(self, key: str) -> Bulkhead:
        found = self._keyed.get(key)
        if found is None:
            found = self._keyed[key] = Bulkhead(f"{self.name}:{key}",
                                               max_concurrent=self.max_concurrent,
                                               max_wait=self.max_wait)
            if self._take is not None and self._give is not None:
                found.share(self._take, self._give)
        return found

    async def _acquire_shared(self) -> None:
        assert self._take is not None
        permit = uuid.uuid4().hex
        give_up = time.monotonic() + self.max_wait
        while not await self._take(self.name, permit, self.max_concurrent):
            left = give_up - time.monotonic()
            if left <= 0:
                self.rejected += 1
                raise self._full()
            await asyncio.sleep(min(_SHARED_POLL_S, left))
        self._permits.setdefault(_task_key(), []).append(permit)
        self.active += 1

    async def _release_shared(self) -> None:
        assert self._give is not None
        key = _task_key()
        permit = self._permits[key].pop()
        if not self._permits[key]:
            del self._permits[key]
        self.active -= 1
        await asyncio.shield(self._give(permit))  # even if the caller is cancelled

    async def acquire(self) -> None:
        if self._take is not None:
            await self._acquire_shared()
            return
        if not self._semaphore.locked():  # a free place: no wait, no timer
            await self._semaphore.acquire()
            self.active += 1
            return
        if self.max_wait == 0:
            self.rejected += 1
            raise self._full()
        try:
            await asyncio.wait_for(self._semaphore.acquire(), self.max_wait or None)
        except TimeoutError:
            self.rejected += 1
            raise self._full() from None
        self.active += 1

    def release(self) -> None:
        self.active -= 1
        self._semaphore.release()

    def _full(self) -> BulkheadFull:
        return BulkheadFull(
            f"bulkhead {self.name!r} is full ({self.max_concurrent} calls in flight; waited "
            f"{self.max_wait:g} s)", bulkhead=self.name, max_concurrent=self.max_concurrent)

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        await self.acquire()
        try:
            return await fn(*args, **kwargs)
        finally:
            if self._give is None:
                self.release()
            else:
                await self._release_shared()

    async def _leave(self) -> None:
        if self._give is not None:
            await self._release_shared()
        else:
            self.release()

    async def __aenter__(self) -> Bulkhead:
        await self.acquire()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self._leave()


class RateLimiter:
    """A token bucket: `rate` calls per `per` seconds on average, bursts up to `burst`
    (default `rate`). A caller waits for a token at most `max_wait` seconds, then gets
    `RateLimited` (with `retry_after`, so a `Retry` waits the right time)."""

    def __init__(self, name: str, *, rate: float, per: float = 1.0, burst: float | None = None,
                 max_wait: float = 0.0, clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0 or per <= 0 or max_wait < 0 or (burst is not None and burst < 1):
            raise ConfigurationError(
                f"RateLimiter({name!r}): rate > 0, per > 0 seconds, burst >= 1, max_wait >= 0")
        self.name = name
        self.rate = rate
        self.per = per
        self.burst = float(burst if burst is not None else max(1.0, rate))
        self.max_wait = max_wait
        self.clock = clock
        self._tokens = self.burst
        self._at = clock()
        self._keyed: dict[str, RateLimiter] = {}
        self._shared: Callable[[str, float, float], Awaitable[float]] | None = None

    def share(self, take: Callable[[str, float, float], Awaitable[float]]) -> None:
        """Keep the bucket in a shared place: `await take(name, rate_per_s, burst)` takes a
        token (0.0) or says how long until one refills. The engine wires it to the store."""
        self._shared = take
        for keyed in self._keyed.values():
            keyed.share(take)

    def for_key(self, key: str) -> RateLimiter:
        found = self._keyed.get(key)
        if found is None:
            found = self._keyed[key] = RateLimiter(
                f"{self.name}:{key}", rate=self.rate, per=self.per, burst=self.burst,
                max_wait=self.max_wait, clock=self.clock)
            if self._shared is not None:
                found.share(self._shared)
        return found

    def _refill(self) -> None:
        now = self.clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate / self.per)
        self._at = now

    def try_acquire(self) -> float:
        """Take a token now (returns 0.0) or say how long until one is there."""
        self._refill()
        if self._tokens >= 1:
            self._tokens -= 1
            return 0.0
        return (1 - self._tokens) * self.per / self.rate

    async def acquire(self) -> None:
        if self._shared is not None:
            wait = await self._shared(self.name, self.rate / self.per, self.burst)
        else:
            wait = self.try_acquire()
        if wait == 0.0:
            return
        if wait > self.max_wait:
            raise RateLimited(
                f"rate limiter {self.name!r}: no token for {wait:.3f} s (at most {self.rate:g} "
                f"per {self.per:g} s)", limiter=self.name, retry_after=wait)
        await asyncio.sleep(wait)
        await self.acquire()

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        await self.acquire()
        return await fn(*args, **kwargs)

    async def __aenter__(self) -> RateLimiter:
        await self.acquire()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        return None
