"""Token buckets kept in the store, shared by every worker (fleet-wide rate limits).

Written once as a sans-I/O plan (like `_claims`): each store drives it in one write
transaction, so concurrent takers never spend the same token.
"""

from __future__ import annotations

import math
from collections.abc import Generator
from typing import Any

from garrison.store._rows import BUCKET_CREATE, BUCKET_GIVE, BUCKET_READ, BUCKET_TAKE

__all__ = ["give_tokens", "take_token"]

Plan = Generator[tuple[str, list[Any]], list[Any], float]


def take_token(name: str, *, rate_per_s: float, burst: float, now: float, least: str,
               cost: float = 1.0) -> Plan:
    """Take `cost` tokens of bucket `name` (created full): 0.0 when taken, else the
    seconds until enough refill (infinity for a bucket that refills only by
    `give_tokens`). `least` is the dialect's two-argument minimum function."""
    yield BUCKET_CREATE + " RETURNING name", [name, burst, now]
    taken = yield (BUCKET_TAKE.replace("min_of", least),
                   [burst, now, rate_per_s, cost, now, name, burst, now, rate_per_s, cost])
    if taken:
        return 0.0
    if rate_per_s <= 0:
        return math.inf
    rows = yield BUCKET_READ, [name]
    tokens, at = rows[0]
    have = min(burst, float(tokens) + (now - float(at)) * rate_per_s)
    return max(0.0, (cost - have) / rate_per_s)


def give_tokens(name: str, *, amount: float, burst: float, now: float, least: str) -> Plan:
    """Give `amount` tokens back to bucket `name` (never above `burst`); its tokens."""
    yield BUCKET_CREATE + " RETURNING name", [name, burst, now]
    rows = yield BUCKET_GIVE.replace("min_of", least), [burst, amount, name]
    return float(rows[0][0])
