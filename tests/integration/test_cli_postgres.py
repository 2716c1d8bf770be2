"""`garrison worker` processes as a fleet on PostgreSQL, and `garrison runs` reading it."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from typer.testing import CliRunner

from garrison import Context, Garrison, RunStatus
from garrison.cli import app as cli
from tests.pg import fresh_postgres_url

APP_MODULE = textwrap.dedent("""
    import asyncio
    from garrison import Context, Garrison

    app = Garrison({url!r})
    app.queue("q", concurrency=3)

    @app.step()
    async def double(x: int) -> int:
        await asyncio.sleep(x / 100)
        return x * 2

    @app.workflow(name="twice")
    async def twice(ctx: Context, x: int) -> int:
        return await double(x)
""")


def start_worker(folder: Path, *flags: str) -> subprocess.Popen[str]:
    worker = subprocess.Popen(
        [sys.executable, "-m", "garrison", "worker", "--app", "shop:app", *flags],
        cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    assert worker.stdout is not None
    banner = worker.stdout.readline()
    assert "Ctrl-C to stop" in banner, banner + worker.stdout.read()
    return worker


def stop(worker: subprocess.Popen[str]) -> str:
    worker.send_signal(signal.SIGTERM)
    out, _ = worker.communicate(timeout=30)
    assert worker.returncode == 0, out
    return out


async def enqueue(url: str, values: list[int]) -> list[str]:
    client = Garrison(url, worker=False)
    client.queue("q", concurrency=3)

    @client.workflow(name="twice")
    async def twice(ctx: Context, x: int) -> int:
        raise AssertionError("a worker=False app never executes runs")

    async with client:
        return [(await client.start(twice, v, queue="q", run_id=f"cli-{v}")).run_id
                for v in values]


async def outcomes(url: str, run_ids: list[str]) -> list[int]:
    async with Garrison(url, worker=False) as reader:
        return [int(await reader.handle(r).result(timeout=60)) for r in run_ids]


def test_postgres_worker_processes_share_a_queue_and_runs_cli_reads_it(
    tmp_path: Path,
) -> None:
    url = fresh_postgres_url()
    (tmp_path / "shop.py").write_text(APP_MODULE.format(url=url))
    workers = [start_worker(tmp_path, "--queues", "q", "--concurrency", "2")
               for _ in range(2)]
    try:
        ids = asyncio.run(enqueue(url, list(range(1, 13))))
        assert asyncio.run(outcomes(url, ids)) == [2 * v for v in range(1, 13)]
    finally:
        outs = [stop(w) for w in workers]
    assert all("worker stopped" in out for out in outs)

    listed = CliRunner().invoke(cli, ["runs", "list", "--db", url, "--json"])
    assert listed.exit_code == 0, listed.output
    runs = json.loads(listed.output)
    assert sorted(r["run_id"] for r in runs) == sorted(ids)
    assert {r["status"] for r in runs} == {RunStatus.COMPLETED.value}
    shown = CliRunner().invoke(cli, ["runs", "show", "cli-3", "--db", url, "--json"])
    assert shown.exit_code == 0, shown.output
    shown_run = json.loads(shown.output)
    assert (shown_run["result"], shown_run["queue"]) == (6, "q")
    pids = {str(w.pid) for w in workers}
    assert shown_run["owner"].split(":")[1] in pids  # the last worker that held it
    assert shown_run["steps"][0]["worker"].split(":")[1] in pids


def test_postgres_sigterm_lets_in_flight_runs_finish_within_the_grace(tmp_path: Path) -> None:
    url = fresh_postgres_url()
    (tmp_path / "shop.py").write_text(APP_MODULE.format(url=url))
    worker = start_worker(tmp_path, "--grace", "20")
    ids = asyncio.run(enqueue(url, [150]))  # a 1.5 s step

    async def wait_started() -> None:
        async with Garrison(url, worker=False) as reader:
            while (await reader.handle(ids[0]).record()).started_at is None:  # noqa: ASYNC110
                await asyncio.sleep(0.02)

    asyncio.run(wait_started())
    out = stop(worker)
    assert "in-flight runs get 20 s" in out
    assert asyncio.run(outcomes(url, ids)) == [300]  # finished before the worker exited


def _with_password(url: str) -> str:
    """`url` with a password (the test server trusts every login: it is not checked)."""
    scheme, rest = url.split("://", 1)
    user, host = rest.split("@", 1)
    return f"{scheme}://{user}:hunter2-SECRET@{host}&password=query-SECRET"


def test_the_store_password_is_in_no_message(tmp_path: Path) -> None:
    url = _with_password(fresh_postgres_url())
    (tmp_path / "shop.py").write_text(APP_MODULE.format(url=url))
    worker = subprocess.Popen(
        [sys.executable, "-m", "garrison", "worker", "--app", "shop:app"], cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert worker.stdout is not None
    banner = worker.stdout.readline()  # "worker ... on <store> ..."
    out = banner + stop(worker)
    shown = CliRunner().invoke(cli, ["runs", "show", "nosuch", "--db", url])
    replayed = CliRunner().invoke(cli, ["runs", "replay", "nosuch", "--db", url,
                                        "--app", "shop:app", "--json"],
                                  env={"PYTHONPATH": str(tmp_path)})

    async def record_error() -> str:
        async with Garrison(url, worker=False) as client:
            try:
                await client.handle("nosuch").record()
            except Exception as exc:  # RunNotFoundError
                return str(exc)
        return ""

    error = asyncio.run(record_error())
    assert "worker" in out and shown.exit_code == 2 and "no run 'nosuch'" in error
    for text in (out, shown.output, replayed.output, error):
        assert "SECRET" not in text, text
    assert "schema=" in error  # which store it is, still
