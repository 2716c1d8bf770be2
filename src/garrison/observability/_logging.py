"""Structured logs for applications and the CLI: `configure_logging` and its processors.

The library never configures structlog (STYLE.md); an application calls
`configure_logging()` once at start-up, and `garrison worker` / `garrison demo` do.
Each processor is a small callable, usable on its own in a custom chain.

Standard-library `logging` records (httpx, openai, asyncpg, an application's own
`logging.getLogger`) go through the same processors: `configure_logging` puts one handler
on the root logger whose formatter is structlog's `ProcessorFormatter`, so such a line
also carries the run context and trace ids, its `extra=` fields, masked secrets (in the
`%`-arguments too, before they are formatted) and escaped text.

Cost. With the level at info, a debug call from the engine goes through structlog's
filtering bound logger, whose debug method does nothing: ≈ 3 µs a call here, against
≈ 0.5 ms for unconfigured structlog's console line. Loggers are not cached on first
use, so a second `configure_logging` (a test, a CLI command run in-process) takes
effect for the engine's module-level loggers too; caching would save ≈ 1.6 µs a call.
"""

from __future__ import annotations

import copy
import functools
import logging
import re
import sys
from collections.abc import Callable, Mapping, MutableMapping
from typing import IO, Any

from garrison.engine._context import log_fields, run_trace_context

__all__ = [
    "ControlCharEscaper",
    "MASK",
    "SECRET_KEY_PARTS",
    "add_record_extras",
    "add_run_context",
    "add_trace_context",
    "configure_logging",
    "escape_control",
    "is_secret_key",
    "mask_secrets",
    "mask_text",
    "mask_value",
]

EventDict = MutableMapping[str, Any]

MASK = "***"
"""What a secret-looking field's value is replaced with."""

SECRET_KEY_PARTS = ("api_key", "apikey", "authorization", "password", "passwd", "pwd",
                    "passphrase", "secret", "cookie", "token", "private_key", "credential",
                    "bearer", "dsn")
"""A field is masked when its key, lower-cased with `-` read as `_`, contains one of
these; `token` only when not followed by `s`, so counts such as `input_tokens`,
`output_tokens`, `max_tokens` and `tokens_left` are kept. A key that is `auth` or ends
in `_auth` (httpx's `auth=(user, password)`) is masked too."""

_SECRET = re.compile("|".join(
    [re.escape(part) + ("(?!s)" if part == "token" else "") for part in SECRET_KEY_PARTS]
    + [r"(?:^|_)auth$"]))
# The password of a URL's user part, in any string value: `scheme://user:PASSWORD@host`.
# The password runs to the user part's last `@` (a password may hold one).
_URL_PASSWORD = re.compile(r"([a-z][a-z0-9+.-]*://[^\s/@:]*):[^\s/]*@", re.IGNORECASE)
# Secrets written inline in a string value (an error message, a header dump, a libpq
# connection string): `password=...`, `api_key: ...`, `"token": "..."`,
# `Authorization: Bearer ...`, and a bearer token on its own. The key must start a
# word, `_` and `-` counting as breaks (`db_password=` is masked, `max_tokens=5` kept),
# and the value is a quoted string or runs to a space, `&`, `;`, `,` or quote.
_INLINE_SECRET = re.compile(
    r"(?i)(?<![a-z0-9])((?:password|passwd|pwd|passphrase|api[_-]?key|apikey"
    r"|access[_-]?token|refresh[_-]?token|id[_-]?token|auth[_-]?token|client[_-]?secret"
    r"|secret|token|authorization)[\"']?\s*[=:]\s*)"
    r"(?:([\"'])[^\"'\n]*\2|((?:(?:bearer|basic|token|digest)\s+)?)[^\s&;,'\"]+)")
# The trace id of a run's stored context (`00-TRACE_ID-SPAN_ID-FLAGS[ tracestate]`).
_STORED_TRACE = re.compile(r"\s*[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")
_BEARER = re.compile(r"\bBearer\s+(?!\*\*\*)[A-Za-z0-9._~+/-]{8,}=*")

