"""Token buckets kept in the store, shared by every worker (fleet-wide rate limits).

Written once as a sans-I/O plan (like `_claims`): each store drives it in one write
transaction, so concurrent takers never spend the same token.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from garrison.store._rows import BUCKET_CREATE, BUCKET_READ, BUCKET_TAKE

__all__ = ["take_token"]


def take_token(name: str, *, rate_per_s: float, burst: float, now: float,
               least: str) -> Generator[tuple[str, list[Any]], list[Any], float]:
    """Take one token of bucket `name` (created full): 0.0 when taken, else the seconds
    until one refills. `least` is the dialect's two-argument minimum function."""
    yield BUCKET_CREATE + " RETURNING name", [name, burst, now]
    taken = yield (BUCKET_TAKE.replace("min_of", least),
                   [burst, now, rate_per_s, now, name, burst, now, rate_per_s])
    if taken:
        return 0.0
    rows = yield BUCKET_READ, [name]
    tokens, at = rows[0]
    have = min(burst, float(tokens) + (now - float(at)) * rate_per_s)
    return max(0.0, (1 - have) / rate_per_s)
