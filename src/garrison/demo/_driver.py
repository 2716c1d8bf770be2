"""The demo driver: runs the worker, SIGKILLs it midway, restarts it, reports."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from garrison.demo._orders import STEPS_PER_ORDER

__all__ = ["DemoReport", "run_demo"]


@dataclass(frozen=True, slots=True)
class DemoReport:
    """What the demo measured."""

    runs: int
    completed: int
    lost: int
    steps_journaled: int
    side_effects: int
    steps_rerun: int
    killed_pid: int
    killed_at_steps: int
    first_resumed_step_s: float
    total_s: float


def _spawn(folder: Path, runs: int) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "garrison.demo._worker", str(folder / "demo.db"),
               str(folder / "effects.log"), str(runs)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _counts(db: Path) -> tuple[int, int]:
    """(completed runs, journaled steps), read from the store by a second process."""
    if not db.exists():
        return 0, 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1.0) as conn:
            runs = conn.execute("SELECT count(*) FROM runs WHERE status = 'COMPLETED' "
                                "AND parent_run_id IS NULL").fetchone()[0]
            steps = conn.execute("SELECT count(*) FROM steps WHERE kind = 'step'").fetchone()[0]
            return int(runs), int(steps)
    except sqlite3.OperationalError:  # the schema is being created
        return 0, 0


def _first_step_by(db: Path, pid: int) -> float | None:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1.0) as conn:
        row = conn.execute("SELECT min(completed_at) FROM steps WHERE worker LIKE ?",
                           (f"%:{pid}",)).fetchone()
    return float(row[0]) if row and row[0] is not None else None


def run_demo(folder: Path, runs: int = 200, kill_fraction: float = 0.4,
             console: Console | None = None) -> DemoReport:
    """Run the demo in `folder` (emptied first) and return what it measured."""
    console = console or Console()
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("demo.db", "demo.db-wal", "demo.db-shm", "demo.db.worker.lock", "effects.log"):
        (folder / name).unlink(missing_ok=True)
    db = folder / "demo.db"
    console.print(f"[bold]Garrison demo[/]: {runs} order workflows x {STEPS_PER_ORDER} steps, "
                  f"a durable timer and a fan-out each, on SQLite at {db}")
    started = time.perf_counter()
    worker = _spawn(folder, runs)
    killed_pid = worker.pid
    kill_at = int(runs * STEPS_PER_ORDER * kill_fraction)
    first_resumed = 0.0
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[steps]} steps journaled"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(f"worker pid {worker.pid}", total=runs, steps=0)
        while True:
            completed, steps = _counts(db)
            progress.update(task, completed=completed, steps=steps)
            if steps >= kill_at or worker.poll() is not None:
                break
            time.sleep(0.01)
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        completed, steps = _counts(db)
        progress.console.print(f"[red]SIGKILL[/] worker pid {killed_pid} with {completed}/{runs} "
                               f"runs completed and {steps} steps journaled")
        restart = time.time()
        worker = _spawn(folder, runs)
        progress.update(task, description=f"worker pid {worker.pid} (restarted)")
        while True:
            completed, steps = _counts(db)
            progress.update(task, completed=completed, steps=steps)
            if not first_resumed:
                first = _first_step_by(db, worker.pid)
                first_resumed = (first - restart) if first is not None else 0.0
            if worker.poll() is not None:
                break
            time.sleep(0.05)
    total = time.perf_counter() - started
    if worker.returncode != 0:
        raise RuntimeError(f"demo worker exited with {worker.returncode}")
    if not first_resumed:
        found = _first_step_by(db, worker.pid)
        first_resumed = (found - restart) if found is not None else 0.0
    executions = Counter(line.split()[1] for line in
                         (folder / "effects.log").read_text().splitlines())
    with sqlite3.connect(db) as conn:
        done = conn.execute("SELECT count(*) FROM runs WHERE parent_run_id IS NULL AND "
                            "status = 'COMPLETED'").fetchone()[0]
        journaled = conn.execute("SELECT count(*) FROM steps WHERE kind = 'step'").fetchone()[0]
    report = DemoReport(
        runs=runs, completed=int(done), lost=runs - int(done), steps_journaled=int(journaled),
        side_effects=sum(executions.values()),
        steps_rerun=sum(n - 1 for n in executions.values()), killed_pid=killed_pid,
        killed_at_steps=kill_at, first_resumed_step_s=first_resumed, total_s=total,
    )
    _print(console, report)
    return report


def _print(console: Console, report: DemoReport) -> None:
    table = Table(title="Garrison demo: crash and recovery", show_header=False)
    table.add_row("runs started", str(report.runs))
    table.add_row("runs completed", f"[green]{report.completed}[/]")
    table.add_row("runs lost", f"[{'green' if report.lost == 0 else 'red'}]{report.lost}[/]")
    table.add_row("steps journaled", str(report.steps_journaled))
    table.add_row("side effects executed", str(report.side_effects))
    table.add_row("steps re-run after the kill (in flight at SIGKILL)", str(report.steps_rerun))
    table.add_row("restart -> first resumed step committed",
                  f"{report.first_resumed_step_s * 1000:.0f} ms")
    table.add_row("total wall time", f"{report.total_s:.2f} s")
    console.print(table)
    console.print("Re-run steps were in flight when the worker died: Garrison runs such a step "
                  "again (at-least-once) with the same idempotency key; completed steps never "
                  "run again.")