# CSI/OSC escape sequences as a whole (so JSON mode drops "\x1b[31m", not just the ESC),
# then any other character that is not printable: C0/C1 controls, DEL, line and
# paragraph separators, zero-width and bidi controls.
_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?)")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_TRACEBACK_MARK = "│ "  # begins every line of a console traceback
_MAX_DEPTH = 32  # nesting followed by masking and escaping; deeper values become text
_PLAIN = (int, float, bool, type(None))  # values whose text is always printable
_LEVELS = ("debug", "info", "warning", "error", "critical")
# What every LogRecord holds, and what formatters add to one: not `extra=` fields.
_RECORD_KEYS = frozenset(logging.makeLogRecord({}).__dict__) | {
    "message", "asctime", "taskName", "_record", "_from_structlog"}
_STRUCTLOG_KEYS = frozenset({"exc_info", "stack_info"})  # structlog's own, not user text


@functools.lru_cache(maxsize=4096)
def is_secret_key(key: str) -> bool:
    """Whether a field named `key` is masked (see `SECRET_KEY_PARTS`)."""
    return _SECRET.search(key.lower().replace("-", "_")) is not None


def _masked_inline(match: re.Match[str]) -> str:
    key, quote, scheme = match.group(1, 2, 3)
    return f"{key}{quote}{MASK}{quote}" if quote else f"{key}{scheme}{MASK}"


def mask_text(text: str) -> str:
    """`text` with the secrets written in it replaced by `MASK`: a URL's password
    (`postgresql://app:***@db`), `password=`, `api_key:`, `"token": ` and similar
    values, and `Authorization` / `Bearer` credentials. For a value from a user or a
    store printed where logs' masking does not reach (the CLI)."""
    if "://" in text:
        text = _URL_PASSWORD.sub(rf"\1:{MASK}@", text)
    if "=" in text or ":" in text:
        text = _INLINE_SECRET.sub(_masked_inline, text)
    if "Bearer" in text:
        text = _BEARER.sub(f"Bearer {MASK}", text)
    return text


def mask_value(value: Any) -> Any:
    """`value` as a log field's value is masked: strings through `mask_text`, and in
    dicts and lists (32 levels deep; deeper, as masked text) the value of every
    secret-looking key replaced by `MASK`. Returns new containers; `value` is not changed."""
    return _mask(value, 1)


