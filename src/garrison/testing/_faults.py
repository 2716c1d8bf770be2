"""Fault specs for the local LLM server: which requests fail, and how.

Pure Python. `Faults.pick` is seeded and thread-safe, so a run with the same seed and the
same request order fails the same requests.
"""

from __future__ import annotations

import fnmatch
import math
import random
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from garrison.errors import ConfigurationError

__all__ = ["FAULT_GRAMMAR", "FAULT_KINDS", "Fault", "Faults"]

FAULT_KINDS = ("status", "timeout", "reset", "malformed", "stall", "truncate", "bad_args",
               "latency")
# At most one of these decides a request's outcome; latency and bad_args combine with it.
TERMINAL_KINDS = frozenset({"status", "timeout", "reset", "malformed", "stall", "truncate"})

FAULT_GRAMMAR = """\
faults := item ("," item)*
item   := kind [":" rate ["x" count]] ["@" arg] ("/" filter)*
kind   := an HTTP status (429, 500, 503, 400, ...) | timeout | reset | malformed | stall
          | truncate | bad_args | latency
rate   := probability per matching request, 0..1 (default 1)
count  := fire for at most this many requests, then never again
arg    := status: Retry-After seconds; timeout, stall: seconds (30 by default);
          latency: LOW-HIGHms or MSms (latency:20-80ms is short for latency:1@20-80ms)
filter := model=GLOB | api=openai|anthropic | stream=true|false | code=ERROR_CODE (status)
examples: 429:0.2@1.5, 503:1x3/model=gpt-primary, timeout:0.05@30, stall:0.1@5,
          400:1x1/code=context_length_exceeded, latency:20-80ms"""

_NUMBER = r"\d+(?:\.\d*)?|\.\d+"
_ITEM = re.compile(rf"^(?P<kind>[a-z_]+|\d{{3}})(?::(?P<rate>{_NUMBER})?(?:x(?P<count>\d+))?)?"
                   r"(?:@(?P<arg>[^/]+))?$")
_LATENCY = re.compile(rf"^(?P<low>{_NUMBER})(?:-(?P<high>{_NUMBER}))?ms$")
_SECONDS = re.compile(rf"^(?P<value>{_NUMBER})(?P<unit>ms|s)?$")


