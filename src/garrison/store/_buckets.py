"""Token buckets kept in the store, shared by every worker (fleet-wide rate limits).

Written once as a sans-I/O plan (like `_claims`): each store drives it in one write
transaction, so concurrent takers never spend the same token.
"""

from __future__ import annotations

import math
from collections.abc import Generator
from typing import Any

from garrison.store._rows import BUCKET_CREATE, BUCKET_GIVE, BUCKET_READ, BUCKET_TAKE

__all__ = ["give_tokens", "one_statement", "take_permit", "take_token"]

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


def take_permit(name: str, *, permit_id: str, worker: str, limit: int, now: float,
                until: float, lock: str | None
                ) -> Generator[tuple[str, list[Any]], list[Any], bool]:
    """Take a place of the fleet-wide bulkhead `name` (at most `limit` held at once) for
    `permit_id`, held until `until` unless renewed; False when all places are taken.
    Places of a worker that died expire. `lock`: the dialect's per-name lock statement."""
    if lock is not None:
        yield lock, [f"garrison-permits:{name}"]
    yield "DELETE FROM permits WHERE name = ? AND until < ? RETURNING id", [name, now]
    rows = yield "SELECT count(*) FROM permits WHERE name = ?", [name]
    if int(rows[0][0]) >= limit:
        return False
    yield ("INSERT INTO permits (id, name, worker, until) VALUES (?, ?, ?, ?) RETURNING id",
           [permit_id, name, worker, until])
    return True


def one_statement(sql: str, params: list[Any]
                  ) -> Generator[tuple[str, list[Any]], list[Any], list[Any]]:
    """A plan of one statement (returning rows): its rows."""
    rows = yield sql, params
    return rows
