"""`configure_logging`: run context on every line, escaping, masked secrets, console
mode, OpenTelemetry ids, debug events filtered at info, and standard-library `logging`
records through the same processors (real runs on tmp SQLite)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

from garrison import Context, Garrison
from garrison.observability import MASK, configure_logging, is_secret_key, mask_text

log = structlog.get_logger("tests.logging")


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    configure_logging(stdlib=False)  # removes the root handler a test's call installed
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    root.setLevel(level)
    assert [h for h in root.handlers if h not in handlers and _is_ours(h)] == []


def _is_ours(handler: logging.Handler) -> bool:
    return type(handler).__module__ == "garrison.observability._logging"


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


def test_a_console_traceback_is_marked_so_its_message_cannot_forge_a_line() -> None:
    out = io.StringIO()
    configure_logging(json=False, file=out)
    try:
        raise ValueError("boom\n2026-01-01 00:00:00 [info     ] forged.line")
    except ValueError:
        log.exception("step.crashed")
    lines_ = out.getvalue().splitlines()
    assert "step.crashed" in lines_[0]
    assert all(line.startswith("│ ") for line in lines_[1:] if line), lines_
    assert any("forged.line" in line for line in lines_[1:])
    assert any("Traceback (most recent call last)" in line for line in lines_[1:])


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


class _Note:
    """An application object whose repr and str carry what a user wrote."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"Note({self.text})"

    __str__ = __repr__


_FORGED = "x\n2026-01-01T00:00:00Z [info     ] payment.approved\x1b]0;t\x07\x1b[31m\u202e"


def _nested(depth: int, leaf: dict[str, Any]) -> dict[str, Any]:
    for _ in range(depth):
        leaf = {"level": leaf}
    return leaf


def test_objects_cannot_forge_a_line_in_either_mode() -> None:
    out = io.StringIO()
    configure_logging(json=False, file=out)
    log.info("order.received", order=_Note(_FORGED), items=[_Note(_FORGED)])
    text = out.getvalue()
    assert text.count("\n") == 1 and "\x1b" not in text and "\u202e" not in text
    assert "order=Note(x\\n2026" in text
    out = io.StringIO()
    configure_logging(json=True, file=out)
    log.info("order.received", order=_Note(_FORGED), items={"a": [_Note(_FORGED)]})
    line = lines(out)[0]
    assert out.getvalue().count("\n") == 1
    assert line["order"] == "Note(x\n2026-01-01T00:00:00Z [info     ] payment.approved)"
    assert line["items"] == {"a": [line["order"]]}


@pytest.mark.parametrize("json_mode", [True, False])
def test_deeply_nested_values_are_masked_and_cleaned(json_mode: bool) -> None:
    out = io.StringIO()
    configure_logging(json=json_mode, file=out)
    log.info("webhook", body=_nested(6, {"note": "\x1b[2Jcleared", "password": "hunter2"}),
             deeper=_nested(40, {"password": "hunter3", "note": "\x1b[2J"}))
    text = out.getvalue()
    assert "hunter2" not in text and "hunter3" not in text and "\x1b" not in text
    if json_mode:
        leaf = lines(out)[0]["body"]
        for _ in range(6):
            leaf = leaf["level"]
        assert leaf == {"note": "cleared", "password": MASK}


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


def test_key_and_credential_names_and_passwords_in_urls_are_masked() -> None:
    out = io.StringIO()
    configure_logging(json=True, file=out)
    log.info("connect", private_key="-----BEGIN KEY-----", credentials="user:pw",
             bearer="b", dsn="postgresql://u:hunter2@h/db", credential_count=None,
             target="connecting to postgresql://app:hunter2@db:5432/prod?schema=x now",
             plain="https://example.com/a:b@c", nested={"url": "redis://:hunter2@cache"})
    line = lines(out)[0]
    for key in ("private_key", "credentials", "bearer", "dsn"):
        assert line[key] == MASK, key
    assert line["target"] == "connecting to postgresql://app:***@db:5432/prod?schema=x now"
    assert line["nested"] == {"url": "redis://:***@cache"}
    assert line["plain"] == "https://example.com/a:b@c"  # a path, not a password
    assert "hunter2" not in out.getvalue()


