"""`garrison demo | worker | runs list | runs show | llm-server`."""

from __future__ import annotations

import asyncio
import enum
import json
import os
import signal
from pathlib import Path
from typing import Annotated

import typer

from garrison.cli._console import console, fail, text
from garrison.cli._replay import runs_fork, runs_replay
from garrison.errors import GarrisonError
from garrison.observability import escape_control, mask_text
from garrison.store import RunRecord, RunStatus, StepRecord, open_store

__all__ = ["app", "main"]

app = typer.Typer(help="Garrison: durable execution for AI agents.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
runs_app = typer.Typer(help="Inspect runs in a store.", no_args_is_help=True)
app.add_typer(runs_app, name="runs")


@runs_app.callback()
def _runs_logging() -> None:
    """Log lines (an --app's at import, a replayed workflow's own) go to stderr, warnings
    and worse only: stdout holds the command's output, which --json makes a tool's."""
    from garrison.observability import configure_logging

    configure_logging(level="warning")

DbOption = Annotated[str | None, typer.Option(
    "--db", envvar="GARRISON_DB",
    help="Store URL (default: the --app's store, else sqlite:///garrison.db).")]
AppOption = Annotated[str | None, typer.Option(
    "--app", help="Your application as 'module:attribute'.")]


class LogFormat(enum.StrEnum):
    """`garrison worker --log-format`."""

    AUTO = "auto"
    JSON = "json"
    CONSOLE = "console"


_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def _store_url(db: str | None, app_spec: str | None) -> str | None:
    if db:
        return db
    if app_spec:
        from garrison.cli._load import load_app

        return load_app(app_spec).store.url
    return None


@app.command()
def demo(
    runs: Annotated[int | None, typer.Option(
        help="How many conversations (default 100) or, with --workflows, order workflows "
             "(default 200).")] = None,
    folder: Annotated[Path, typer.Option(help="Where the demo database goes.")] = Path(
        "garrison-demo"),
    workflows: Annotated[bool, typer.Option(
        "--workflows", help="The plain-workflow demo (orders, no agents).")] = False,
) -> None:
    """Agent conversations against the local LLM server with injected faults; the worker
    is SIGKILLed midway and restarted; then a report: nothing lost, nothing repeated."""
    if runs is not None and runs < 1:
        raise fail(ValueError(f"--runs {runs}: run at least one"))
    from garrison.observability import configure_logging

    configure_logging(level="warning")  # the report is the output; only trouble is logged
    if workflows:
        from garrison.demo._driver import run_demo

        report = run_demo(folder, runs=runs or 200, console=console)
        if report.lost:
            raise typer.Exit(1)
        return
    try:
        from garrison.demo._agent_driver import run_agent_demo
    except ImportError as exc:
        raise fail(exc) from exc
    agents_report = run_agent_demo(folder, runs=runs or 100, console=console)
    if agents_report.lost:
        raise typer.Exit(1)


@app.command()
def worker(
    app_spec: Annotated[str, typer.Option("--app", help="'module:attribute'.")],
    queues: Annotated[str | None, typer.Option(
        help="Comma-separated queues to take runs from (default: all the app declares).")
    ] = None,
    concurrency: Annotated[int | None, typer.Option(
        help="At most this many runs executing in this worker at once.")] = None,
    grace: Annotated[float, typer.Option(
        help="On SIGTERM/SIGINT: seconds for in-flight runs to finish or park before they "
             "are handed back to the fleet.")] = 10.0,
    metrics_port: Annotated[int | None, typer.Option(
        min=0, max=65535,
        help="Serve Prometheus metrics on this port (/metrics) and trace with the global "
             "OpenTelemetry providers; needs garrison[observability].")] = None,
    log_format: Annotated[LogFormat, typer.Option(
        "--log-format", help="Log lines on stderr: json, console, or auto (JSON unless "
                             "stderr is a terminal).")] = LogFormat.AUTO,
    log_level: Annotated[str, typer.Option(
        "--log-level", help="The lowest level logged: debug, info, warning, error.")
    ] = "info",
) -> None:
    """Run a worker for an application until SIGINT/SIGTERM; resumes unfinished runs."""
    import structlog

    from garrison.cli._load import load_app
    from garrison.observability import configure_logging

    if log_level.lower() not in _LOG_LEVELS:
        raise fail(ValueError(f"--log-level {log_level}: use one of "
                               + ", ".join(_LOG_LEVELS)))
    configure_logging(json={LogFormat.JSON: True, LogFormat.CONSOLE: False}.get(log_format),
                      level=log_level)

    try:
        application = load_app(app_spec)
        application.configure_worker(
            queues=[q.strip() for q in queues.split(",") if q.strip()] if queues else None,
            concurrency=concurrency, shutdown_grace_s=grace)
    except GarrisonError as exc:
        raise fail(exc) from exc
    metrics_server = None
    if metrics_port is not None:
        try:
            from prometheus_client import start_http_server

            from garrison.observability import instrument
        except ImportError as exc:
            raise fail(ImportError(
                f"--metrics-port needs the observability extra: {exc}. "
                "Install it with: pip install 'garrison[observability]'")) from exc
        instrumentation = instrument(application)
        try:
            metrics_server, _ = start_http_server(metrics_port,
                                                  registry=instrumentation.registry)
        except OSError as exc:
            raise fail(OSError(f"--metrics-port {metrics_port}: {exc}")) from exc
        bound = getattr(metrics_server, "server_port", metrics_port)  # 0: the OS's pick
        console.print(f"metrics on http://0.0.0.0:{bound}/metrics", soft_wrap=True)

    async def serve() -> None:
        # Every line of this worker names it, inside runs and out (tasks copy the context).
        structlog.contextvars.bind_contextvars(worker=application.worker_id)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        async with application:
            served = ", ".join(q.name for q in application.worker.queues) \
                if application.worker is not None else "-"
            console.print(f"worker {text(application.worker_id)} on "
                          f"{text(application.store.safe_url)} "
                          f"(pid {os.getpid()}; queues {served}); Ctrl-C to stop",
                          soft_wrap=True)
            for orphan in application.orphaned_runs:
                console.print(f"[yellow]orphaned[/] {text(orphan.run_id)}: "
                              f"{text(orphan.workflow_name)} v{text(orphan.workflow_version)} "
                              "is not registered here")
            await stop.wait()
            console.print(f"stopping: in-flight runs get {grace:g} s, then are handed back")
        console.print("worker stopped; unfinished runs are resumed by the fleet or the next "
                      "start")

    try:
        asyncio.run(serve())
    except GarrisonError as exc:
        raise fail(exc) from exc
    finally:
        if metrics_server is not None:
            metrics_server.shutdown()


@runs_app.command("list")
def runs_list(
    db: DbOption = None,
    app_spec: AppOption = None,
    status: Annotated[list[RunStatus] | None, typer.Option(help="Only these statuses.")] = None,
    orphaned: Annotated[bool, typer.Option(
        help="Only unfinished runs whose workflow version --app does not register.")] = False,
    limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List runs, newest first."""
    from garrison.cli._render import run_json, runs_table

    if orphaned and not app_spec:
        raise fail(ValueError("--orphaned compares runs with an app's code: add --app module:app"))

    async def fetch() -> list[RunRecord]:
        store = open_store(_store_url(db, app_spec), create=False)
        await store.open()
        try:
            statuses = list(status) if status else None
            if orphaned:
                from garrison.cli._load import load_app

                registry = load_app(str(app_spec)).registry
                unfinished = [s for s in RunStatus if not s.is_terminal]
                runs = await store.list_runs(statuses=unfinished, limit=100_000)
                return [r for r in runs if registry.workflow(r.workflow_name,
                                                             r.workflow_version) is None][:limit]
            return await store.list_runs(statuses=statuses, limit=limit)
        finally:
            await store.close()

    try:
        runs = asyncio.run(fetch())
    except GarrisonError as exc:
        raise fail(exc) from exc
    if as_json:
        print(json.dumps([run_json(r) for r in runs], indent=2))
    else:
        console.print(runs_table(runs, "orphaned runs" if orphaned else "runs"))


@runs_app.command("show")
def runs_show(
    run_id: Annotated[str, typer.Argument(help="The run's id.")],
    db: DbOption = None,
    app_spec: AppOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show one run and its step timeline: position, name, status, attempts, duration,
    worker (and where the run resumed on another), tokens, cost and serving model of
    model calls, errors, totals."""
    from garrison.cli._render import run_json, timeline_table
    from garrison.errors import RunNotFoundError

    async def fetch() -> tuple[RunRecord, list[StepRecord]]:
        store = open_store(_store_url(db, app_spec), create=False)
        await store.open()
        try:
            run = await store.get_run(run_id)
            if run is None:
                raise RunNotFoundError(f"no run {run_id!r} in {store.safe_url}; "
                                       "`garrison runs list` shows the runs", run_id=run_id)
            return run, await store.load_journal(run_id)
        finally:
            await store.close()

    try:
        run, steps = asyncio.run(fetch())
    except GarrisonError as exc:
        raise fail(exc) from exc
    if as_json:
        print(json.dumps(run_json(run, steps), indent=2))
        return
    console.print(timeline_table(run, steps))
    if run.error:
        error = json.loads(run.error)
        # Never wrapped by us (soft_wrap): a wrapped piece of a message would begin a
        # line of its own, unmarked, and could pass for the command's own output.
        console.print(f"[red]{text(error.get('type'))}[/]: {text(error.get('message'))}",
                      soft_wrap=True)
        # Its lines stay lines, each marked as the logs mark them: a newline in a message
        # cannot make a line that passes for the command's own output.
        traceback = mask_text(str(error.get("traceback") or "")).rstrip("\n")
        if traceback:
            console.print("\n".join(f"│ {escape_control(line)}"
                                    for line in traceback.split("\n")),
                          markup=False, highlight=False, soft_wrap=True)


@runs_app.command("stats")
def runs_stats(
    db: DbOption = None,
    app_spec: AppOption = None,
    hours: Annotated[float | None, typer.Option(
        help="Only runs created in the last HOURS hours.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Reliability figures: success rates, retries, recovered runs, per workflow and step."""
    import time

    from rich.table import Table

    from garrison.resilience import Reliability, reliability

    async def fetch() -> Reliability:
        store = open_store(_store_url(db, app_spec), create=False)
        await store.open()
        try:
            since = time.time() - hours * 3600 if hours is not None else 0.0
            return await reliability(store, since=since)
        finally:
            await store.close()

    try:
        figures = asyncio.run(fetch())
    except GarrisonError as exc:
        raise fail(exc) from exc
    if as_json:
        print(json.dumps(figures.as_dict(), indent=2))
        return

    def rate(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f} %"

    runs = Table("workflow", "runs", "success", "recovered", "by status", title="Runs")
    for name, w in sorted(figures.workflows.items()):
        runs.add_row(text(name), str(w.runs), rate(w.success_rate), str(w.recovered),
                     ", ".join(f"{k} {v}" for k, v in sorted(w.by_status.items())))
    steps = Table("step", "outcomes", "success", "retries", "waiting a retry", title="Steps")
    for name, st in sorted(figures.steps.items()):
        steps.add_row(text(name), str(st.outcomes), rate(st.success_rate), str(st.retries),
                      str(st.waiting_retry))
    console.print(runs)
    console.print(steps)
    if figures.breakers:
        breakers = Table("breaker", "state", "opens", "time open", "recoveries", "MTTR",
                         title="Circuit breakers")
        for name, b in sorted(figures.breakers.items()):
            mttr = b.mean_time_to_recovery_s
            breakers.add_row(text(name), text(b.state), str(b.opens), f"{b.time_open_s:.1f} s",
                             str(b.recoveries), "-" if mttr is None else f"{mttr:.1f} s")
        console.print(breakers)


@runs_app.command("redrive")
def runs_redrive(
    run_ids: Annotated[list[str], typer.Argument(help="QUARANTINED runs to continue.")],
    db: DbOption = None,
    app_spec: AppOption = None,
) -> None:
    """Continue QUARANTINED runs after a fix: back to their queue, completed steps kept,
    failed steps run again (by a running worker)."""
    import time

    async def redrive() -> list[str]:
        store = open_store(_store_url(db, app_spec), create=False)
        await store.open()
        try:
            for run_id in run_ids:
                await store.redrive_run(run_id, now=time.time())
            return run_ids
        finally:
            await store.close()

    try:
        done = asyncio.run(redrive())
    except GarrisonError as exc:
        raise fail(exc) from exc
    for run_id in done:
        console.print(f"redriven {text(run_id)}: PENDING in its queue; a worker continues it")


runs_app.command("replay")(runs_replay)
runs_app.command("fork")(runs_fork)


@app.command("llm-server")
def llm_server(
    script: Annotated[Path | None, typer.Option(
        help="JSON script {\"rules\": [...], \"default\": {...}} (default: answer 'ok').")
    ] = None,
    faults: Annotated[str | None, typer.Option(
        help="Faults to inject, e.g. '429:0.2@1.5,503:1x3/model=gpt-*,latency:20-80ms' "
             "(grammar: docs/llm-server.md).")] = None,
    port: Annotated[int, typer.Option(help="Port to listen on; 0 picks a free one.")] = 0,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    seed: Annotated[int, typer.Option(help="Seeds which requests the faults hit.")] = 0,
) -> None:
    """Serve a local OpenAI/Anthropic-compatible LLM with scripted replies and injected
    faults until SIGINT/SIGTERM; prints `listening on http://HOST:PORT` once ready."""
    try:
        from garrison.testing import Faults, LLMServer, Script

        server = LLMServer(Script.from_file(script) if script is not None else None,
                           faults=Faults.parse(faults, seed=seed) if faults else None,
                           host=host, port=port, seed=seed)
    except (GarrisonError, ImportError) as exc:
        raise fail(exc) from exc

    def ready(url: str) -> None:
        print(f"listening on {url}", flush=True)

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await server.serve(stop, ready=ready)

    try:
        asyncio.run(serve())
    except GarrisonError as exc:
        raise fail(exc) from exc


def main() -> None:
    """Entry point of the `garrison` script."""
    app()
