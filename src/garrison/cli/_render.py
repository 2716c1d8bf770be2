"""Rich renderings of runs and their step timelines (and their JSON twins)."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Any

from rich import box
from rich.table import Table

from garrison.cli._console import text
from garrison.observability import mask_value
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
    # A run id is copied into `runs show`: never cut with an ellipsis (folded instead).
    table.add_column("run id", overflow="fold", min_width=min(
        26, max((len(run.run_id) for run in runs), default=6)))
    for column in ("workflow", "version", "status", "created (UTC)", "took", "error"):
        table.add_column(column)
    for run in runs:
        style = _STATUS_STYLE.get(run.status.value, "white")
        table.add_row(text(run.run_id), text(run.workflow_name), text(run.workflow_version),
                      f"[{style}]{run.status.value}[/]", _when(run.created_at),
                      _duration(run.created_at, run.completed_at),
                      text(_error_line(run.error)))
    return table


@dataclass(frozen=True, slots=True)
class _ModelCall:
    """What an agent's model step journaled: usage, cost and who served it."""

    input_tokens: int
    output_tokens: int
    cost_usd: float
    served_by: str | None
    model: str | None


def _model_call(step: StepRecord) -> _ModelCall | None:
    """The usage of a completed `agent.NAME.model` step, from its journaled output."""
    if not (step.name.startswith("agent.") and step.name.endswith(".model")) or not step.output:
        return None
    try:
        out = json.loads(step.output)
    except ValueError:
        return None
    if not isinstance(out, dict):
        return None
    usage = out.get("usage")
    if not isinstance(usage, dict):
        usage = {}
    served_by, model = out.get("served_by"), out.get("model")
    return _ModelCall(int(usage.get("input_tokens") or 0), int(usage.get("output_tokens") or 0),
                      float(out.get("cost_usd") or 0.0),
                      str(served_by) if served_by is not None else None,
                      str(model) if model is not None else None)


@dataclass(frozen=True, slots=True)
class _Row:
    step: StepRecord
    call: _ModelCall | None
    resumed_on: str | None  # this step ran on another worker than the step before it


def _timeline(steps: list[StepRecord]) -> list[_Row]:
    rows: list[_Row] = []
    previous: str | None = None
    for step in sorted(steps, key=lambda s: position_key(s.position)):
        resumed = step.worker if (step.worker and previous and step.worker != previous) else None
        rows.append(_Row(step, _model_call(step), resumed))
        previous = step.worker or previous
    return rows


def _totals(rows: list[_Row]) -> dict[str, Any]:
    calls = [r.call for r in rows if r.call is not None]
    return {"steps": len(rows), "attempts": sum(r.step.attempts for r in rows),
            "model_calls": len(calls),
            "input_tokens": sum(c.input_tokens for c in calls),
            "output_tokens": sum(c.output_tokens for c in calls),
            "cost_usd": sum(c.cost_usd for c in calls),
            "resumes": sum(1 for r in rows if r.resumed_on is not None),
            "workers": list(dict.fromkeys(r.step.worker for r in rows if r.step.worker))}


def _cost(usd: float) -> str:
    if 0 < usd < 0.00005:  # not "$0.0000" for a call that cost something
        return "<$0.0001"
    return f"${usd:.4f}" if usd < 100 else f"${usd:,.2f}"