def test_secrets_written_inline_in_strings_are_masked() -> None:
    out = io.StringIO()
    configure_logging(json=True, file=out)
    log.info("connect", url="postgresql://h/db?user=app&password=hunter1",
             conn="host=db user=app password=hunter2 sslmode=require",
             err="GET https://api.x.com/v1?api_key=sk-live-3&q=1 failed",
             hdr="Authorization: Bearer sk-live-4", dump='{"client_secret": "s e c"}',
             auth=("user", "pw5"), pwd="pw6", passphrase="pw7", oauth_provider="github")
    line = lines(out)[0]
    assert line["url"] == "postgresql://h/db?user=app&password=***"
    assert line["conn"] == "host=db user=app password=*** sslmode=require"
    assert line["err"] == "GET https://api.x.com/v1?api_key=***&q=1 failed"
    assert line["hdr"] == "Authorization: Bearer ***"
    assert line["dump"] == '{"client_secret": "***"}'
    assert (line["auth"], line["pwd"], line["passphrase"]) == (MASK, MASK, MASK)
    assert line["oauth_provider"] == "github"  # `auth` is masked as a whole key only
    for secret in ("hunter", "sk-live", "s e c", "pw5", "pw6", "pw7"):
        assert secret not in out.getvalue(), secret


@pytest.mark.parametrize("kept", [
    "max_tokens=5 input_tokens: 7 tokens=3", "bearer of bad news", "Basic setup done",
    "at 12:30:01 the step ended", "secretary=Ann", "https://example.com/a?page=2"])
def test_text_that_only_looks_like_a_secret_is_kept(kept: str) -> None:
    assert mask_text(kept) == kept


@pytest.mark.parametrize("json_mode", [True, False])
def test_a_url_password_in_an_exception_is_masked(json_mode: bool) -> None:
    out = io.StringIO()
    configure_logging(json=json_mode, file=out)
    try:
        raise RuntimeError("GET https://app:hun@ter2@api.example/v1 failed")
    except RuntimeError:
        log.exception("call.failed")
        logging.getLogger("lib").exception("lib failed")
    assert "ter2" not in out.getvalue() and "https://app:***@api.example/v1" in out.getvalue()


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


def test_a_sampled_out_span_still_gives_its_trace_id() -> None:
    # Its context still goes out on outbound calls (traceparent): a log line must tell
    # which trace it belongs to, whether this process records it or not.
    out = io.StringIO()
    configure_logging(json=True, file=out)
    tracer = TracerProvider(sampler=ALWAYS_OFF).get_tracer("tests")
    with tracer.start_as_current_span("work") as span:
        assert not span.is_recording()
        log.info("inside")
        context = span.get_span_context()
    assert lines(out)[0]["trace_id"] == format(context.trace_id, "032x")


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


stdlib = logging.getLogger("tests.stdlib")


def test_a_stdlib_record_outside_runs_has_logger_level_timestamp_and_extras() -> None:
    out = io.StringIO()
    configure_logging(json=True, file=out)
    logging.getLogger("httpx").info("HTTP Request: %s %s", "POST", "https://api.x/v1")
    stdlib.warning("stock low", extra={"sku": "A-1", "left": 2})
    request, low = lines(out)
    assert request["event"] == "HTTP Request: POST https://api.x/v1"
    assert request["logger"] == "httpx" and request["level"] == "info"
    assert "timestamp" in request and "run_id" not in request and "step" not in request
    assert (low["event"], low["level"], low["sku"], low["left"]) == (
        "stock low", "warning", "A-1", 2)
    # Only the documented fields: no LogRecord internals, no "message" that an earlier
    # handler (pytest's capture here) left on the record.
    assert set(low) == {"event", "logger", "level", "timestamp", "sku", "left"}


async def test_a_stdlib_record_in_a_step_body_carries_the_run_context(db_url: str) -> None:
    out = io.StringIO()
    configure_logging(json=True, file=out)
    app = Garrison(db_url, worker_id="w-test")

    @app.step()
    async def charge(amount: int) -> int:
        stdlib.info("charging %d", amount)
        return amount

    @app.step()
    def receipt(amount: int) -> str:  # a sync step: runs in the worker's thread pool
        stdlib.info("receipt for %d", amount)
        return "ok"

    @app.workflow(name="order")
    async def order(ctx: Context, amount: int) -> str:
        stdlib.info("order started")
        await charge(amount)
        return await receipt(amount)

    async with app:
        assert await (await app.start(order, 5, run_id="r1")).result(timeout=5) == "ok"
    stdlib.info("after the run")

    by_event = {line["event"]: line for line in lines(out) if line.get("logger") == stdlib.name}
    charging = by_event["charging 5"]
    assert (charging["run_id"], charging["worker"]) == ("r1", "w-test")
    assert (charging["step"], charging["position"], charging["attempt"]) == ("charge", "1", 1)
    in_thread = by_event["receipt for 5"]
    assert (in_thread["run_id"], in_thread["step"], in_thread["position"]) == (
        "r1", "receipt", "2")
    started = by_event["order started"]
    assert started["run_id"] == "r1" and "step" not in started
    assert "run_id" not in by_event["after the run"]


