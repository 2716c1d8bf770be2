"""The schema both SQL stores share, versioned; migrations apply in order on open.

Every row carries `tenant_id` so that row-level security can be switched on later
without a rewrite; payload columns hold journal JSON text and can move out to a
claim-check table without changing the journal's meaning. The dialects differ only in
the sequence columns (mailbox, streams) and SQLite's WITHOUT ROWID journal table.
"""

from __future__ import annotations

__all__ = ["SCHEMA_VERSION", "migrations"]

_V1 = """
CREATE TABLE IF NOT EXISTS garrison_meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL DEFAULT 'default',
    workflow_name TEXT NOT NULL,
    workflow_version TEXT NOT NULL,
    status TEXT NOT NULL,
    inputs TEXT NOT NULL,
    result TEXT,
    error TEXT,
    parent_run_id TEXT,
    parent_position TEXT,
    queue TEXT NOT NULL DEFAULT 'default',
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    completed_at DOUBLE PRECISION,
    wake_at DOUBLE PRECISION,
    deadline_at DOUBLE PRECISION,
    trace_context TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    owner TEXT
);
CREATE INDEX IF NOT EXISTS runs_status_wake ON runs (status, wake_at);
CREATE INDEX IF NOT EXISTS runs_parent ON runs (parent_run_id);
CREATE INDEX IF NOT EXISTS runs_created ON runs (created_at);
CREATE TABLE IF NOT EXISTS steps (
    run_id TEXT NOT NULL,
    position TEXT NOT NULL,
    tenant_id TEXT NOT NULL DEFAULT 'default',
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    status TEXT NOT NULL,
    arity INTEGER NOT NULL DEFAULT 0,
    inputs TEXT,
    output TEXT,
    error TEXT,
    started_at DOUBLE PRECISION NOT NULL,
    completed_at DOUBLE PRECISION,
    fire_at DOUBLE PRECISION,
    attempts INTEGER NOT NULL DEFAULT 1,
    worker TEXT,
    PRIMARY KEY (run_id, position)
){steps_options};
CREATE TABLE IF NOT EXISTS events (
    seq {seq},
    run_id TEXT NOT NULL,
    tenant_id TEXT NOT NULL DEFAULT 'default',
    name TEXT NOT NULL,
    payload TEXT NOT NULL,
    sent_at DOUBLE PRECISION NOT NULL,
    consumed_position TEXT
);
CREATE INDEX IF NOT EXISTS events_mailbox ON events (run_id, name, consumed_position, seq);
"""

# Queues, leases and fencing (the fleet). A lease is (owner, lease_until); `fence` grows
# by one at every claim, and a worker's write for a run checks it in its transaction.
_V2 = """
ALTER TABLE runs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
ALTER TABLE runs ADD COLUMN partition_key TEXT;
ALTER TABLE runs ADD COLUMN dedup_id TEXT;
ALTER TABLE runs ADD COLUMN fence BIGINT NOT NULL DEFAULT 0;
ALTER TABLE runs ADD COLUMN lease_until DOUBLE PRECISION;
ALTER TABLE runs ADD COLUMN started_at DOUBLE PRECISION;
UPDATE runs SET started_at = created_at WHERE status NOT IN ('PENDING');
CREATE INDEX IF NOT EXISTS runs_queue ON runs (queue, status, priority, created_at);
CREATE INDEX IF NOT EXISTS runs_started ON runs (queue, started_at);
CREATE INDEX IF NOT EXISTS runs_owner ON runs (owner) WHERE owner IS NOT NULL;
CREATE UNIQUE INDEX IF NOT EXISTS runs_dedup ON runs (queue, dedup_id)
    WHERE dedup_id IS NOT NULL AND status NOT IN ('COMPLETED', 'FAILED', 'CANCELLED');
DELETE FROM garrison_meta WHERE key = 'worker_epoch';
"""

# Circuit breakers shared across a fleet: the last state a worker published per name;
# token buckets of rate limiters shared across a fleet.
_V3 = """
CREATE TABLE IF NOT EXISTS breakers (
    name TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    open_until DOUBLE PRECISION,
    updated_at DOUBLE PRECISION NOT NULL,
    worker TEXT
);
CREATE TABLE IF NOT EXISTS breaker_events (
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    at DOUBLE PRECISION NOT NULL,
    worker TEXT
);
CREATE INDEX IF NOT EXISTS breaker_events_at ON breaker_events (at);
CREATE TABLE IF NOT EXISTS buckets (
    name TEXT PRIMARY KEY,
    tokens DOUBLE PRECISION NOT NULL,
    at DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS permits (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    worker TEXT NOT NULL,
    until DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS permits_name ON permits (name);
CREATE INDEX IF NOT EXISTS permits_worker ON permits (worker);
"""

# Run streams: an append-only log per run of what its steps publish while they run
# (model tokens, tool calls). `seq` is the offset a reader resumes after; a key is
# written once per run, so a step that runs again publishes nothing twice.
_V4 = """
CREATE TABLE IF NOT EXISTS streams (
    seq {seq},
    run_id TEXT NOT NULL,
    tenant_id TEXT NOT NULL DEFAULT 'default',
    key TEXT NOT NULL,
    kind TEXT NOT NULL,
    data TEXT NOT NULL,
    at DOUBLE PRECISION NOT NULL,
    UNIQUE (run_id, key)
);
CREATE INDEX IF NOT EXISTS streams_run ON streams (run_id, seq);
"""

# Forks (`app.fork`): the run a fork was made from and the top-level position up to
# which it reuses that run's journal (docs/decisions/0011-replay-and-fork.md).
_V5 = """
ALTER TABLE runs ADD COLUMN forked_from TEXT;
ALTER TABLE runs ADD COLUMN forked_at INTEGER;
CREATE INDEX IF NOT EXISTS runs_forked_from ON runs (forked_from) WHERE forked_from IS NOT NULL;
"""

# How a run's current owner came to hold it, written by each claim from the row it
# replaced (docs/decisions/0014-claim-reason-stored-with-the-run.md): `claim_reason`
# (start, wake_up, abandoned, handed_back, retry), the owner before it, and how many
# claims were recoveries (of a RUNNING run).
_V6 = """
ALTER TABLE runs ADD COLUMN claim_reason TEXT;
ALTER TABLE runs ADD COLUMN previous_owner TEXT;
ALTER TABLE runs ADD COLUMN recoveries INTEGER NOT NULL DEFAULT 0;
"""

_DIALECTS = {
    "sqlite": {"seq": "INTEGER PRIMARY KEY AUTOINCREMENT", "steps_options": " WITHOUT ROWID"},
    "postgres": {"seq": "BIGSERIAL PRIMARY KEY", "steps_options": ""},
}

SCHEMA_VERSION = 6


def migrations(dialect: str) -> dict[int, str]:
    """The DDL of each schema version for `dialect` ("sqlite" or "postgres")."""
    dialect_terms = _DIALECTS[dialect]
    return {1: _V1.format(**dialect_terms), 2: _V2, 3: _V3, 4: _V4.format(**dialect_terms),
            5: _V5, 6: _V6}
