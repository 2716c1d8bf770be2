"""The agent demo: conversations against the local LLM server with injected faults,
the worker SIGKILLed midway and restarted, then a report read from the store and from
the server's own request log."""

from __future__ import annotations

import json
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from garrison.demo._support_agent import DEMO_SCRIPT, MODEL_CALLS_PER_RUN

__all__ = ["DEMO_FAULTS", "AgentDemoReport", "run_agent_demo"]

# The primary model degraded: 5 % rate limits (asking for 0.1 s), 5 % server errors and
# 503 on half its calls; a call that fails its three attempts there (about 1 in 6) is
# served by the backup model, which is healthy, so no conversation fails. 10-40 ms of
# latency on every call. (Were the backup faulty too, a call failing all six attempts
# would quarantine its conversation: the engine's answer, but not this demo's story.)
DEMO_FAULTS: list[dict[str, Any]] = [
    {"kind": "status", "status": 429, "rate": 0.05, "retry_after": 0.1,
     "model": "demo-primary"},
    {"kind": "status", "status": 500, "rate": 0.05, "model": "demo-primary"},
    {"kind": "status", "status": 503, "rate": 0.5, "model": "demo-primary"},
    {"kind": "latency", "latency_ms": [10.0, 40.0]},
]


@dataclass(frozen=True, slots=True)
class AgentDemoReport:
    """What the agent demo measured."""

    runs: int
    completed: int
    failed: int
    lost: int
    model_steps: int
    requests: int
    faults: int
    answered_twice: int
    refunds: int
    refunds_duplicated: int
    fallback_runs: int
    input_tokens: int
    output_tokens: int
    cost_usd: float
    p50_s: float
    p95_s: float
    killed_at_model_steps: int
    total_s: float


def _spawn(folder: Path, base_url: str, runs: int) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "garrison.demo._agent_worker", str(folder / "demo.db"),
               base_url, str(folder / "effects.log"), str(runs)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _read(db: Path, sql: str) -> list[tuple[Any, ...]]:
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1.0) as conn:
            return conn.execute(sql).fetchall()
    except sqlite3.OperationalError:  # the schema is being created
        return []


def _progress(db: Path) -> tuple[int, int]:
    """(runs ended, model steps journaled), read by another process."""
    ended = _read(db, "SELECT count(*) FROM runs WHERE workflow_name = 'agent:support' AND "
                      "status IN ('COMPLETED', 'FAILED', 'QUARANTINED')")
    steps = _read(db, "SELECT count(*) FROM steps WHERE name = 'agent.support.model' AND "
                      "status = 'completed'")
    return (int(ended[0][0]) if ended else 0), (int(steps[0][0]) if steps else 0)


def _watch(progress: Progress, task: Any, db: Path, worker: subprocess.Popen[bytes],
           stop_at_steps: int | None) -> None:
    while True:
        ended, steps = _progress(db)
        progress.update(task, completed=ended, steps=steps)
        if worker.poll() is not None or (stop_at_steps is not None and steps >= stop_at_steps):
            return
        time.sleep(0.02)


def run_agent_demo(folder: Path, runs: int = 100, kill_fraction: float = 0.4,
                   console: Console | None = None) -> AgentDemoReport:
    """Run the agent demo in `folder` (emptied first) and return what it measured."""
    from garrison.testing import LLMServer

    console = console or Console()
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("demo.db", "demo.db-wal", "demo.db-shm", "demo.db.worker.lock",
                 "effects.log"):
        (folder / name).unlink(missing_ok=True)
    db = folder / "demo.db"
    kill_at = int(runs * MODEL_CALLS_PER_RUN * kill_fraction)
    started = time.perf_counter()
    with LLMServer(DEMO_SCRIPT, faults=DEMO_FAULTS, seed=7) as server:
        console.print(
            f"[bold]Garrison agent demo[/]: {runs} support conversations (look up, refund, "
            f"confirm) on SQLite at {db}, against the local LLM server at {server.url} "
            "with injected faults: the primary model answering 5 % 429, 5 % 500 and half "
            "its calls 503 (fallback: demo-backup), 10-40 ms latency on every call")
        worker = _spawn(folder, server.openai_base_url, runs)
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[steps]} model calls journaled"),
                   TimeElapsedColumn())
        with Progress(*columns, console=console) as progress:
            task = progress.add_task(f"worker pid {worker.pid}", total=runs, steps=0)
            _watch(progress, task, db, worker, kill_at)
            killed = worker.pid
            worker.send_signal(signal.SIGKILL)
            worker.wait()
            ended, steps = _progress(db)
            progress.console.print(
                f"[red]SIGKILL[/] worker pid {killed} with {ended}/{runs} conversations ended "
                f"and {steps} model calls journaled")
            worker = _spawn(folder, server.openai_base_url, runs)
            progress.update(task, description=f"worker pid {worker.pid} (restarted)")
            _watch(progress, task, db, worker, None)
        _, stderr = worker.communicate()
        if worker.returncode != 0:
            raise RuntimeError(f"demo worker exited with {worker.returncode}: "
                               f"{stderr.decode()[-2000:]}")
        requests = server.requests()
    report = _report(db, folder / "effects.log", requests, runs, kill_at,
                     time.perf_counter() - started)
    _print(console, report)
    return report