def test_a_stdlib_record_carries_bound_fields_and_the_otel_trace_ids() -> None:
    out = io.StringIO()
    configure_logging(json=True, file=out)
    structlog.contextvars.bind_contextvars(worker="bound")
    tracer = TracerProvider().get_tracer("tests")
    with tracer.start_as_current_span("work") as span:
        stdlib.info("inside")
        context = span.get_span_context()
    line = lines(out)[0]
    assert line["worker"] == "bound"
    assert line["trace_id"] == format(context.trace_id, "032x")
    assert line["span_id"] == format(context.span_id, "016x")


def test_a_stdlib_message_cannot_forge_a_json_line_or_recolour() -> None:
    out = io.StringIO()
    configure_logging(json=True, file=out)
    stdlib.warning("user said %s", "hi\n{\"level\": \"error\"}\x1b[31mred\x1b[0m\x07",
                   extra={"note": "a\x1b[2Jb"})
    assert out.getvalue().count("\n") == 1 and "\x1b" not in out.getvalue()
    line = lines(out)[0]
    assert line["event"] == 'user said hi\n{"level": "error"}red'
    assert line["note"] == "ab"


def test_a_stdlib_message_is_escaped_on_one_console_line() -> None:
    out = io.StringIO()
    configure_logging(json=False, file=out)
    stdlib.warning("user said %s", "hi\nFAKE [error] line\x1b[31mred",
                   extra={"note": "x\ny"})
    text = out.getvalue()
    assert text.count("\n") == 1 and "\x1b" not in text
    assert "user said hi\\nFAKE [error] line\\x1b[31mred" in text
    assert "note='x\\ny'" in text and "[tests.stdlib]" in text and "warning" in text


def test_secrets_in_stdlib_extras_and_dict_arguments_are_masked() -> None:
    out = io.StringIO()
    configure_logging(json=True, file=out)
    stdlib.info("calling", extra={"api_key": "sk-1", "input_tokens": 3,
                                  "headers": {"Authorization": "Bearer x", "accept": "json"}})
    logging.getLogger("openai._base_client").info(
        "Request options: %s", {"url": "/chat", "headers": {"X-Api-Key": "sk-2"}})
    stdlib.info("user %(user)s with %(password)s", {"user": "ann", "password": "hunter2"})
    extras, options, named = lines(out)
    assert extras["api_key"] == MASK and extras["input_tokens"] == 3
    assert extras["headers"] == {"Authorization": MASK, "accept": "json"}
    assert options["event"] == "Request options: {'url': '/chat', 'headers': {'X-Api-Key': " \
        "'***'}}"
    assert named["event"] == "user ann with ***"
    for secret in ("sk-1", "sk-2", "Bearer", "hunter2"):
        assert secret not in out.getvalue()


def test_a_stdlib_exception_is_a_json_string_field_without_escapes() -> None:
    out = io.StringIO()
    configure_logging(json=True, file=out)
    try:
        raise ValueError("boom \x1b[1m")
    except ValueError:
        stdlib.exception("charge failed")
    line = lines(out)[0]
    assert line["level"] == "error" and line["event"] == "charge failed"
    assert line["exception"].startswith("Traceback (most recent call last)")
    assert "ValueError: boom" in line["exception"] and "\x1b" not in line["exception"]


def test_a_console_traceback_keeps_its_lines_and_escapes_control_characters() -> None:
    out = io.StringIO()
    configure_logging(json=False, file=out)
    try:
        raise ValueError("boom \x1b[1mbold\rback")
    except ValueError:
        stdlib.exception("stdlib failed")
        log.exception("garrison failed")
    text = out.getvalue()
    assert "\x1b" not in text and "\r" not in text
    assert text.count("Traceback (most recent call last):") == 2
    assert text.count("ValueError: boom \\x1b[1mbold\\rback") == 2
    assert "stdlib failed" in text and "garrison failed" in text