def _mask(value: Any, depth: int) -> Any:
    if isinstance(value, str):
        return mask_text(value)
    if depth > _MAX_DEPTH:
        return value if isinstance(value, _PLAIN) else mask_text(repr(value))
    if isinstance(value, Mapping):
        return {k: (MASK if isinstance(k, str) and is_secret_key(k) and v is not None
                    else _mask(v, depth + 1)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_mask(v, depth + 1) for v in value]
    return value


def _mask_exception(logger: Any, method: str, event_dict: EventDict) -> EventDict:
    # The formatted traceback: an HTTP or database error often names its URL.
    text = event_dict.get("exception")
    if isinstance(text, str):
        event_dict["exception"] = mask_text(text)
    return event_dict


def mask_secrets(logger: Any, method: str, event_dict: EventDict) -> EventDict:
    """Replace the value of every secret-looking field with `MASK`, in nested
    dicts and lists too (a `headers={"Authorization": ...}` field)."""
    for key, value in event_dict.items():
        if value is None or key in _STRUCTLOG_KEYS:
            continue
        if is_secret_key(key):
            event_dict[key] = MASK
        elif isinstance(value, str | Mapping | list | tuple):
            event_dict[key] = _mask(value, 1)
    return event_dict


def _escape_char(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_control(text: str) -> str:
    """`text` with its control characters (newlines, escape sequences, bidi overrides)
    written as visible escapes (`\\n`, `\\x1b`): a user's value cannot forge a line
    or drive a terminal."""
    return text if text.isprintable() else _CONTROL.sub(_escape_char, text)


def _escape_keeping_lines(text: str) -> str:
    # Console traceback: its lines stay lines, each marked as the traceback's (so a
    # newline in an exception's message cannot start what looks like a log line);
    # every other control character is escaped.
    return "\n".join(_TRACEBACK_MARK + escape_control(line) if line else line
                     for line in text.split("\n"))


def _strip_text(text: str) -> str:
    # JSON mode: the encoder escapes \n, \r and \t (a traceback keeps its lines); every
    # other control character and escape sequence goes.
    if text.isprintable():
        return text
    return _CONTROL.sub(lambda m: m.group() if m.group() in _NAMED else "",
                        _ANSI.sub("", text))


def _clean(value: Any, fix: Callable[[str], str], depth: int) -> Any:
    if isinstance(value, str):
        return fix(value)
    if isinstance(value, _PLAIN):
        return value
    if depth > _MAX_DEPTH:
        return fix(repr(value))
    if isinstance(value, Mapping):
        return {_clean(k, fix, depth + 1): _clean(v, fix, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v, fix, depth + 1) for v in value]
    text = str(value)  # an object: JSON shows it by str() (`default=str`)
    return value if text.isprintable() else fix(text)


class _Escaped:
    """A string value shown by its `repr` (quoted, control characters escaped): the
    console renderer prints some strings raw but every other object by its repr."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return repr(self.text)

    def __str__(self) -> str:
        return repr(self.text)


class _Shown:
    """A value the console renderer shows as `text` (its escaped repr)."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text

    __str__ = __repr__


class ControlCharEscaper:
    """Escape what a user controls against log injection: newlines, ANSI escape sequences
    and other control characters in string keys and values.

    Console mode (`strip=False`): a string value with such characters is shown quoted
    and escaped, `'a\\nb\\x1b[31m'` (it becomes an object whose `repr` is that, since
    the console renderer shows objects by `repr`, which also escapes nested strings);
    the event name and keys are escaped in place, and a formatted traceback
    (`exception`) keeps its lines, each begun with `│ `, with every other control
    character escaped. So a value, an exception's message included, can neither start
    a fake line nor recolour the terminal. JSON mode
    (`strip=True`): the encoder already quotes and escapes; ANSI sequences and control
    characters other than newline, CR and tab are removed from strings at any depth, so
    `jq -r` or a log viewer cannot be steered.
    """

    __slots__ = ("_strip",)

    def __init__(self, *, strip: bool = False) -> None:
        self._strip = strip

    def __call__(self, logger: Any, method: str, event_dict: EventDict) -> EventDict:
        strip = self._strip
        dirty = None
        for key, value in event_dict.items():
            if isinstance(value, str):
                if not value.isprintable():
                    if strip:
                        event_dict[key] = _strip_text(value)
                    elif key == "exception":
                        event_dict[key] = _escape_keeping_lines(value)
                    else:
                        event_dict[key] = (escape_control(value) if key == "event"
                                           else _Escaped(value))
            elif key in _STRUCTLOG_KEYS or isinstance(value, _PLAIN):
                pass
            elif strip:  # containers and objects (shown by str() in JSON)
                event_dict[key] = _clean(value, _strip_text, 1)
            else:  # the console shows containers and objects by repr, itself unescaped
                text = repr(value)
                if not text.isprintable():
                    event_dict[key] = _Shown(escape_control(text))
            if not key.isprintable():
                dirty = [*(dirty or ()), key]
        fix = _strip_text if strip else escape_control
        for key in dirty or ():
            event_dict[fix(key)] = event_dict.pop(key)
        return event_dict


def add_run_context(logger: Any, method: str, event_dict: EventDict) -> EventDict:
    """Add `run_id`, `step`, `position`, `attempt` and `worker` from Garrison's context
    (the run and step running now); fields the call passed win."""
    for key, value in log_fields().items():
        event_dict.setdefault(key, value)
    return event_dict


def add_trace_context(logger: Any, method: str, event_dict: EventDict) -> EventDict:
    """Add `trace_id` and `span_id` (hex) of the current OpenTelemetry span when there
    is one, recorded here or sampled out (its context still goes out on outbound calls).
    Without one, in a run's code, add the `trace_id` of the trace its starter recorded
    with it (a worker without `instrument` makes no span, but the run belongs to that
    trace). OpenTelemetry is never imported here: if the application has not imported
    it, no span can be active."""
    trace = sys.modules.get("opentelemetry.trace")
    get_current_span = getattr(trace, "get_current_span", None)
    if get_current_span is not None:
        context = get_current_span().get_span_context()
        if context.is_valid:
            event_dict.setdefault("trace_id", format(context.trace_id, "032x"))
            event_dict.setdefault("span_id", format(context.span_id, "016x"))
            return event_dict
    stored = run_trace_context()
    if stored is not None:
        match = _STORED_TRACE.match(stored)
        if match is not None and match.group(1) != "0" * 32:
            event_dict.setdefault("trace_id", match.group(1))
    return event_dict


def add_record_extras(logger: Any, method: str, event_dict: EventDict) -> EventDict:
    """For a standard-library record: add its `extra=` fields (the attributes that are
    not `LogRecord`'s own) and its logger's name as `logger`."""
    record = event_dict.get("_record")
    if isinstance(record, logging.LogRecord):
        event_dict.setdefault("logger", record.name)
        for key, value in record.__dict__.items():
            if key not in _RECORD_KEYS:
                event_dict.setdefault(key, value)
    return event_dict


def _masked_args(args: Any) -> Any:
    if isinstance(args, Mapping):
        return _mask(args, 1)
    if isinstance(args, tuple):
        return tuple(_mask(arg, 1) for arg in args)
    return args


class _RecordFormatter(logging.Formatter):
    """Renders a standard-library record with structlog's processors; secret-looking
    keys in its `%`-arguments are masked before the message is formatted (on a copy:
    other handlers see the record as it was)."""

    def __init__(self, enrich: list[Any], render: list[Any]) -> None:
        import structlog

        super().__init__()
        self._inner = structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[add_record_extras, *enrich],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *render],
        )

    def format(self, record: logging.LogRecord) -> str:
        if record.args:
            record = copy.copy(record)
            record.args = _masked_args(record.args)
        return self._inner.format(record)