def _report(db: Path, effects: Path, requests: list[dict[str, Any]], runs: int, kill_at: int,
            total_s: float) -> AgentDemoReport:
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT status, result, created_at, completed_at FROM runs WHERE "
                            "workflow_name = 'agent:support'").fetchall()
        outputs = conn.execute("SELECT output FROM steps WHERE name = 'agent.support.model' "
                               "AND status = 'completed'").fetchall()
    completed = [r for r in rows if r[0] == "COMPLETED"]
    failed = [r for r in rows if r[0] in ("FAILED", "QUARANTINED")]
    durations = sorted(r[3] - r[2] for r in completed if r[3] is not None)
    fallback_runs = sum(1 for r in completed if json.loads(r[1]).get("fallbacks"))
    usage = [json.loads(o[0]) for o in outputs]
    answered = Counter((r["model"], r["fingerprint"]) for r in requests
                       if r["outcome"] == "ok")
    keys = Counter(line.split()[1] for line in effects.read_text().splitlines()) \
        if effects.exists() else Counter()
    return AgentDemoReport(
        runs=runs, completed=len(completed), failed=len(failed),
        lost=runs - len(completed) - len(failed), model_steps=len(outputs),
        requests=len(requests), faults=sum(1 for r in requests if r["outcome"] != "ok"),
        answered_twice=sum(n - 1 for n in answered.values()),
        refunds=sum(keys.values()), refunds_duplicated=sum(n - 1 for n in keys.values()),
        fallback_runs=fallback_runs,
        input_tokens=sum(u["usage"]["input_tokens"] for u in usage),
        output_tokens=sum(u["usage"]["output_tokens"] for u in usage),
        cost_usd=sum(u["cost_usd"] for u in usage),
        p50_s=statistics.median(durations) if durations else 0.0,
        p95_s=durations[int(0.95 * (len(durations) - 1))] if durations else 0.0,
        killed_at_model_steps=kill_at, total_s=total_s)


def _print(console: Console, report: AgentDemoReport) -> None:
    table = Table(title="Garrison agent demo: faults, a SIGKILL and recovery", show_header=False)
    table.add_row("conversations started", str(report.runs))
    table.add_row("conversations completed", f"[green]{report.completed}[/]")
    table.add_row("conversations failed (quarantined)", str(report.failed))
    table.add_row("conversations lost", f"[{'green' if report.lost == 0 else 'red'}]"
                  f"{report.lost}[/]")
    table.add_row("model calls journaled", str(report.model_steps))
    table.add_row("requests to the server", str(report.requests))
    table.add_row("faults injected by the server", str(report.faults))
    table.add_row("conversations served by the fallback model", str(report.fallback_runs))
    table.add_row("model calls answered twice (in flight at SIGKILL)",
                  str(report.answered_twice))
    table.add_row("refunds issued", str(report.refunds))
    table.add_row("refunds run twice (in flight at SIGKILL)", str(report.refunds_duplicated))
    table.add_row("latency p50 / p95 (start to answer)",
                  f"{report.p50_s * 1000:.0f} ms / {report.p95_s * 1000:.0f} ms")
    table.add_row("tokens in / out", f"{report.input_tokens} / {report.output_tokens}")
    table.add_row("cost", f"${report.cost_usd:.4f}")
    table.add_row("total wall time", f"{report.total_s:.2f} s")
    console.print(table)
    console.print(
        "A model call or refund in flight at the SIGKILL may run again (at-least-once); "
        "the refund gets the same idempotency key, so a payment API drops the repeat. "
        "Completed calls are never repeated.")
