"""`configure_logging`: run context on every line, escaping, masked secrets, console
mode, OpenTelemetry ids, and debug events filtered at info (real runs on tmp SQLite)."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from opentelemetry.sdk.trace import TracerProvider

from garrison import Context, Garrison
from garrison.observability import MASK, configure_logging, is_secret_key

log = structlog.get_logger("tests.logging")


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


def lines(buffer: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


async def test_lines_inside_a_step_carry_run_step_position_attempt_and_worker(
        db_url: str) -> None:
    out = io.StringIO()
    configure_logging(json=True, file=out)
    app = Garrison(db_url, worker_id="w-test")

    @app.step()
    async def charge(amount: int) -> int:
        log.info("charge.sent", amount=amount)
        return amount

    @app.workflow(name="order")
    async def order(ctx: Context, amount: int) -> int:
        log.info("order.started")
        return await charge(amount)

    async with app:
        assert await (await app.start(order, 5, run_id="r1")).result(timeout=5) == 5
    log.info("after.run")

    by_event = {line["event"]: line for line in lines(out)}
    sent = by_event["charge.sent"]
    assert sent["run_id"] == "r1" and sent["worker"] == "w-test"
    assert (sent["step"], sent["position"], sent["attempt"]) == ("charge", "1", 1)
    assert sent["amount"] == 5 and sent["level"] == "info" and "timestamp" in sent
    started = by_event["order.started"]
    assert started["run_id"] == "r1" and started["worker"] == "w-test"
    assert "step" not in started
    assert "run_id" not in by_event["after.run"]


def test_explicit_and_bound_fields_win_over_the_run_context() -> None:
    out = io.StringIO()
    configure_logging(json=True, file=out)
    structlog.contextvars.bind_contextvars(worker="bound")
    log.info("x", run_id="given")
    assert lines(out)[0]["worker"] == "bound" and lines(out)[0]["run_id"] == "given"


def test_newlines_and_ansi_in_user_values_are_escaped_in_console_mode() -> None:
    out = io.StringIO()
    configure_logging(json=False, file=out)
    log.info("user.said", text="hi\nFAKE [error] line\x1b[31mred\x1b[0m\r\x07",
             nested={"k": ["a\nb"]}, **{"bad\nkey": 1})
    text = out.getvalue()
    assert text.count("\n") == 1 and "\x1b" not in text and "\x07" not in text
    assert "text='hi\\nFAKE [error] line\\x1b[31mred\\x1b[0m\\r\\x07'" in text
    assert "nested={'k': ['a\\nb']}" in text
    assert "user.said" in text and "[info" in text
    assert "bad\\nkey=1" in text


def test_console_mode_escapes_a_value_it_would_print_unquoted_and_the_event() -> None:
    out = io.StringIO()
    configure_logging(json=False, file=out)
    log.info("evil\nevent", word="x\x1b[2Jy", plain="ok")
    text = out.getvalue()
    assert "\x1b" not in text and text.count("\n") == 1
    assert "evil\\nevent" in text and "word='x\\x1b[2Jy'" in text and "plain=ok" in text


def test_json_mode_strips_ansi_and_control_chars_and_keeps_one_line_a_record() -> None:
    out = io.StringIO()
    configure_logging(json=True, file=out)
    log.info("user.said", text="a\nb\x1b[31mred\x1b[0m\x00\u2028end",
             items=["\x1b]0;title\x07x"])
    assert out.getvalue().count("\n") == 1
    line = lines(out)[0]
    assert line["text"] == "a\nbredend"
    assert line["items"] == ["x"]


def test_json_mode_keeps_a_traceback_readable() -> None:
    out = io.StringIO()
    configure_logging(json=True, file=out)
    try:
        raise ValueError("boom \x1b[1m")
    except ValueError:
        log.exception("step.crashed")
    line = lines(out)[0]
    assert "ValueError: boom" in line["exception"] and "\n" in line["exception"]
    assert "\x1b" not in line["exception"]


def test_secret_looking_fields_are_masked_and_token_counts_kept() -> None:
    out = io.StringIO()
    configure_logging(json=True, file=out)
    log.info("call", api_key="sk-1", Authorization="Bearer x", password="p",
             client_secret="s", access_token="t", token="t2", **{"x-api-key": "k"},
             headers={"authorization": "Bearer y", "accept": "json"},
             input_tokens=10, output_tokens=2, max_tokens=100, tokens_left=5,
             refresh_token=None)
    line = lines(out)[0]
    for key in ("api_key", "Authorization", "password", "client_secret", "access_token",
                "token", "x-api-key"):
        assert line[key] == MASK, key
    assert line["headers"] == {"authorization": MASK, "accept": "json"}
    assert (line["input_tokens"], line["output_tokens"], line["max_tokens"],
            line["tokens_left"]) == (10, 2, 100, 5)
    assert line["refresh_token"] is None
    assert "sk-1" not in out.getvalue() and "Bearer" not in out.getvalue()
    assert not is_secret_key("usage") and is_secret_key("SESSION_COOKIE")


def test_trace_and_span_ids_come_from_the_recording_otel_span() -> None:
    out = io.StringIO()
    configure_logging(json=True, file=out)
    tracer = TracerProvider().get_tracer("tests")
    with tracer.start_as_current_span("work") as span:
        log.info("inside")
        context = span.get_span_context()
    log.info("outside")
    inside, outside = lines(out)
    assert inside["trace_id"] == format(context.trace_id, "032x")
    assert inside["span_id"] == format(context.span_id, "016x")
    assert "trace_id" not in outside


async def test_at_info_the_engines_debug_events_are_filtered_before_any_processor(
        db_url: str) -> None:
    out = io.StringIO()
    configure_logging(json=True, level="info", file=out)
    assert not structlog.get_logger().is_enabled_for(logging.DEBUG)
    log.debug("hidden")
    app = Garrison(db_url)

    @app.workflow(name="noop")
    async def noop(ctx: Context) -> int:
        return 1

    async with app:
        assert await (await app.start(noop)).result(timeout=5) == 1
    assert all(line["level"] != "debug" for line in lines(out))

    debug_out = io.StringIO()
    configure_logging(json=True, level="debug", file=debug_out)
    log.debug("shown")
    assert lines(debug_out)[0]["event"] == "shown"


def test_auto_mode_picks_json_for_a_non_terminal() -> None:
    out = io.StringIO()
    configure_logging(file=out)
    log.info("auto")
    assert lines(out)[0]["event"] == "auto"


def test_worker_refuses_an_unknown_log_level_and_offers_the_formats() -> None:
    from typer.testing import CliRunner

    from garrison.cli import app as cli

    runner = CliRunner()
    refused = runner.invoke(cli, ["worker", "--app", "shop:app", "--log-level", "loud"])
    assert refused.exit_code == 2 and "--log-level loud" in refused.output
    bad_format = runner.invoke(cli, ["worker", "--app", "shop:app", "--log-format", "xml"])
    assert bad_format.exit_code == 2