def test_the_level_applies_to_stdlib_records() -> None:
    out = io.StringIO()
    configure_logging(json=True, level="warning", file=out)
    stdlib.info("hidden")
    stdlib.warning("shown")
    assert [line["event"] for line in lines(out)] == ["shown"]
    assert logging.getLogger().level == logging.WARNING

    debug_out = io.StringIO()
    configure_logging(json=True, level="debug", file=debug_out)
    stdlib.debug("details")
    assert [line["event"] for line in lines(debug_out)] == ["details"]


def test_configuring_twice_keeps_one_handler_and_the_applications_own() -> None:
    theirs = io.StringIO()
    their_handler = logging.StreamHandler(theirs)
    root = logging.getLogger()
    root.addHandler(their_handler)
    try:
        first, second = io.StringIO(), io.StringIO()
        configure_logging(json=True, file=first)
        configure_logging(json=True, file=second)
        stdlib.warning("once")
        log.info("garrison")
        assert first.getvalue() == ""
        assert [line["event"] for line in lines(second)] == ["once", "garrison"]
        assert theirs.getvalue() == "once\n"
        assert their_handler in root.handlers
        assert len([h for h in root.handlers if _is_ours(h)]) == 1
    finally:
        root.removeHandler(their_handler)


def test_stdlib_false_leaves_the_root_logger_alone() -> None:
    root = logging.getLogger()
    root.setLevel(logging.ERROR)
    out = io.StringIO()
    configure_logging(json=True, file=out, stdlib=False)
    stdlib.error("not ours")
    log.info("ours")
    assert [line["event"] for line in lines(out)] == ["ours"]
    assert root.level == logging.ERROR and not any(_is_ours(h) for h in root.handlers)

    configure_logging(json=True, file=out)
    configure_logging(json=True, file=out, stdlib=False)  # takes back the earlier handler
    assert not any(_is_ours(h) for h in root.handlers)


def test_an_unknown_level_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match=r"level 'loud'.*debug, info, warning, error"):
        configure_logging(level="loud")


async def test_an_apps_own_worker_names_itself_on_its_lines(tmp_path: Path) -> None:
    out = io.StringIO()
    configure_logging(json=True, file=out)
    app = Garrison(f"sqlite:///{tmp_path}/g.db", worker_id="the-worker")
    app.configure_worker(shutdown_grace_s=0.05)
    entered = asyncio.Event()

    @app.step(name="long")
    async def long() -> None:
        entered.set()
        await asyncio.sleep(30)

    @app.workflow(name="wf")
    async def wf(ctx: Context) -> None:
        await long()

    async with app:  # no `garrison worker` binding anything: the app runs its worker
        await app.start(wf, run_id="held")
        await asyncio.wait_for(entered.wait(), 10)
    by_event = {line["event"]: line for line in lines(out)}
    for event in ("worker.draining", "worker.handed_back"):
        assert by_event[event]["worker"] == "the-worker", event


async def test_a_run_in_a_worker_without_instrument_logs_its_starters_trace_id(
        tmp_path: Path) -> None:
    from garrison.observability import instrument

    url = f"sqlite:///{tmp_path}/g.db"
    step_log = structlog.get_logger("shop")

    def build(**options: Any) -> Garrison:
        app = Garrison(url, **options)

        @app.step(name="work")
        async def work() -> None:
            step_log.warning("in.step")

        @app.workflow(name="wf")
        async def wf(ctx: Context) -> None:
            step_log.warning("in.workflow")
            await work()

        return app

    starter = build(worker=False)
    provider = TracerProvider()
    instrument(starter, tracer_provider=provider)
    async with starter:
        with provider.get_tracer("tests").start_as_current_span("request") as span:
            await starter.start("wf", run_id="traced")
        trace_id = format(span.get_span_context().trace_id, "032x")
    out = io.StringIO()
    configure_logging(json=True, file=out)
    async with build() as worker:  # not instrumented: it makes no span
        await worker.handle("traced").result(timeout=10)
    by_event = {line["event"]: line for line in lines(out)}
    for event in ("in.workflow", "in.step"):
        assert by_event[event]["trace_id"] == trace_id, event
        assert "span_id" not in by_event[event]  # no span of this worker's is current
