"""`garrison runs replay` and `garrison runs fork`: check code against journals, branch runs.

Both load the `--app` for its registered code and open its store (or `--db`) without a
worker: replay writes nothing, and a fork is left PENDING for the running workers.
"""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any

import typer

from garrison.cli._console import console, errors, fail, text
from garrison.engine import Garrison
from garrison.errors import GarrisonError, NonDeterminismError
from garrison.store import StepStatus, open_store, position_key

__all__ = ["runs_fork", "runs_replay"]



def _client(app_spec: str, db: str | None) -> Garrison:
    """The `--app`'s code on its store (or `db`), without a worker."""
    from garrison.cli._load import load_app

    source = load_app(app_spec)
    client = Garrison(store=open_store(db or source.store.url, create=False), worker=False,
                      clock=source.clock, version=source.version)
    client.registry = source.registry  # the same workflow and step definitions
    client.queues = dict(source.queues)
    return client


def _replayed(run_id: str, outcome: Any) -> dict[str, Any]:
    if isinstance(outcome, NonDeterminismError):
        return {"run_id": run_id, "status": "diverged",
                "position": getattr(outcome, "position", None),
                "journal": getattr(outcome, "journal", None),
                "code": getattr(outcome, "code", None), "message": str(outcome)}
    if isinstance(outcome, GarrisonError):
        return {"run_id": run_id, "status": "error", "message": str(outcome)}
    return {"run_id": run_id, "status": "ok", "entries": outcome.entries,
            "finished": outcome.finished, "stopped_at": list(outcome.stopped_at),
            "workflow": outcome.workflow_name, "version": outcome.workflow_version,
            "run_version": outcome.run_version, "run_status": outcome.run_status.value}


def runs_replay(
    run_ids: Annotated[list[str], typer.Argument(help="Runs to replay.")],
    app_spec: Annotated[str, typer.Option("--app", help="'module:attribute': the code.")],
    db: Annotated[str | None, typer.Option(
        "--db", envvar="GARRISON_DB", help="Store URL (default: the --app's store).")] = None,
    version: Annotated[str | None, typer.Option(
        help="Replay with this registered version (default: the run's own if registered, "
             "else the newest).")] = None,
    children: Annotated[bool, typer.Option(
        "--children", help="Also replay each run's child runs, and theirs.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Replay runs against the --app's code, with no side effects: exit 1 if any
    diverges (a CI gate for new code over old journals), 2 on other errors."""
    try:
        client = _client(app_spec, db)
    except GarrisonError as exc:
        raise fail(exc) from exc

    async def replay() -> list[dict[str, Any]]:
        lines = []
        async with client:
            for run_id in run_ids:
                try:
                    report = await client.replay(run_id, version=version, children=children)
                except GarrisonError as exc:  # a child's divergence names the child
                    lines.append(_replayed(getattr(exc, "run_id", None) or run_id, exc))
                    continue
                lines.extend(_replayed(r.run_id, r) for r in report.walk())
        return lines

    try:
        lines = asyncio.run(replay())
    except GarrisonError as exc:
        raise fail(exc) from exc
    if as_json:
        print(json.dumps(lines, indent=2))
    for line in [] if as_json else lines:
        if line["status"] == "ok":
            how = ("finished" if line["finished"] else
                   f"consistent so far, stopped at {', '.join(line['stopped_at'])}")
            console.print(f"ok {text(line['run_id'])}: {line['entries']} entries, "
                          f"{text(how)} ({text(line['workflow'])} v{text(line['version'])})",
                          soft_wrap=True, highlight=False)
        else:  # a divergence is the report (stdout); an error is an error (stderr)
            where = (f" at position {line['position']}" if line.get("position")
                     else "")
            (errors if line["status"] == "error" else console).print(
                f"{line['status']} {text(line['run_id'])}{text(where)}: "
                f"{text(line['message'])}", soft_wrap=True, highlight=False)
    statuses = {line["status"] for line in lines}
    if "diverged" in statuses:
        raise typer.Exit(1)
    if "error" in statuses:
        raise typer.Exit(2)


def runs_fork(
    run_id: Annotated[str, typer.Argument(help="The run to fork.")],
    at: Annotated[int, typer.Option(
        "--at", min=0,
        help="Reuse its journal up to this top-level position (0: nothing; past its end: "
             "all of it, the fork then reproduces the run).")],
    app_spec: Annotated[str, typer.Option("--app", help="'module:attribute': the code.")],
    args: Annotated[str | None, typer.Option(
        help='New inputs as JSON: [positional, ...] or {"args": [...], "kwargs": {...}}.')
    ] = None,
    new_run_id: Annotated[str | None, typer.Option(
        "--run-id", help="The fork's run id (default: a new one).")] = None,
    db: Annotated[str | None, typer.Option(
        "--db", envvar="GARRISON_DB", help="Store URL (default: the --app's store).")] = None,
    version: Annotated[str | None, typer.Option(
        help="Fork with this registered version (default: as replay chooses).")] = None,
) -> None:
    """Fork a run at a step: a new PENDING run that reuses its journal up to --at and
    continues live on a worker; prints the new run's id."""
    try:
        inputs = json.loads(args) if args is not None else None
    except json.JSONDecodeError as exc:
        raise fail(ValueError(f"--args {args!r}: not JSON ({exc})")) from exc
    try:
        client = _client(app_spec, db)
    except GarrisonError as exc:
        raise fail(exc) from exc

    async def fork() -> str:
        async with client:
            journal = await client.store.load_journal(run_id)
            handle = await client.fork(run_id, at_step=at, args=inputs, run_id=new_run_id)
        finished = [position_key(e.position)[0] for e in journal
                    if e.status is not StepStatus.PENDING]  # what a fork may reuse
        last = max(finished, default=0)
        kept = sum(1 for top in finished if top <= at)
        if at > last:  # allowed (the fork reproduces the run), but maybe not what was meant
            errors.print(f"note: {text(run_id)}'s finished journal ends at position {last}; "
                         f"the fork reuses all of it ({kept} entries; a pending timer "
                         "or wait starts afresh)", soft_wrap=True, highlight=False)
        return handle.run_id

    try:
        forked = asyncio.run(fork())
    except GarrisonError as exc:
        raise fail(exc) from exc
    print(forked)
