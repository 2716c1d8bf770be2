"""Supervision trees with Erlang/OTP semantics, as durable workflows.

A `Supervisor` is a workflow: it starts its children (child runs) in order, waits
durably for any of them to end (`ctx.first_ended`), and restarts per its strategy:

- `one_for_one`: only the child that ended;
- `one_for_all`: every child (the others are stopped first, in reverse start order);
- `rest_for_one`: the child that ended and those started after it.

A child restarts by its type: `permanent` always, `transient` only after an abnormal end
(failed, quarantined, cancelled), `temporary` never. More than `intensity` restarts
within `period` seconds escalate: the supervisor stops its children (reverse order, each
given `shutdown` seconds) and fails with `SupervisorEscalated`, which its own supervisor
(a nested tree) handles by its rules, or which ends the top of the tree. Every decision
is journaled (child starts, ends, restart times), so a tree survives a process restart
and resumes where it was, restart counts included.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from garrison.engine import record_event
from garrison.errors import ConfigurationError, SupervisorEscalated

if TYPE_CHECKING:
    from garrison.engine import Context, Garrison, RunHandle
    from garrison.engine._registry import WorkflowDef

__all__ = ["Child", "Supervisor"]

_RESTARTS = ("permanent", "transient", "temporary")
_STRATEGIES = ("one_for_one", "one_for_all", "rest_for_one")


@dataclass(frozen=True)
class Child:
    """A supervised child: a workflow (or a nested `Supervisor`) and how to treat it.

    Args:
        workflow: a decorated workflow, or a `Supervisor`.
        args, kwargs: its arguments.
        restart: "permanent" (always restarted), "transient" (restarted after an
            abnormal end), "temporary" (never restarted).
        shutdown: seconds the child gets to end after being asked to stop.
        name: its name in the tree (default: the workflow's name); child run ids are
            `{supervisor run id}/{name}#{generation}`.
    """

    workflow: Any
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    restart: str = "permanent"
    shutdown: float = 5.0
    name: str | None = None

    def __post_init__(self) -> None:
        if self.restart not in _RESTARTS:
            raise ConfigurationError(
                f"Child(restart={self.restart!r}): one of {', '.join(_RESTARTS)}")
        if self.shutdown < 0:
            raise ConfigurationError(f"Child(shutdown={self.shutdown!r}): seconds >= 0")

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        inner = getattr(self.workflow, "__garrison_workflow__", None)
        return str(getattr(inner, "name", None) or getattr(self.workflow, "name", None)
                   or getattr(self.workflow, "__name__", "child"))


class Supervisor:
    """A supervision tree node (see the module doc); start it with `app.start(tree)`.

    Args:
        name: its workflow name is `supervisor:{name}`.
        children: `Child` specs, started in this order (stopped in reverse).
        strategy: "one_for_one", "one_for_all" or "rest_for_one".
        intensity, period: more than `intensity` restarts within `period` seconds
            escalate (defaults 3 in 5 s, as OTP's).
        backoff: `(min, max)` seconds: wait `min * 2**k` (capped at `max`, with full
            jitter from the journaled `ctx.random()`) before the k-th restart within the
            period. Default: restart at once.
    Register a tree before the app opens (`app.add_supervisor(tree)`) so that a
    restarted worker resumes it.
    """

    def __init__(self, name: str, children: Sequence[Child], *,
                 strategy: str = "one_for_one", intensity: int = 3, period: float = 5.0,
                 backoff: tuple[float, float] | None = None) -> None:
        if not children:
            raise ConfigurationError(f"Supervisor({name!r}): give at least one Child")
        if strategy not in _STRATEGIES:
            raise ConfigurationError(
                f"Supervisor({name!r}, strategy={strategy!r}): one of {', '.join(_STRATEGIES)}")
        if intensity < 0 or period <= 0:
            raise ConfigurationError(f"Supervisor({name!r}): intensity >= 0, period > 0 s")
        labels = [c.label for c in children]
        if len(set(labels)) != len(labels):
            raise ConfigurationError(
                f"Supervisor({name!r}): two children are named alike ({labels}); give "
                "them name=")
        self.name = name
        self.children = list(children)
        self.strategy = strategy
        self.intensity = intensity
        self.period = period
        self.backoff = backoff
        self._registered: dict[int, WorkflowDef] = {}

    def __garrison_register__(self, app: Garrison) -> WorkflowDef:
        """The engine's hook: this tree's workflow in `app` (registered on first use)."""
        found = self._registered.get(id(app))
        if found is not None:
            return found
        for child in self.children:
            if isinstance(child.workflow, Supervisor):
                child.workflow.__garrison_register__(app)

        @app.step(name=f"supervisor:{self.name}:stop")
        async def stop_child(run_id: str, kill: bool = False) -> None:
            await app.cancel(run_id, force=kill)

        tree = self

        @app.workflow(name=f"supervisor:{self.name}", quarantine=False)
        async def supervise(ctx: Context) -> None:
            await _Tree(tree, ctx, stop_child).run()

        definition: WorkflowDef = supervise.__garrison_workflow__  # type: ignore[attr-defined]
        self._registered[id(app)] = definition
        return definition


class _Tree:
    """One supervisor run's state, rebuilt identically on every replay."""

    def __init__(self, spec: Supervisor, ctx: Context, stop_child: Any) -> None:
        self.spec = spec
        self.ctx = ctx
        self.stop_child = stop_child
        self.running: dict[int, RunHandle[Any]] = {}
        self.generation = [0] * len(spec.children)
        self.restarts: list[float] = []

    async def start(self, index: int) -> None:
        child = self.spec.children[index]
        self.generation[index] += 1
        run_id = f"{self.ctx.run_id}/{child.label}#{self.generation[index]}"
        self.running[index] = await self.ctx.start_child(child.workflow, *child.args,
                                                         run_id=run_id, **child.kwargs)

    async def stop(self, index: int) -> None:
        handle = self.running.pop(index)
        await self.stop_child(handle.run_id)
        # Its end (CANCELLED, or whatever it reached first) is consumed here; past its
        # shutdown time it is killed (ended now; its worker's writes are refused).
        ended = await self.ctx.first_ended([handle],
                                           timeout=self.spec.children[index].shutdown)
        if ended is None:
            await self.stop_child(handle.run_id, True)

    async def stop_all(self) -> None:
        for index in sorted(self.running, reverse=True):
            await self.stop(index)

    async def run(self) -> None:
        for index in range(len(self.spec.children)):
            await self.start(index)
        while self.running:
            handles = [self.running[i] for i in sorted(self.running)]
            ended = await self.ctx.first_ended(handles)
            assert ended is not None
            index = next(i for i, h in self.running.items() if h.run_id == ended["run_id"])
            del self.running[index]
            abnormal = ended["status"] != "COMPLETED"
            if not restarts(self.spec.children[index], abnormal):
                continue
            decision = decide(self.spec, frozenset(self.running), index,
                              tuple(self.restarts), self.ctx.now().timestamp())
            self.restarts = list(decision.restarts)
            child = self.spec.children[index]
            for other in decision.stop:
                await self.stop(other)
            if decision.escalate:
                spec = self.spec
                error = (ended.get("error") or {}).get("message") or ended["status"]
                record_event("garrison.supervisor.escalated", **{
                    "garrison.supervisor.name": spec.name, "garrison.child.label": child.label,
                    "garrison.child.run_id": ended["run_id"],
                    "garrison.child.status": ended["status"],
                    "garrison.supervisor.restarts_in_period": len(self.restarts)})
                raise SupervisorEscalated(
                    f"supervisor {spec.name!r}: more than {spec.intensity} restarts within "
                    f"{spec.period:g} s (last: child {ended['run_id']} ended "
                    f"{ended['status']}: {error}); its children were stopped",
                    supervisor=spec.name, child_run_id=ended["run_id"])
            if self.spec.backoff is not None:
                low, high = self.spec.backoff
                wait = min(high, low * 2 ** (len(self.restarts) - 1)) * self.ctx.random()
                await self.ctx.sleep(dt.timedelta(seconds=wait))
            record_event("garrison.supervisor.restart", **{
                "garrison.supervisor.name": self.spec.name,
                "garrison.supervisor.strategy": self.spec.strategy,
                "garrison.child.label": child.label, "garrison.child.run_id": ended["run_id"],
                "garrison.child.status": ended["status"],
                "garrison.supervisor.restarting": [self.spec.children[i].label
                                                   for i in sorted(decision.start)],
                "garrison.supervisor.restarts_in_period": len(self.restarts)})
            for target in decision.start:
                await self.start(target)


def restarts(child: Child, abnormal: bool) -> bool:
    """Whether a child that ended is to be restarted, by its restart type."""
    return child.restart == "permanent" or (child.restart == "transient" and abnormal)


@dataclass(frozen=True, slots=True)
class Decision:
    """What a supervisor does after a child that must restart ended: stop `stop` (in
    this order), then start `start` (in this order), or escalate after the stops."""

    stop: tuple[int, ...]
    start: tuple[int, ...]
    restarts: tuple[float, ...]  # restart times within the period, this one included
    escalate: bool


def decide(spec: Supervisor, running: frozenset[int], index: int,
           restart_times: tuple[float, ...], now: float) -> Decision:
    """The pure core of a supervisor (no I/O): child `index` ended and must restart;
    `running` are the children still running."""
    kept = (*(t for t in restart_times if now - t < spec.period), now)
    if len(kept) > spec.intensity:
        return Decision(tuple(sorted(running, reverse=True)), (), kept, True)
    others = sorted(running) if spec.strategy != "one_for_one" else []
    if spec.strategy == "rest_for_one":
        others = [i for i in others if i > index]
    # Siblings stopped for the restart start again, except temporary ones (never
    # restarted, as in OTP).
    again = {i for i in others if spec.children[i].restart != "temporary"}
    return Decision(tuple(sorted(others, reverse=True)), tuple(sorted({index, *again})),
                    kept, False)