class _RootHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler `configure_logging` puts on the root logger (one at a time)."""


class _Sink:
    """A file for structlog's `WriteLogger`: `sys.stderr` as it is at each write (so a
    replaced or closed stderr, as under a test runner, is never written to later)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(*, json: bool | None = None, level: str = "info",
                      file: IO[str] | None = None, stdlib: bool = True) -> None:
    """Configure structlog for an application: JSON lines in production, pretty lines in
    a terminal, each carrying the run context, trace ids, escaped and without secrets.

    Args:
        json: JSON lines (True), console lines (False), or by the output: JSON unless it
            is a terminal (None).
        level: the lowest level logged (`debug`, `info`, `warning`, `error`, `critical`);
            lower calls cost a no-op method.
        file: where lines go (default: `sys.stderr`, looked up at each write).
        stdlib: also render standard-library `logging` records (httpx, openai, the
            application's own loggers) the same way: one handler on the root logger,
            whose level is set to `level`; the application's other handlers stay.
            False leaves the root logger as it is (and takes back a handler an earlier
            call put there).

    The library never calls this; call it once at start-up (calling it again replaces
    the configuration, for every logger).
    """
    import structlog

    if not isinstance(level, str) or level.lower() not in _LEVELS:
        raise ValueError(f"configure_logging: level {level!r} is not a level; use one of "
                         f"{', '.join(_LEVELS)}")
    target: Any = file if file is not None else _Sink()
    if json is None:
        stream = file if file is not None else sys.stderr
        isatty = getattr(stream, "isatty", None)
        json = not (callable(isatty) and isatty())
    enrich: list[Any] = [
        structlog.contextvars.merge_contextvars,
        add_run_context,
        add_trace_context,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        mask_secrets,
    ]
    # A traceback becomes the `exception` text before escaping, in both modes, so no
    # exception formatter writes a control character from an exception's message.
    render: list[Any] = [structlog.processors.format_exc_info, _mask_exception]
    if json:
        render += [ControlCharEscaper(strip=True),
                   structlog.processors.JSONRenderer(default=str)]
    else:
        render += [ControlCharEscaper(),
                   structlog.dev.ConsoleRenderer(colors=_colors(target))]
    structlog.configure(
        processors=[*enrich, *render],
        wrapper_class=structlog.make_filtering_bound_logger(level.lower()),
        logger_factory=structlog.WriteLoggerFactory(target),
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _RootHandler)]:
        root.removeHandler(handler)
    if stdlib:
        handler = _RootHandler(target)
        handler.setFormatter(_RecordFormatter(enrich, render))
        root.addHandler(handler)
        root.setLevel(level.upper())


def _colors(target: Any) -> bool:
    stream = sys.stderr if isinstance(target, _Sink) else target
    isatty = getattr(stream, "isatty", None)
    return callable(isatty) and bool(isatty())
