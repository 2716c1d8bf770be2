"""`garrison worker --metrics-port`: Prometheus metrics served by a real worker process."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx2 as httpx
from typer.testing import CliRunner

from garrison import Context, Garrison
from garrison.cli import app as cli

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_worker_serves_prometheus_metrics_of_the_runs_it_executes(tmp_path: Path) -> None:
    db = tmp_path / "g.db"
    (tmp_path / "shop.py").write_text(APP_MODULE.format(db=db))
    port = _free_port()
    worker = subprocess.Popen(
        [sys.executable, "-m", "garrison", "worker", "--app", "shop:app",
         "--metrics-port", str(port)],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert worker.stdout is not None
        assert f"metrics on http://0.0.0.0:{port}/metrics" in worker.stdout.readline()
        assert "Ctrl-C to stop" in worker.stdout.readline()

        async def start_and_scrape() -> str:
            app = Garrison(f"sqlite:///{db}", worker=False)

            @app.workflow(name="twice")
            async def twice(ctx: Context, x: int) -> int:
                raise AssertionError("executed by the worker")

            async with app:
                assert await (await app.start(twice, 4, run_id="cli-run")).result(
                    timeout=20) == 8
            async with httpx.AsyncClient() as client:
                return (await client.get(f"http://127.0.0.1:{port}/metrics")).text

        text = asyncio.run(start_and_scrape())
        assert 'garrison_runs_finished_total{status="COMPLETED",workflow="twice"} 1.0' in text
        assert 'garrison_step_duration_seconds_count{status="completed",step="double"} 1.0' in text
        assert "cli-run" not in text
        worker.send_signal(signal.SIGTERM)
        out, _ = worker.communicate(timeout=10)
        assert worker.returncode == 0, out
    finally:
        if worker.poll() is None:
            worker.kill()


def test_a_port_out_of_range_is_a_usage_error_naming_the_option(tmp_path: Path) -> None:
    (tmp_path / "shop.py").write_text("from garrison import Garrison\n"
                                      f"app = Garrison('sqlite:///{tmp_path}/g.db')\n")
    result = CliRunner().invoke(cli, ["worker", "--app", "shop:app", "--metrics-port",
                                      "99999"], env={"PYTHONPATH": str(tmp_path)})
    assert result.exit_code == 2, result.output
    assert "--metrics-port" in result.output and "65535" in result.output


def test_port_zero_serves_on_the_port_the_system_picked_and_says_which(
        tmp_path: Path) -> None:
    (tmp_path / "shop.py").write_text(APP_MODULE.format(db=tmp_path / "g.db"))
    worker = subprocess.Popen(
        [sys.executable, "-m", "garrison", "worker", "--app", "shop:app",
         "--metrics-port", "0"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert worker.stdout is not None
        banner = worker.stdout.readline()
        port = int(banner.rsplit(":", 1)[1].split("/")[0])
        assert port > 0, banner
        assert "garrison_runs_started" in httpx.get(f"http://127.0.0.1:{port}/metrics").text
        worker.send_signal(signal.SIGTERM)
        worker.communicate(timeout=10)
    finally:
        if worker.poll() is None:
            worker.kill()