def timeline_table(run: RunRecord, steps: list[StepRecord]) -> Table:
    """The step timeline: one row per journal entry in position order, a "resumed on"
    row where another worker took over, and totals. Workers are labelled w1, w2, ... in
    the caption, and the token, cost, model and error columns appear only when some step
    has them, so the table fits 100 columns."""
    rows = _timeline(steps)
    totals = _totals(rows)
    labels = {worker: f"w{i}" for i, worker in enumerate(totals["workers"], 1)}
    agentic = totals["model_calls"] > 0
    errors = any(r.step.error for r in rows)
    took = _duration(run.created_at, run.completed_at)
    table = Table(title=f"run {text(run.run_id)}: {text(run.workflow_name)} "
                        f"v{text(run.workflow_version)} "
                        f"[{_STATUS_STYLE.get(run.status.value, 'white')}]{run.status.value}[/]"
                        f" ({took})", title_justify="left", box=box.SIMPLE_HEAD,
                  padding=(0, 1), collapse_padding=True, pad_edge=False)
    table.add_column("pos", no_wrap=True)
    table.add_column("step", overflow="fold", min_width=8)
    table.add_column("status", no_wrap=True)
    table.add_column("att", justify="right", no_wrap=True)
    table.add_column("took", justify="right", no_wrap=True)
    table.add_column("wkr", no_wrap=True)
    if agentic:
        table.add_column("tokens", justify="right", no_wrap=True)  # in/out
        table.add_column("cost", justify="right", no_wrap=True)
        table.add_column("model", overflow="fold", min_width=6)
    if errors:
        table.add_column("error", overflow="fold", min_width=8, ratio=1)
    blank = [""] * (3 * agentic + errors)
    fork_marked = run.forked_at is None
    for row in rows:
        step, call = row.step, row.call
        if not fork_marked and position_key(step.position)[0] > (run.forked_at or 0):
            fork_marked = True  # the entries above came from the forked run's journal
            table.add_row("", f"[cyan]live from here (reused up to {run.forked_at})[/]",
                          "", "", "", "", *blank)
        if row.resumed_on is not None:
            table.add_row("", f"[yellow]resumed on {labels[row.resumed_on]}[/]", "", "", "",
                          "", *blank)
        name = step.name if step.kind.value == "step" else f"{step.kind.value} {step.name}"
        status_style = {"completed": "green", "failed": "red"}.get(step.status.value, "")
        cells = [step.position, text(name),
                 f"[{status_style}]{step.status.value}[/]" if status_style
                 else step.status.value,
                 str(step.attempts), _duration(step.started_at, step.completed_at),
                 labels.get(step.worker or "", "-")]
        if agentic:
            cells += ([f"{call.input_tokens:,}/{call.output_tokens:,}", _cost(call.cost_usd),
                       text(call.served_by or call.model or "")] if call else ["", "", ""])
        if errors:
            cells.append(text(_error_line(step.error)))
        table.add_row(*cells)
    table.add_section()
    total = ["total", f"{totals['steps']} steps", "", str(totals["attempts"]), took,
             str(len(labels))]
    if agentic:
        total += [f"{totals['input_tokens']:,}/{totals['output_tokens']:,}",
                  _cost(totals["cost_usd"]), f"{totals['model_calls']} calls"]
    table.add_row(*total, *([""] * errors), style="bold")
    caption: list[str] = []
    if labels:
        resumes = totals["resumes"]
        workers = ", ".join(f"{label} = {text(worker)}" for worker, label in labels.items())
        caption.append(("tokens: in/out; " if agentic else "") + f"workers: {workers}"
                       + (f"; resumed {resumes}x" if resumes else ""))
    if run.forked_from is not None:
        caption.append(f"forked from {text(run.forked_from)} at position {run.forked_at}: "
                       "the entries up to it are that run's, reused")
    if run.recoveries:  # taken over while RUNNING; the reason is known for the last one
        note = f"recovered {run.recoveries}x"
        if run.claim_reason is not None and run.claim_reason.is_recovery:
            previous = run.previous_owner
            note += (f" (last: {run.claim_reason.value.replace('_', ' ')}"
                     + (f" by {labels.get(previous) or text(previous)}" if previous else "")
                     + ")")
        caption.append(note)
    if caption:
        table.caption = "; ".join(caption)
        table.caption_justify = "left"
    return table


def _error_json(error: str | None) -> Any:
    """A stored error for --json: its message, traceback and arguments masked as `text`
    masks them (an error often names the URL or header it failed with)."""
    return mask_value(json.loads(error)) if error else None


def run_json(run: RunRecord, steps: list[StepRecord] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "run_id": run.run_id, "workflow": run.workflow_name, "version": run.workflow_version,
        "status": run.status.value, "created_at": run.created_at,
        "completed_at": run.completed_at, "parent_run_id": run.parent_run_id,
        "queue": run.queue, "priority": run.priority, "partition_key": run.partition_key,
        "started_at": run.started_at, "owner": run.owner, "fence": run.fence,
        "claim_reason": run.claim_reason.value if run.claim_reason else None,
        "previous_owner": run.previous_owner, "recoveries": run.recoveries,
        "inputs": mask_value(json.loads(run.inputs)),
        "result": mask_value(json.loads(run.result)) if run.result else None,
        "error": _error_json(run.error),
        "forked_from": run.forked_from, "forked_at": run.forked_at,
    }
    if steps is not None:
        rows = _timeline(steps)
        body["steps"] = [
            {"position": s.position, "kind": s.kind.value, "name": s.name,
             "status": s.status.value, "attempts": s.attempts, "started_at": s.started_at,
             "completed_at": s.completed_at, "worker": s.worker,
             "resumed": row.resumed_on is not None,
             "input_tokens": row.call.input_tokens if row.call else None,
             "output_tokens": row.call.output_tokens if row.call else None,
             "cost_usd": row.call.cost_usd if row.call else None,
             "served_by": row.call.served_by if row.call else None,
             "model": row.call.model if row.call else None,
             "output": mask_value(json.loads(s.output)) if s.output else None,
             "error": _error_json(s.error)}
            for row in rows for s in (row.step,)
        ]
        body["totals"] = _totals(rows)
    return body
