"""Persistence: one `Store` protocol, an embedded SQLite backend (the default).

The store knows nothing of agents: it keeps runs, journals, mailboxes and run streams, and offers
the primitives the engine builds on.
"""

from __future__ import annotations

from garrison.errors import ConfigurationError
from garrison.store._protocol import Changes, Store, safe_url
from garrison.store._records import (
    DEFAULT_TENANT,
    ClaimReason,
    EventRecord,
    QueueLimits,
    RunRecord,
    RunStatus,
    StepKind,
    StepRecord,
    StepStatus,
    StreamRecord,
    position_key,
)
from garrison.store._sqlite import SQLiteStore, parse_sqlite_url

__all__ = [
    "Changes",
    "ClaimReason",
    "DEFAULT_TENANT",
    "EventRecord",
    "QueueLimits",
    "RunRecord",
    "RunStatus",
    "SQLiteStore",
    "StepKind",
    "StepRecord",
    "StepStatus",
    "Store",
    "StreamRecord",
    "open_store",
    "parse_sqlite_url",
    "position_key",
    "safe_url",
]

DEFAULT_URL = "sqlite:///garrison.db"


def open_store(url: str | None = None, *, create: bool = True) -> Store:
    """The store for `url` (not yet opened). `None` means `sqlite:///garrison.db`.

    Raises:
        ConfigurationError: for a scheme Garrison does not know, naming the ones it does.
    """
    url = url or DEFAULT_URL
    scheme = url.split(":", 1)[0].lower()
    if scheme == "sqlite":
        return SQLiteStore(url, create=create)
    if scheme in {"postgres", "postgresql"}:
        from garrison.store._postgres import PostgresStore

        return PostgresStore(url, create=create)
    raise ConfigurationError(
        f"store URL {safe_url(url)!r}: "
        + (f"unknown scheme {scheme!r}" if "://" in url else "not a URL")
        + "; use 'sqlite:///path.db' or "
        "'postgresql://user@host:5432/db'",
        url=safe_url(url),
    )
