"""The `garrison` command: demo, worker, runs list/show (real processes, real stores)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from typer.testing import CliRunner

from garrison import Context, Garrison
from garrison.cli import app as cli

runner = CliRunner()

APP_MODULE = textwrap.dedent("""
    from garrison import Context, Garrison

    app = Garrison("sqlite:///{db}")

    @app.step()
    async def double(x: int) -> int:
        return x * 2

    @app.workflow(name="twice")
    async def twice(ctx: Context, x: int) -> int:
        return await double(x)
""")


async def seed(db: Path) -> None:
    app = Garrison(f"sqlite:///{db}")

    @app.step()
    async def double(x: int) -> int:
        if x < 0:
            raise ValueError("negative input")
        return x * 2

    @app.workflow(name="twice")
    async def twice(ctx: Context, x: int) -> int:
        return await double(x)

    @app.workflow(name="legacy", version="0")
    async def legacy(ctx: Context) -> None:
        await ctx.wait_for("never")

    async with app:
        await (await app.start(twice, 21, run_id="ok")).result(timeout=5)
        failed = await app.start(twice, -1, run_id="bad")
        await asyncio.wait_for(asyncio.shield(_settle(failed)), 5)
        await app.start(legacy, run_id="old")


async def _settle(handle: object) -> None:
    with contextlib.suppress(Exception):
        await handle.result()  # type: ignore[attr-defined]


def test_runs_list_and_show_render_the_store(tmp_path: Path) -> None:
    db = tmp_path / "g.db"
    asyncio.run(seed(db))
    url = f"sqlite:///{db}"

    listed = runner.invoke(cli, ["runs", "list", "--db", url, "--json"])
    assert listed.exit_code == 0, listed.output
    by_id = {r["run_id"]: r for r in json.loads(listed.output)}
    assert by_id["ok"]["status"] == "COMPLETED" and by_id["ok"]["result"] == 42
    assert by_id["bad"]["status"] == "QUARANTINED"
    assert by_id["bad"]["error"]["message"] == "negative input"

    failed_only = runner.invoke(cli, ["runs", "list", "--db", url, "--status", "QUARANTINED",
                                      "--json"])
    assert [r["run_id"] for r in json.loads(failed_only.output)] == ["bad"]

    shown = runner.invoke(cli, ["runs", "show", "bad", "--db", url, "--json"])
    steps = json.loads(shown.output)["steps"]
    assert [(s["position"], s["name"], s["status"]) for s in steps] == [
        ("1", "double", "failed")]
    assert steps[0]["error"]["type"] == "builtins:ValueError"

    table = runner.invoke(cli, ["runs", "show", "ok", "--db", url], env={"COLUMNS": "200"})
    assert table.exit_code == 0
    assert "double" in table.output and "completed" in table.output


def test_runs_list_never_cuts_a_run_id_in_a_narrow_terminal(tmp_path: Path) -> None:
    db = tmp_path / "g.db"

    async def seed_long() -> str:
        app = Garrison(f"sqlite:///{db}")

        @app.step()
        async def fail() -> None:
            raise ValueError("upstream returned 502 Bad Gateway for a fairly long order "
                             "note, as users write them, and then some more words")

        @app.workflow(name="order")
        async def order(ctx: Context) -> None:
            await fail()

        async with app:
            handle = await app.start(order)
            await asyncio.wait_for(asyncio.shield(_settle(handle)), 5)
        return handle.run_id

    run_id = asyncio.run(seed_long())
    for columns in ("80", "120"):
        listed = runner.invoke(cli, ["runs", "list", "--db", f"sqlite:///{db}"],
                               env={"COLUMNS": columns})
        assert listed.exit_code == 0, listed.output
        assert "…" not in "".join(line.split("│")[1] for line in listed.output.splitlines()
                                  if run_id[:6] in line)
        cells = "".join(line.split("│")[1].strip() for line in listed.output.splitlines()
                        if line.startswith("│") and line.split("│")[1].strip())
        assert run_id in cells, listed.output


def test_runs_list_orphaned_compares_with_the_apps_code(tmp_path: Path) -> None:
    db = tmp_path / "g.db"
    asyncio.run(seed(db))
    (tmp_path / "shop.py").write_text(APP_MODULE.format(db=db))
    os.chdir(tmp_path)
    result = runner.invoke(cli, ["runs", "list", "--app", "shop:app", "--orphaned", "--json"])
    assert result.exit_code == 0, result.output
    assert [r["run_id"] for r in json.loads(result.output)] == ["old"]
    refused = runner.invoke(cli, ["runs", "list", "--orphaned", "--db", f"sqlite:///{db}"])
    assert refused.exit_code == 2 and "add --app" in refused.output


def test_runs_show_unknown_run_and_missing_db_are_clear_errors(tmp_path: Path) -> None:
    missing = runner.invoke(cli, ["runs", "list", "--db", f"sqlite:///{tmp_path}/none.db"])
    assert missing.exit_code == 2 and "no such database" in missing.output
    db = tmp_path / "g.db"
    asyncio.run(seed(db))
    unknown = runner.invoke(cli, ["runs", "show", "ghost", "--db", f"sqlite:///{db}"])
    assert unknown.exit_code == 2 and "no run 'ghost'" in unknown.output


def test_worker_command_executes_runs_and_stops_on_sigterm(tmp_path: Path) -> None:
    db = tmp_path / "g.db"
    (tmp_path / "shop.py").write_text(APP_MODULE.format(db=db))
    worker = subprocess.Popen(
        [sys.executable, "-m", "garrison", "worker", "--app", "shop:app"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        assert worker.stdout is not None
        assert "Ctrl-C to stop" in worker.stdout.readline()

        async def client() -> int:
            app = Garrison(f"sqlite:///{db}", worker=False)

            @app.workflow(name="twice")  # registered to start it; executed by the worker
            async def twice(ctx: Context, x: int) -> int:
                raise AssertionError("a worker=False app never executes runs")

            async with app:
                handle = await app.start(twice, 5, run_id="via-worker")
                return int(await handle.result(timeout=10))

        assert asyncio.run(client()) == 10
        worker.send_signal(signal.SIGTERM)
        out, _ = worker.communicate(timeout=10)
        assert worker.returncode == 0, out
        assert "worker stopped" in out
    finally:
        if worker.poll() is None:
            worker.kill()


def test_demo_loses_no_run_across_a_sigkill(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "garrison", "demo", "--workflows", "--runs", "40", "--folder",
         str(tmp_path / "demo")],
        capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SIGKILL worker pid" in done.stdout
    lines = {line.split("│")[1].strip(): line.split("│")[2].strip()
             for line in done.stdout.splitlines() if line.count("│") == 3}
    assert lines["runs completed"] == "40"
    assert lines["runs lost"] == "0"


def test_agent_demo_loses_no_conversation_across_faults_and_a_sigkill(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "garrison", "demo", "--runs", "20", "--folder",
         str(tmp_path / "demo")],
        capture_output=True, text=True, timeout=180, env={**os.environ, "COLUMNS": "200"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SIGKILL worker pid" in done.stdout
    lines = {line.split("│")[1].strip(): line.split("│")[2].strip()
             for line in done.stdout.splitlines() if line.count("│") == 3}
    report = done.stdout
    assert lines["conversations completed"] == "20", report
    assert lines["conversations lost"] == "0", report
    assert int(lines["faults injected by the server"]) > 0, report
    # Over half the primary's calls fail: a call falls back after 3 failures (1 in 6).
    assert int(lines["conversations served by the fallback model"]) > 0, report
    # Only refunds in flight at the kill run twice.
    assert int(lines["refunds issued"]) - int(lines["refunds run twice (in flight at SIGKILL)"]
                                             ) == 20, report


def test_runs_redrive_sends_a_quarantined_run_back_and_refuses_others(tmp_path: Path) -> None:
    db = tmp_path / "g.db"
    asyncio.run(seed(db))  # "bad" ended QUARANTINED, "ok" COMPLETED
    url = f"sqlite:///{db}"

    refused = runner.invoke(cli, ["runs", "redrive", "ok", "--db", url])
    assert refused.exit_code == 2 and "only a QUARANTINED run" in refused.output
    done = runner.invoke(cli, ["runs", "redrive", "bad", "--db", url])
    assert done.exit_code == 0, done.output
    assert "redriven bad" in done.output
    listed = json.loads(runner.invoke(cli, ["runs", "list", "--db", url, "--json"]).output)
    assert {r["run_id"]: r["status"] for r in listed}["bad"] == "PENDING"


def test_runs_stats_reports_success_rates_from_the_store(tmp_path: Path) -> None:
    db = tmp_path / "g.db"
    asyncio.run(seed(db))
    shown = runner.invoke(cli, ["runs", "stats", "--db", f"sqlite:///{db}", "--json"])
    assert shown.exit_code == 0, shown.output
    figures = json.loads(shown.output)
    assert figures["workflows"]["twice"]["by_status"] == {"COMPLETED": 1, "QUARANTINED": 1}
    assert figures["workflows"]["twice"]["success_rate"] == 0.5
    assert figures["steps"]["double"]["failed"] == 1
    table = runner.invoke(cli, ["runs", "stats", "--db", f"sqlite:///{db}"],
                          env={"COLUMNS": "200"})
    assert table.exit_code == 0 and "50.0 %" in table.output


def test_runs_show_never_wraps_an_error_into_lines_of_its_own(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    forged = "run order-9 COMPLETED: refund approved"

    async def seed_failed() -> None:
        app = Garrison(f"sqlite:///{db}")

        @app.step()
        async def charge(note: str) -> None:
            raise ValueError(note)

        @app.workflow(name="order")
        async def order(ctx: Context, note: str) -> None:
            await charge(note)

        async with app:
            handle = await app.start(order, "bad card" + " " * 70 + forged, run_id="o-1")
            await asyncio.wait_for(asyncio.shield(_settle(handle)), 5)

    asyncio.run(seed_failed())
    shown = runner.invoke(cli, ["runs", "show", "o-1", "--db", f"sqlite:///{db}"],
                          env={"COLUMNS": "80"})
    assert shown.exit_code == 0, shown.output
    lines = shown.output.splitlines()
    assert not [line for line in lines if line.startswith(forged[:11])], lines  # no forgery
    assert any(line.startswith("builtins:ValueError: bad card") and line.endswith(forged)
               for line in lines)  # the message on one line, under the table
