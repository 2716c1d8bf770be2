"""Reliability figures computed from the store: how often workflows and steps succeed,
how many retries they needed, how many runs were recovered after a worker's death, and,
for shared circuit breakers, how often they opened and how long their dependency took
to recover."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from garrison.store import Store

__all__ = ["BreakerFigures", "Reliability", "StepFigures", "WorkflowFigures", "reliability"]

_OPEN = ("OPEN", "FORCED_OPEN")

_ENDED = ("COMPLETED", "FAILED", "CANCELLED", "QUARANTINED")


@dataclass(slots=True)
class WorkflowFigures:
    """Runs of one workflow. `success_rate`: completed / ended (None before any ended);
    `recovered`: runs taken over at least once while RUNNING (their worker died, was
    stopped, or a write of theirs failed: `RunRecord.recoveries`; a wake-up or a
    redrive is not one); `mean_duration_s`: of the ended runs."""

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
class BreakerFigures:
    """A shared circuit breaker's published decisions. `time_open_s`: seconds spent OPEN
    (or forced open) in the period, an open spell still running counted up to now;
    `recoveries`: spells that ended CLOSED; `mean_time_to_recovery_s`: their mean length."""

    opens: int = 0
    time_open_s: float = 0.0
    recoveries: int = 0
    mean_time_to_recovery_s: float | None = None
    state: str = "CLOSED"


@dataclass(slots=True)
class Reliability:
    workflows: dict[str, WorkflowFigures]
    steps: dict[str, StepFigures]
    breakers: dict[str, BreakerFigures] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _breaker_figures(history: list[tuple[str, str, float]], now: float
                     ) -> dict[str, BreakerFigures]:
    figures: dict[str, BreakerFigures] = {}
    opened: dict[str, float] = {}
    recovered: dict[str, list[float]] = {}
    for name, state, at in history:
        breaker = figures.setdefault(name, BreakerFigures())
        if state in _OPEN and name not in opened:
            opened[name] = at
            breaker.opens += 1
        elif state not in _OPEN and name in opened:
            spell = at - opened.pop(name)
            breaker.time_open_s += spell
            if state == "CLOSED":
                recovered.setdefault(name, []).append(spell)
        breaker.state = state
    for name, since in opened.items():  # still open
        figures[name].time_open_s += max(0.0, now - since)
    for name, spells in recovered.items():
        figures[name].recoveries = len(spells)
        figures[name].mean_time_to_recovery_s = sum(spells) / len(spells)
    return figures


async def reliability(store: Store, *, since: float = 0.0) -> Reliability:
    """Figures for runs created (and breaker decisions published) at or after `since`
    (seconds since the epoch)."""
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
    breakers = _breaker_figures(await store.breaker_history(since), time.time())
    return Reliability(workflows, steps, breakers)
