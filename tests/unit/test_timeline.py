"""`garrison runs show`: tokens, cost, serving model and worker per step, where a run
resumed on another worker, and totals (real agent runs on a tmp SQLite file)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from garrison import Context, Garrison, RunStatus
from garrison.agents import Agent, AgentResult, Price, PriceTable, ScriptedModel, tool
from garrison.cli import app as cli
from garrison.engine import EngineHooks

from ._agents_support import response
from ._support import ParkWatch

runner = CliRunner()
PRICES = PriceTable({"priced": Price(2.0, 8.0)}, defaults=False)


def lookup_agent() -> Agent:
    @tool
    def lookup_order(order_id: str) -> str:
        """Look an order up."""
        return f"order {order_id} shipped"

    model = ScriptedModel([
        response(calls=[("c1", "lookup_order", {"order_id": "7"})], input_tokens=1200,
                 output_tokens=30),
        response("Order 7 has shipped.", input_tokens=1500, output_tokens=12),
    ], name="priced")
    return Agent("support", model=model, tools=[lookup_order], prices=PRICES)


def approval_agent(replies: list[Any]) -> Agent:
    @tool(requires_approval=True, side_effects=True)
    def refund_order(amount_cents: int) -> str:
        """Refund."""
        return f"refunded {amount_cents}"

    return Agent("refunds", model=ScriptedModel(replies, name="priced"),
                 tools=[refund_order], prices=PRICES)


def agent_app(db_url: str, agent: Agent, *, worker_id: str,
              hooks: list[EngineHooks] | None = None) -> Garrison:
    app = Garrison(db_url, worker_id=worker_id, hooks=hooks or [])
    app.add_agent(agent)
    return app


def show(db: Path, run_id: str, *extra: str, columns: int = 100) -> str:
    result = runner.invoke(cli, ["runs", "show", run_id, "--db", f"sqlite:///{db}", *extra],
                           env={"COLUMNS": str(columns)})
    assert result.exit_code == 0, result.output
    return result.output


def test_agent_run_timeline_shows_tokens_cost_model_worker_and_totals(tmp_path: Path) -> None:
    db = tmp_path / "g.db"
    agent = lookup_agent()

    async def run() -> AgentResult:
        async with agent_app(f"sqlite:///{db}", agent, worker_id="host-a:1:aa") as app:
            return await agent.run(app, "where is order 7?", run_id="conv")

    result = asyncio.run(run())

    body = json.loads(show(db, "conv", "--json"))
    models = [s for s in body["steps"] if s["name"] == "agent.support.model"]
    assert [(s["input_tokens"], s["output_tokens"]) for s in models] == [(1200, 30), (1500, 12)]
    assert all(s["served_by"] == agent.models[0].name and s["model"] == "priced"
               for s in models)
    assert sum(s["cost_usd"] for s in models) == result.cost_usd > 0
    tool_step = next(s for s in body["steps"] if s["name"] == "tool.lookup_order")
    assert tool_step["input_tokens"] is None and tool_step["cost_usd"] is None
    assert {s["worker"] for s in body["steps"]} == {"host-a:1:aa"}
    assert not any(s["resumed"] for s in body["steps"])
    totals = body["totals"]
    assert totals["input_tokens"] == result.usage.input_tokens == 2700
    assert totals["output_tokens"] == result.usage.output_tokens == 42
    assert totals["cost_usd"] == result.cost_usd
    assert totals["model_calls"] == 2 and totals["steps"] == len(body["steps"])
    assert totals["attempts"] == sum(s["attempts"] for s in body["steps"])
    assert totals["workers"] == ["host-a:1:aa"] and totals["resumes"] == 0

    table = show(db, "conv")
    assert max(len(line) for line in table.splitlines()) <= 100
    assert "1,200/30" in table and "1,500/12" in table and "2,700/42" in table
    assert f"${result.cost_usd:.4f}" in table
    assert "w1 = host-a:1:aa" in table and "resumed" not in table


def test_run_resumed_by_a_second_app_is_marked_in_the_timeline(tmp_path: Path) -> None:
    db = tmp_path / "g.db"
    first_call = response(calls=[("c1", "refund_order", {"amount_cents": 500})],
                          input_tokens=800, output_tokens=20)
    done = response("Refunded.", input_tokens=900, output_tokens=5)

    async def park_on_first() -> None:
        watch = ParkWatch()
        agent = approval_agent([first_call])
        async with agent_app(f"sqlite:///{db}", agent, hooks=[watch],
                             worker_id="first") as app:
            handle = await agent.start(app, "refund me", run_id="ap")
            await watch.parked("ap")
            assert await handle.status() is RunStatus.WAITING

    async def finish_on_second() -> AgentResult:
        agent = approval_agent([done])
        async with agent_app(f"sqlite:///{db}", agent, worker_id="second") as app:
            await app.send("ap", "approval", True)
            return await agent.result(app.handle("ap"))

    asyncio.run(park_on_first())
    result = asyncio.run(finish_on_second())
    assert result.output == "Refunded."

    body = json.loads(show(db, "ap", "--json"))
    steps = body["steps"]
    assert steps[0]["worker"] == "first" and not steps[0]["resumed"]
    resumed = [s for s in steps if s["resumed"]]
    assert len(resumed) == 1 and resumed[0]["worker"] == "second"
    after = steps[steps.index(resumed[0]):]
    assert all(s["worker"] == "second" for s in after)
    assert body["totals"]["workers"] == ["first", "second"]
    assert body["totals"]["resumes"] == 1
    assert (body["totals"]["input_tokens"], body["totals"]["output_tokens"]) == (1700, 25)

    table = show(db, "ap")
    assert max(len(line) for line in table.splitlines()) <= 100
    assert "resumed on w2" in table and "resumed 1x" in table
    assert "w1 = first" in table and "w2 = second" in table


def test_timeline_escapes_markup_in_step_names_and_errors(tmp_path: Path) -> None:
    db = tmp_path / "g.db"

    async def seed() -> None:
        app = Garrison(f"sqlite:///{db}")

        @app.step(name="fetch[red]")
        async def fetch() -> None:
            raise ValueError("bad [bold]input[/bold]")

        @app.workflow(name="wf")
        async def wf(ctx: Context) -> None:
            await fetch()

        async with app:
            handle = await app.start(wf, run_id="m")
            with contextlib.suppress(Exception):
                await handle.result(timeout=5)

    asyncio.run(seed())
    table = show(db, "m", columns=200)
    assert "fetch[red]" in table and "bad [bold]input[/bold]" in table


def test_runs_show_and_list_print_user_values_as_text(tmp_path: Path) -> None:
    db = tmp_path / "g.db"

    async def seed() -> None:
        app = Garrison(f"sqlite:///{db}")

        @app.step(name="boom")
        async def boom(message: str) -> None:
            raise ValueError(message)

        @app.workflow(name="wf[/]")
        async def wf(ctx: Context, message: str) -> None:
            await boom(message)

        async with app:
            for run_id, message in (("[/]", "bad range [/] in config"),
                                    ("ansi", "fine\x1b[2J\x1b[31mFAKE\rline")):
                with contextlib.suppress(Exception):
                    await (await app.start(wf, message, run_id=run_id)).result(timeout=5)

    asyncio.run(seed())
    shown = show(db, "[/]", columns=200)
    assert "run [/]: wf[/] v1" in shown and "ValueError: bad range [/] in config" in shown
    ansi = show(db, "ansi", columns=200)
    assert "\x1b" not in ansi and "\r" not in ansi  # a message cannot drive the terminal
    assert "fine\\x1b[2J\\x1b[31mFAKE\\rline" in ansi
    listed = runner.invoke(cli, ["runs", "list", "--db", f"sqlite:///{db}"],
                           env={"COLUMNS": "250"})
    assert listed.exit_code == 0, listed.output
    assert "[/]" in listed.output and "wf[/]" in listed.output and "\x1b" not in listed.output


def test_a_value_ending_in_a_backslash_prints_as_written_before_more_text() -> None:
    from rich.console import Console

    from garrison.cli._console import text

    console = Console(record=True, width=80)
    console.print(f"run {text('a' + chr(92))} then [red]{text('[b]')}[/]")
    assert console.export_text().strip() == "run a" + chr(92) + " then [b]"


def test_secrets_in_errors_are_masked_in_show_list_and_json(tmp_path: Path) -> None:
    db = tmp_path / "g.db"

    async def seed() -> None:
        app = Garrison(f"sqlite:///{db}")

        @app.step(name="connect")
        async def connect() -> None:
            raise ValueError("connect to postgresql://app:hunter2@db/prod failed\n"
                             "│ fake line; headers Authorization: Bearer sk-live-12345678")

        @app.workflow(name="wf")
        async def wf(ctx: Context) -> None:
            await connect()

        async with app:
            with contextlib.suppress(Exception):
                await (await app.start(wf, run_id="s")).result(timeout=5)

    asyncio.run(seed())
    shown = show(db, "s", columns=200)
    listed = runner.invoke(cli, ["runs", "list", "--db", f"sqlite:///{db}"],
                           env={"COLUMNS": "250"}).output
    as_json = show(db, "s", "--json")
    for output in (shown, listed, as_json):
        assert "hunter2" not in output and "sk-live" not in output
    assert "postgresql://app:***@db/prod" in shown
    run = json.loads(as_json)
    assert "app:***@db" in run["error"]["message"] and "Bearer ***" in run["error"]["message"]
    assert "app:***@db" in run["steps"][0]["error"]["message"]
    # the traceback's lines are marked, so the message's second line reads as its own
    lines = shown.splitlines()
    start = next(i for i, line in enumerate(lines) if "Traceback (most recent" in line)
    assert len(lines) - start > 5 and all(line.startswith("│ ") for line in lines[start:])


def test_a_fork_shows_where_it_came_from_and_where_it_went_live(tmp_path: Path) -> None:
    db = tmp_path / "g.db"

    async def seed() -> None:
        app = Garrison(f"sqlite:///{db}")

        @app.step(name="double")
        async def double(x: int) -> int:
            return x * 2

        @app.workflow(name="thrice")
        async def thrice(ctx: Context, x: int) -> int:
            return await double(await double(await double(x)))

        async with app:
            await (await app.start(thrice, 1, run_id="source")).result(timeout=5)
            await (await app.fork("source", at_step=2, run_id="branch")).result(timeout=5)

    asyncio.run(seed())
    shown = show(db, "branch", columns=200)
    rows = shown.splitlines()
    live = next(i for i, line in enumerate(rows) if "live from here (reused up to 2)" in line)
    assert rows[live - 1].split()[0] == "2" and rows[live + 1].split()[0] == "3"
    assert "forked from source at position 2" in " ".join(shown.split())
    run = json.loads(show(db, "branch", "--json"))
    assert (run["forked_from"], run["forked_at"]) == ("source", 2)
    assert "forked" not in show(db, "source", columns=200)


def test_a_failed_model_call_fits_100_columns_with_nothing_cut(tmp_path: Path) -> None:
    from garrison.errors import ProviderUnavailable
    from garrison.resilience import Retry

    db = tmp_path / "g.db"
    down = ProviderUnavailable("primary down", provider="test", model="p", status=503,
                               kind="server", retryable=True, retry_after=None)
    agent = Agent("support", model=ScriptedModel([down], name="primary-m"),
                  fallback_models=[ScriptedModel(["ok"], name="backup-m")],
                  retry=Retry(max_attempts=1))

    async def seed() -> None:
        app = agent_app(f"sqlite:///{db}", agent, worker_id="w")
        async with app:
            await agent.run(app, "hi", run_id="conv")

    asyncio.run(seed())
    for columns in (100, 120):  # docs/observability-logs.md: fits a 100-column terminal
        shown = show(db, "conv", columns=columns)
        assert all(len(line) <= columns for line in shown.splitlines())
        lines = shown.splitlines()
        assert "ProviderUnavailable:primarydown" in _column(lines, "error").replace(" ", "")
        assert "test:backup-m" in _column(lines, "model", "error")
        assert "agent.support.model" in _column(lines, "step", "status")


def _column(lines: list[str], name: str, end: str | None = None) -> str:
    """A table column's folded cells, read back as one text (the total row left out)."""
    header = next(line for line in lines if line.lstrip().startswith("pos"))
    start = header.index(name)
    stop = header.index(end) if end else None
    return "".join(line[start:stop].strip() for line in lines[lines.index(header) + 2:]
                   if not line.lstrip().startswith("total"))