@dataclass(frozen=True, slots=True)
class Fault:
    """One fault: what goes wrong (`kind`), how often, and for which requests.

    Kinds: `status` (an HTTP error with a provider-shaped body, `Retry-After` when
    `retry_after` is set), `timeout` (hold the request `seconds` before answering), `reset`
    (abort the TCP connection, no response), `malformed` (HTTP 200 whose body or one SSE
    event is not JSON), `stall` (a stream pauses `seconds` midway; a plain answer waits like
    `timeout`), `truncate` (the connection closes midway through the body or stream),
    `bad_args` (tool call arguments become invalid JSON), `latency` (a delay drawn from
    `latency_ms` before answering).

    Args:
        rate: the probability it fires for a matching request.
        count: fire for at most this many requests, then never again (`None`: no limit).
        model: only requests for models matching this glob.
        api: only `"openai"` or `"anthropic"` requests (`None`: both).
        stream: only streaming (`True`) or plain (`False`) requests (`None`: both).
        error_code: the error code in a status fault's body, e.g. `context_length_exceeded`.

    Raises:
        ConfigurationError: an unknown kind or a value out of range (names the field).
    """

    kind: str
    rate: float = 1.0
    count: int | None = None
    status: int = 500
    retry_after: float | None = None
    seconds: float = 30.0
    latency_ms: tuple[float, float] = (0.0, 0.0)
    model: str | None = None
    api: str | None = None
    error_code: str | None = None
    stream: bool | None = None

    def __post_init__(self) -> None:
        label = f"{self.kind} {self.status}" if self.kind == "status" else self.kind
        if self.kind not in FAULT_KINDS:
            raise ConfigurationError(f"fault kind {self.kind!r}: unknown; kinds are "
                                     f"{', '.join(FAULT_KINDS)}")
        if not _is_number(self.rate) or not 0.0 <= self.rate <= 1.0:
            raise ConfigurationError(f"fault {label}: rate {self.rate!r} must be in 0..1")
        if self.count is not None and (isinstance(self.count, bool)
                                       or not isinstance(self.count, int) or self.count < 0):
            raise ConfigurationError(f"fault {label}: count {self.count!r} must be an "
                                     "integer >= 0")
        if isinstance(self.status, bool) or not isinstance(self.status, int) \
                or not 400 <= self.status <= 599:
            raise ConfigurationError(f"fault {label}: status {self.status!r} must be an "
                                     "HTTP error status, 400..599")
        if self.retry_after is not None and (not _is_number(self.retry_after)
                                             or self.retry_after < 0):
            raise ConfigurationError(f"fault {label}: retry_after {self.retry_after!r} "
                                     "must be seconds >= 0")
        if not _is_number(self.seconds) or self.seconds < 0:
            raise ConfigurationError(f"fault {label}: seconds {self.seconds!r} must be >= 0")
        latency = self.latency_ms
        if not isinstance(latency, Sequence) or len(latency) != 2 \
                or not all(_is_number(v) for v in latency) or not 0 <= latency[0] <= latency[1]:
            raise ConfigurationError(f"fault {label}: latency_ms {latency!r} must be "
                                     "[low, high] milliseconds with 0 <= low <= high")
        object.__setattr__(self, "latency_ms", (float(latency[0]), float(latency[1])))
        for name in ("model", "error_code"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ConfigurationError(f"fault {label}: {name} must be a string")
        if self.api not in (None, "openai", "anthropic"):
            raise ConfigurationError(f"fault {label}: api {self.api!r} must be 'openai', "
                                     "'anthropic' or null (both)")
        if self.stream not in (None, True, False):
            raise ConfigurationError(f"fault {label}: stream must be true, false or null")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Fault:
        """A fault from its dict form (the field names as keys).

        Raises:
            ConfigurationError: an unknown key, a missing kind or a bad value.
        """
        if not isinstance(data, Mapping):
            raise ConfigurationError(f"a fault is an object with a 'kind', not "
                                     f"{type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = [key for key in data if key not in known]
        if unknown:
            raise ConfigurationError(f"fault: unknown key {unknown[0]!r}; keys are "
                                     f"{', '.join(sorted(known))}")
        if "kind" not in data:
            raise ConfigurationError(f"fault {dict(data)!r}: 'kind' is missing; kinds are "
                                     f"{', '.join(FAULT_KINDS)}")
        values = dict(data)
        if isinstance(values.get("latency_ms"), list):
            values["latency_ms"] = tuple(values["latency_ms"])
        return cls(**values)

    def applies(self, api: str, model: str, stream: bool) -> bool:
        """Whether this fault's filters admit the request (rate and count aside)."""
        return ((self.api is None or self.api == api)
                and (self.stream is None or self.stream == stream)
                and (self.model is None or fnmatch.fnmatchcase(model, self.model)))

    @property
    def outcome(self) -> str:
        """How the request log names a request this fault decided: `status:429`, `reset`..."""
        return f"status:{self.status}" if self.kind == "status" else self.kind


class Faults:
    """The faults a server injects; `pick` decides, per request, which of them fire.

    At most one of `status`, `timeout`, `reset`, `malformed`, `stall`, `truncate` fires for
    a request (the first in order whose filters, count and dice agree); `latency` and
    `bad_args` fire alongside it. A fault that does not fire keeps its count.

    Args:
        faults: `Fault`s or their dict form (see `Fault.from_dict`), in priority order.
        seed: seeds the dice and the latency draws.

    Raises:
        ConfigurationError: a bad fault (names its index).
    """

    def __init__(self, faults: Sequence[Fault | Mapping[str, Any]] = (), *, seed: int = 0) -> None:
        if isinstance(faults, (str, Mapping)) or not isinstance(faults, Sequence):
            raise ConfigurationError("faults must be a list of faults (or use Faults.parse "
                                     "for a spec string)")
        parsed: list[Fault] = []
        for index, fault in enumerate(faults):
            if isinstance(fault, Fault):
                parsed.append(fault)
                continue
            try:
                parsed.append(Fault.from_dict(fault))
            except (ConfigurationError, TypeError) as exc:
                raise ConfigurationError(f"fault {index}: {exc}") from exc
        self._faults = tuple(parsed)
        self._fired = [0] * len(parsed)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    @classmethod
    def parse(cls, spec: str, *, seed: int = 0) -> Faults:
        """Faults from the CLI grammar, e.g. `429:0.2@1.5,503:1x3/model=gpt-*,latency:20-80ms`.

        Raises:
            ConfigurationError: an item does not follow the grammar (names it, shows the grammar).
        """
        items = [item.strip() for item in spec.split(",")]
        return cls([_parse_item(item) for item in items if item], seed=seed)

    @property
    def faults(self) -> tuple[Fault, ...]:
        """The faults, in priority order."""
        return self._faults

    def pick(self, api: str, model: str, stream: bool) -> list[Fault]:
        """The faults that fire for this request; counts them against their `count`.

        Args:
            api: `"openai"` or `"anthropic"`.
            model: the requested model name.
            stream: whether the request asks for a stream.
        """
        chosen: list[Fault] = []
        decided = False
        with self._lock:
            for index, fault in enumerate(self._faults):
                if not fault.applies(api, model, stream):
                    continue
                terminal = fault.kind in TERMINAL_KINDS
                if terminal and decided:
                    continue
                if fault.count is not None and self._fired[index] >= fault.count:
                    continue
                if fault.rate < 1.0 and self._rng.random() >= fault.rate:
                    continue
                self._fired[index] += 1
                chosen.append(fault)
                decided = decided or terminal
        return chosen

    def delay_s(self, faults: Sequence[Fault]) -> float:
        """Seconds of added latency for these picked faults (seeded uniform draws)."""
        total_ms = 0.0
        with self._lock:
            for fault in faults:
                if fault.kind == "latency":
                    low, high = fault.latency_ms
                    total_ms += low if low == high else self._rng.uniform(low, high)
        return total_ms / 1000.0

    def __repr__(self) -> str:
        return f"Faults({list(self._faults)!r})"


def _parse_item(item: str) -> Fault:
    head, *filters = item.split("/")
    # A model glob may hold "/" (meta-llama/Llama-3*): a piece without "=" continues it.
    merged: list[str] = []
    for piece in filters:
        if "=" not in piece and merged:
            merged[-1] += "/" + piece
        else:
            merged.append(piece)
    try:
        values = _parse_head(head)
        for piece in merged:
            key, _, value = piece.partition("=")
            if key == "model" and value:
                values["model"] = value
            elif key == "api" and value in ("openai", "anthropic"):
                values["api"] = value
            elif key == "stream" and value in ("true", "false"):
                values["stream"] = value == "true"
            elif key == "code" and value and values["kind"] == "status":
                values["error_code"] = value
            else:
                raise ConfigurationError(f"filter {piece!r} is not one of model=GLOB, "
                                         "api=openai|anthropic, stream=true|false, "
                                         "code=ERROR_CODE (status faults)")
        return Fault(**values)
    except ConfigurationError as exc:
        raise ConfigurationError(f"fault spec item {item!r}: {exc}\n{FAULT_GRAMMAR}") from exc


def _parse_head(head: str) -> dict[str, Any]:
    latency = re.match(r"^latency:(?P<range>[^@]+ms)$", head)
    if latency:
        head = f"latency:1@{latency['range']}"
    match = _ITEM.match(head)
    if match is None:
        raise ConfigurationError("expected KIND[:RATE[xCOUNT]][@ARG]")
    kind, rate, count, arg = match["kind"], match["rate"], match["count"], match["arg"]
    values: dict[str, Any] = {}
    if kind.isdigit():
        values.update(kind="status", status=int(kind))
    elif kind in FAULT_KINDS and kind != "status":
        values["kind"] = kind
    else:
        raise ConfigurationError(f"kind {kind!r} is not an HTTP status or one of "
                                 f"{', '.join(k for k in FAULT_KINDS if k != 'status')}")
    if rate is not None:
        values["rate"] = float(rate)
    if count is not None:
        values["count"] = int(count)
    kind = values["kind"]
    if arg is None:
        if kind == "latency":
            raise ConfigurationError("latency needs a range, e.g. latency:20-80ms")
        return values
    if kind == "latency":
        bounds = _LATENCY.match(arg)
        if bounds is None:
            raise ConfigurationError(f"latency {arg!r} must be LOW-HIGHms or MSms")
        low = float(bounds["low"])
        values["latency_ms"] = (low, float(bounds["high"]) if bounds["high"] else low)
    elif kind in ("status", "timeout", "stall"):
        seconds = _SECONDS.match(arg)
        if seconds is None:
            raise ConfigurationError(f"@{arg} must be seconds, e.g. @1.5 or @1500ms")
        value = float(seconds["value"]) / (1000.0 if seconds["unit"] == "ms" else 1.0)
        values["retry_after" if kind == "status" else "seconds"] = value
    else:
        raise ConfigurationError(f"{kind} takes no @ argument")
    return values


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)
