"""Reliability figures computed from the store: how often workflows and steps succeed,
how many retries they needed, how many runs were recovered after a worker's death."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from garrison.store import Store

__all__ = ["Reliability", "StepFigures", "WorkflowFigures", "reliability"]

_ENDED = ("COMPLETED", "FAILED", "CANCELLED", "QUARANTINED")


@dataclass(slots=True)
class WorkflowFigures:
    """Runs of one workflow. `success_rate`: completed / ended (None before any ended);
    `recovered`: runs claimed more than once (resumed after a worker died, was stopped,
    or a redrive); `mean_duration_s`: of the ended runs."""

    runs: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    success_rate: float | None = None
    recovered: int = 0
    mean_duration_s: float | None = None


@dataclass(slots=True)
class StepFigures:
    """Journaled outcomes of one step. `retries`: attempts beyond the first (finished
    and waiting ones); `success_rate`: completed / finished."""

    outcomes: int = 0
    completed: int = 0
    failed: int = 0
    waiting_retry: int = 0
    retries: int = 0
    success_rate: float | None = None
    mean_duration_s: float | None = None


@dataclass(slots=True)
class Reliability:
    workflows: dict[str, WorkflowFigures]
    steps: dict[str, StepFigures]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


async def reliability(store: Store, *, since: float = 0.0) -> Reliability:
    """Figures for runs created at or after `since` (seconds since the epoch)."""
    run_rows, step_rows = await store.counts(since)
    workflows: dict[str, WorkflowFigures] = {}
    durations: dict[str, tuple[float, int]] = {}
    for name, status, count, mean, recovered in run_rows:
        figures = workflows.setdefault(name, WorkflowFigures())
        figures.runs += int(count)
        figures.by_status[status] = int(count)
        figures.recovered += int(recovered or 0)
        if status in _ENDED and mean is not None:
            total, n = durations.get(name, (0.0, 0))
            durations[name] = (total + float(mean) * int(count), n + int(count))
    for name, figures in workflows.items():
        ended = sum(figures.by_status.get(s, 0) for s in _ENDED)
        if ended:
            figures.success_rate = figures.by_status.get("COMPLETED", 0) / ended
        if name in durations and durations[name][1]:
            figures.mean_duration_s = durations[name][0] / durations[name][1]
    steps: dict[str, StepFigures] = {}
    for name, status, count, retries, mean in step_rows:
        figures_s = steps.setdefault(name, StepFigures())
        figures_s.outcomes += int(count)
        figures_s.retries += int(retries or 0)
        if status == "completed":
            figures_s.completed = int(count)
            figures_s.mean_duration_s = float(mean) if mean is not None else None
        elif status == "failed":
            figures_s.failed = int(count)
        else:
            figures_s.waiting_retry = int(count)
    for figures_s in steps.values():
        finished = figures_s.completed + figures_s.failed
        if finished:
            figures_s.success_rate = figures_s.completed / finished
    return Reliability(workflows, steps)
