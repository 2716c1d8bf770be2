"""Metrics where a run does not start the usual way, and a worker that has run nothing:
a fork executed by a worker is a started run, queue depth is read from the first
scrape, and the CLI's --json shows stored values masked; read-only commands never
create a PostgreSQL schema."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import psycopg
import pytest
from prometheus_client import CollectorRegistry
from typer.testing import CliRunner

from garrison import Context, Garrison, RunStatus, WorkflowCancelled
from garrison.cli import app as cli
from garrison.errors import ConfigurationError
from garrison.observability import instrument
from garrison.store import open_store
from tests.integration.observability.conftest import Telemetry
from tests.pg import PG_URL, fresh_postgres_url


def _twice(app: Garrison) -> object:
    @app.step()
    async def double(x: int) -> int:
        return x * 2

    @app.workflow(name="twice")
    async def twice(ctx: Context, x: int) -> int:
        return await double(await double(x))

    return twice


def _sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


async def test_a_fork_executed_by_a_worker_is_counted_as_started(
        db_url: str, telemetry: Telemetry) -> None:
    client = Garrison(db_url, worker=False)
    twice = _twice(client)
    worker = Garrison(db_url)
    _twice(worker)
    registry = telemetry.attach(worker).registry
    async with worker, client:
        await (await client.start(twice, 1, run_id="orig")).result(timeout=10)
        fork = await client.fork("orig", at_step=1, run_id="fork")  # claimed by the worker
        assert await fork.result(timeout=10) == 4
    assert _sample(registry, "garrison_runs_started_total", workflow="twice") == 2
    assert _sample(registry, "garrison_runs_resumed_total", workflow="twice") == 0
    assert _sample(registry, "garrison_runs_finished_total", workflow="twice",
                   status="COMPLETED") == 2
    assert _sample(registry, "garrison_queue_wait_seconds_count", queue="default") == 2
    (segment,) = [s for s in telemetry.named("invoke_workflow twice")
                  if dict(s.attributes or {})["garrison.run_id"] == "fork"]
    assert dict(segment.attributes or {})["garrison.run.resumed"] is False


async def test_queue_depth_is_read_before_the_worker_has_run_anything(
        tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/g.db"
    client = Garrison(url, worker=False)
    client.queue("emails")
    twice = _twice(client)
    worker = Garrison(url, queues=["default"])
    worker.queue("emails")
    _twice(worker)
    registry = instrument(worker).registry
    async with worker, client:
        for i in range(3):
            await client.start(twice, i, queue="emails", run_id=f"e{i}")
        # a scrape comes from the metrics server's thread, never the loop's
        depth = await asyncio.to_thread(_sample, registry, "garrison_queue_depth",
                                        queue="emails")
        idle = await asyncio.to_thread(_sample, registry, "garrison_queue_depth",
                                       queue="default")
    assert (depth, idle) == (3, 0)
    assert registry.get_sample_value("garrison_runs_started_total",
                                     {"workflow": "twice"}) is None  # nothing ran here


async def test_runs_show_and_list_json_mask_secrets_in_inputs_results_and_outputs(
        tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    app = Garrison(f"sqlite:///{db}")

    @app.step()
    async def connect(dsn: str) -> dict[str, str]:
        return {"token": "tok-123", "dsn": dsn}

    @app.workflow(name="crm")
    async def crm(ctx: Context, dsn: str, api_key: str) -> dict[str, str]:
        return await connect(dsn)

    async with app:
        await (await app.start(crm, "postgresql://app:hunter2@db/prod",
                               api_key="sk-live-SECRET", run_id="c")).result(timeout=10)
    env = {"GARRISON_DB": f"sqlite:///{db}"}
    shown = await asyncio.to_thread(CliRunner().invoke, cli, ["runs", "show", "c", "--json"],
                                    env=env)
    listed = await asyncio.to_thread(CliRunner().invoke, cli, ["runs", "list", "--json"],
                                     env=env)
    for result in (shown, listed):
        assert result.exit_code == 0, result.output
        for secret in ("hunter2", "sk-live-SECRET", "tok-123"):
            assert secret not in result.stdout
    body = json.loads(shown.stdout)
    assert body["inputs"]["kwargs"]["api_key"] == "***"
    assert body["inputs"]["args"] == ["postgresql://app:***@db/prod"]
    assert body["result"] == {"token": "***", "dsn": "***"}
    assert body["steps"][0]["output"]["token"] == "***"


async def test_a_read_only_open_of_a_missing_postgres_schema_creates_nothing() -> None:
    url = fresh_postgres_url()  # a schema name nobody made
    schema = url.rsplit("schema=", 1)[1]
    store = open_store(url, create=False)
    with pytest.raises(ConfigurationError, match=rf"schema '{schema}' holds no Garrison "
                                                 r"tables; check the URL's \?schema="):
        await store.open()
    with psycopg.connect(PG_URL) as conn:
        assert conn.execute("SELECT 1 FROM information_schema.schemata WHERE schema_name = %s",
                            (schema,)).fetchone() is None


async def test_a_run_cancelled_while_parked_or_queued_is_counted_and_traced_with_its_workflow(
        tmp_path: Path, telemetry: Telemetry) -> None:
    app = Garrison(f"sqlite:///{tmp_path}/g.db", queues=["default"])
    app.queue("later")

    @app.workflow(name="approval")
    async def approval(ctx: Context) -> None:
        await ctx.wait_for("approved")

    registry = telemetry.attach(app).registry
    async with app:
        parked = await app.start(approval, run_id="parked")
        queued = await app.start(approval, run_id="queued", queue="later")  # not served here
        while await parked.status() is not RunStatus.WAITING:  # noqa: ASYNC110  # the store
            await asyncio.sleep(0.01)
        await app.cancel("parked")
        await app.cancel("queued")
        for handle in (parked, queued):
            with pytest.raises(WorkflowCancelled):
                await handle.result(timeout=10)
    assert _sample(registry, "garrison_runs_finished_total", workflow="approval",
                   status="CANCELLED") == 2
    assert registry.get_sample_value("garrison_runs_finished_total",
                                     {"workflow": "unknown", "status": "CANCELLED"}) is None
    ends = {dict(s.attributes or {})["garrison.run_id"]: s
            for s in telemetry.named("invoke_workflow approval")
            if dict(s.attributes or {}).get("garrison.run.outcome") == "cancelled"}
    assert set(ends) == {"parked", "queued"}
    (enqueue,) = [s for s in telemetry.named("start_workflow approval")
                  if dict(s.attributes or {})["garrison.run_id"] == "queued"]
    assert ends["queued"].parent is not None
    assert ends["queued"].parent.span_id == enqueue.context.span_id  # its own trace
