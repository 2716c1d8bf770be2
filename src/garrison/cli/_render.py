"""Rich renderings of runs and their step timelines (and their JSON twins)."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from rich.table import Table

from garrison.store import RunRecord, StepRecord, position_key

__all__ = ["run_json", "runs_table", "timeline_table"]

_STATUS_STYLE = {"COMPLETED": "green", "FAILED": "red", "CANCELLED": "yellow",
                 "WAITING": "cyan", "RUNNING": "blue", "PENDING": "white"}


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _duration(start: float, end: float | None) -> str:
    if end is None:
        return "-"
    ms = (end - start) * 1000
    return f"{ms:.1f} ms" if ms < 10_000 else f"{ms / 1000:.1f} s"


def _error_line(error: str | None) -> str:
    if not error:
        return ""
    data = json.loads(error)
    return f"{data.get('type', '?').split(':')[-1]}: {data.get('message', '')}"


def runs_table(runs: list[RunRecord], title: str = "runs") -> Table:
    table = Table(title=title)
    for column in ("run id", "workflow", "version", "status", "created (UTC)", "took", "error"):
        table.add_column(column)
    for run in runs:
        style = _STATUS_STYLE.get(run.status.value, "white")
        table.add_row(run.run_id, run.workflow_name, run.workflow_version,
                      f"[{style}]{run.status.value}[/]", _when(run.created_at),
                      _duration(run.created_at, run.completed_at), _error_line(run.error))
    return table


def timeline_table(run: RunRecord, steps: list[StepRecord]) -> Table:
    table = Table(title=f"run {run.run_id}: {run.workflow_name} v{run.workflow_version} "
                        f"[{_STATUS_STYLE.get(run.status.value, 'white')}]{run.status.value}[/]")
    for column in ("pos", "kind", "name", "status", "attempts", "started (UTC)", "duration",
                   "worker", "error"):
        table.add_column(column)
    for step in sorted(steps, key=lambda s: position_key(s.position)):
        table.add_row(step.position, step.kind.value, step.name, step.status.value,
                      str(step.attempts), _when(step.started_at),
                      _duration(step.started_at, step.completed_at), step.worker or "-",
                      _error_line(step.error))
    return table


def run_json(run: RunRecord, steps: list[StepRecord] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "run_id": run.run_id, "workflow": run.workflow_name, "version": run.workflow_version,
        "status": run.status.value, "created_at": run.created_at,
        "completed_at": run.completed_at, "parent_run_id": run.parent_run_id,
        "queue": run.queue, "priority": run.priority, "partition_key": run.partition_key,
        "started_at": run.started_at, "owner": run.owner, "fence": run.fence,
        "inputs": json.loads(run.inputs),
        "result": json.loads(run.result) if run.result else None,
        "error": json.loads(run.error) if run.error else None,
    }
    if steps is not None:
        body["steps"] = [
            {"position": s.position, "kind": s.kind.value, "name": s.name,
             "status": s.status.value, "attempts": s.attempts, "started_at": s.started_at,
             "completed_at": s.completed_at, "worker": s.worker,
             "output": json.loads(s.output) if s.output else None,
             "error": json.loads(s.error) if s.error else None}
            for s in sorted(steps, key=lambda s: position_key(s.position))
        ]
    return body
