"""The script engine of the local LLM server: rules that turn a conversation into a reply.

Pure Python and deterministic: the same model and conversation always get the same reply,
the same tool call ids and the same token counts (rules limited by `times` aside, which
count their uses over the script's life).

A conversation is a list of OpenAI chat-format messages; the server converts Anthropic
requests into that shape first, so one script drives both APIs.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from garrison.errors import ConfigurationError

__all__ = ["Rule", "Script", "ScriptedReply", "ScriptedToolCall", "fingerprint"]

FINISH_REASONS = ("stop", "tool_calls", "length", "content_filter")
ROLES = ("system", "user", "assistant", "tool")
MATCH_KEYS = ("model", "last_role", "last_user_contains", "last_tool",
              "last_tool_result_contains", "system_contains", "tool_results", "has_tool", "times")
RESPONSE_KEYS = ("content", "tool_calls", "finish_reason", "usage")
_TEMPLATE = re.compile(r"\{(last_user|last_tool_result)\}")
_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass(frozen=True, slots=True)
class ScriptedToolCall:
    """One tool call in a scripted reply; `arguments` is the raw JSON text."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class ScriptedReply:
    """What the script answers: text and/or tool calls, why it stopped, and token counts."""

    content: str | None
    tool_calls: tuple[ScriptedToolCall, ...]
    finish_reason: str
    input_tokens: int
    output_tokens: int


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule of a `Script`: match conditions (all must hold; `None` = any) and a response.

    Mirrors the dict form of a rule key for key. `tool_calls` entries are
    `{"name": str, "arguments": dict | str}`; a dict is sent as its `json.dumps`.

    Raises:
        ConfigurationError: a field has the wrong type or value (names the field).
    """

    model: str | None = None
    last_role: str | None = None
    last_user_contains: str | None = None
    last_tool: str | None = None
    last_tool_result_contains: str | None = None
    system_contains: str | None = None
    tool_results: int | None = None
    has_tool: str | None = None
    times: int | None = None
    content: str | None = None
    tool_calls: Sequence[Mapping[str, Any]] = ()
    finish_reason: str | None = None
    usage: Mapping[str, int] | None = None
    _calls: tuple[tuple[str, str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("model", "last_user_contains", "last_tool", "last_tool_result_contains",
                     "system_contains", "has_tool", "content"):
            _check_str(name, getattr(self, name))
        if self.last_role is not None and self.last_role not in ROLES:
            raise ConfigurationError(
                f"key 'last_role' is {self.last_role!r}; use one of {', '.join(ROLES)}")
        _check_count("tool_results", self.tool_results, minimum=0)
        _check_count("times", self.times, minimum=0)
        if self.finish_reason is not None and self.finish_reason not in FINISH_REASONS:
            raise ConfigurationError(f"key 'finish_reason' is {self.finish_reason!r}; use one "
                                     f"of {', '.join(FINISH_REASONS)}")
        object.__setattr__(self, "_calls", _tool_call_specs(self.tool_calls))
        object.__setattr__(self, "tool_calls",
                           tuple({"name": n, "arguments": a} for n, a in self._calls))
        if self.usage is not None:
            object.__setattr__(self, "usage", _usage_spec(self.usage))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Rule:
        """A rule from its dict form: flat keys, or `{"match": {...}, "response": {...}}`.

        Raises:
            ConfigurationError: an unknown key or a wrong type (names the key).
        """
        if not isinstance(data, Mapping):
            raise ConfigurationError(f"a rule is an object of match and response keys, not "
                                     f"{type(data).__name__}")
        flat: dict[str, Any] = {}
        for key, value in data.items():
            if key in ("match", "response"):
                allowed = MATCH_KEYS if key == "match" else RESPONSE_KEYS
                if not isinstance(value, Mapping):
                    raise ConfigurationError(f"key {key!r} must be an object of {key} keys")
                for inner, inner_value in value.items():
                    if inner not in allowed:
                        raise ConfigurationError(
                            f"key {key}.{inner}: unknown; {key} keys are {', '.join(allowed)}")
                    if inner in flat:
                        raise ConfigurationError(f"key {inner!r} given twice")
                    flat[inner] = inner_value
            elif key in MATCH_KEYS or key in RESPONSE_KEYS:
                if key in flat:
                    raise ConfigurationError(f"key {key!r} given twice")
                flat[key] = value
            else:
                raise ConfigurationError(
                    f"key {key!r}: unknown; match keys are {', '.join(MATCH_KEYS)}; response "
                    f"keys are {', '.join(RESPONSE_KEYS)}")
        tool_calls = flat.pop("tool_calls", ())
        if not isinstance(tool_calls, Sequence) or isinstance(tool_calls, str):
            raise ConfigurationError("key 'tool_calls' must be a list of "
                                     "{\"name\": ..., \"arguments\": {...}}")
        usage = flat.pop("usage", None)
        if usage is not None and not isinstance(usage, Mapping):
            raise ConfigurationError("key 'usage' must be an object "
                                     "{\"input_tokens\": int, \"output_tokens\": int}")
        return cls(**flat, tool_calls=tool_calls, usage=usage)

    def matches(self, model: str, conversation: _Conversation) -> bool:
        """Whether every condition but `times` holds for this request."""
        if self.model is not None and not fnmatch.fnmatchcase(model, self.model):
            return False
        if self.last_role is not None and conversation.last_role != self.last_role:
            return False
        if self.last_user_contains is not None and \
                self.last_user_contains.lower() not in conversation.last_user.lower():
            return False
        if self.last_tool is not None and conversation.last_tool != self.last_tool:
            return False
        if self.last_tool_result_contains is not None and (
                conversation.last_tool_result is None
                or self.last_tool_result_contains.lower()
                not in conversation.last_tool_result.lower()):
            return False
        if self.system_contains is not None and \
                self.system_contains.lower() not in conversation.system.lower():
            return False
        if self.tool_results is not None and conversation.tool_results != self.tool_results:
            return False
        return self.has_tool is None or self.has_tool in conversation.offered_tools


class Script:
    """Deterministic replies for the local LLM server: the first matching rule answers.

    ```python
    script = Script([
        {"last_user_contains": "weather", "tool_calls": [
            {"name": "get_weather", "arguments": {"city": "Paris"}}]},
        {"last_tool": "get_weather", "content": "It is {last_tool_result}."},
    ], default={"content": "ok"})
    ```

    No rule matching -> `default` (`{"content": "ok"}` unless given). Thread-safe: the
    server answers from several threads or loops at once.

    Args:
        rules: `Rule`s or their dict form (see `Rule.from_dict`), tried in order.
        default: the response used when no rule matches (response keys only).

    Raises:
        ConfigurationError: a bad rule (names its index and key) or a bad default.
    """

    def __init__(self, rules: Sequence[Rule | Mapping[str, Any]] = (), *,
                 default: Mapping[str, Any] | None = None) -> None:
        if isinstance(rules, (str, Mapping)) or not isinstance(rules, Sequence):
            raise ConfigurationError("script rules must be a list of rules")
        parsed: list[Rule] = []
        for index, rule in enumerate(rules):
            if isinstance(rule, Rule):
                parsed.append(rule)
                continue
            try:
                parsed.append(Rule.from_dict(rule))
            except (ConfigurationError, TypeError) as exc:
                raise ConfigurationError(f"script rule {index}: {exc}") from exc
        self._rules = tuple(parsed)
        default = {"content": "ok"} if default is None else default
        try:
            if not isinstance(default, Mapping):
                raise ConfigurationError("it must be an object of response keys")
            unknown = [key for key in default if key not in RESPONSE_KEYS]
            if unknown:
                raise ConfigurationError(f"key {unknown[0]!r}: unknown; response keys are "
                                         f"{', '.join(RESPONSE_KEYS)}")
            self._default = Rule.from_dict(default)
        except ConfigurationError as exc:
            raise ConfigurationError(f"script default: {exc}") from exc
        self._used = [0] * len(self._rules)
        self._lock = threading.Lock()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Script:
        """A script from `{"rules": [...], "default": {...}}` (both optional).

        Raises:
            ConfigurationError: an unknown top-level key or a bad rule.
        """
        if not isinstance(data, Mapping):
            raise ConfigurationError("a script is an object {\"rules\": [...], \"default\": {...}}")
        unknown = [key for key in data if key not in ("rules", "default")]
        if unknown:
            raise ConfigurationError(f"script: unknown key {unknown[0]!r}; a script has "
                                     "'rules' and 'default'")
        return cls(data.get("rules", ()), default=data.get("default"))

    @classmethod
    def from_file(cls, path: str | Path) -> Script:
        """A script from a JSON file in the `from_dict` format.

        Raises:
            ConfigurationError: the file cannot be read, is not JSON, or holds a bad script.
        """
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigurationError(f"script file {str(path)!r}: cannot read it ({exc})") from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigurationError(f"script file {str(path)!r}: not JSON: {exc}") from exc
        try:
            return cls.from_dict(data)
        except ConfigurationError as exc:
            raise ConfigurationError(f"script file {str(path)!r}: {exc}") from exc

    @property
    def rules(self) -> tuple[Rule, ...]:
        """The rules, in the order they are tried."""
        return self._rules

    @property
    def models(self) -> tuple[str, ...]:
        """Model names the rules name literally (globs left out), in rule order."""
        names: list[str] = []
        for rule in self._rules:
            if rule.model and not _GLOB_CHARS.search(rule.model) and rule.model not in names:
                names.append(rule.model)
        return tuple(names)

    def reset(self) -> None:
        """Forget how often each `times` rule was used."""
        with self._lock:
            self._used = [0] * len(self._rules)

    def reply(self, model: str, messages: Sequence[Mapping[str, Any]],
              tools: Sequence[Mapping[str, Any]] | None = None, *,
              consume: bool = True) -> ScriptedReply:
        """The reply of the first rule matching this request, else the default's.

        Args:
            model: the requested model name.
            messages: the conversation in OpenAI chat format.
            tools: the tools the request offers (OpenAI format, or `{"name": ...}`).
            consume: count this use against a `times` rule (the server passes `False` for a
                reply the client never receives intact, so a retry gets the same answer).
        """
        conversation = _Conversation(messages, tools)
        chosen = self._default
        for index, rule in enumerate(self._rules):
            if not rule.matches(model, conversation):
                continue
            if rule.times is not None:
                with self._lock:
                    if self._used[index] >= rule.times:
                        continue
                    if consume:
                        self._used[index] += 1
            chosen = rule
            break
        return _render(chosen, model, conversation)


def fingerprint(model: str, messages: Sequence[Mapping[str, Any]]) -> str:
    """sha256 hex of the model and the canonical conversation (what the server logs).

    The canonical form keeps role, flattened text, tool calls and tool call ids only, so an
    OpenAI and an Anthropic request carrying the same conversation share a fingerprint.
    """
    return _Conversation(messages, None).fingerprint(model)


class _Conversation:
    """What rules look at, computed once per request."""

    __slots__ = ("canonical", "chars", "last_role", "last_tool", "last_tool_result",
                 "last_user", "latest_tool_result", "offered_tools", "system", "tool_results")

    def __init__(self, messages: Sequence[Mapping[str, Any]],
                 tools: Sequence[Mapping[str, Any]] | None) -> None:
        canonical: list[dict[str, Any]] = []
        for message in messages:
            role = str(message.get("role", ""))
            entry: dict[str, Any] = {"role": "system" if role == "developer" else role,
                                     "content": flatten_text(message.get("content")) or None}
            calls = [_canonical_call(call) for call in message.get("tool_calls") or ()
                     if isinstance(call, Mapping)]
            if calls:
                entry["tool_calls"] = calls
            if message.get("tool_call_id") is not None:
                entry["tool_call_id"] = str(message["tool_call_id"])
            canonical.append(entry)
        self.canonical = canonical
        self.chars = sum(len(m["content"] or "") + sum(len(c["arguments"])
                                                       for c in m.get("tool_calls", ()))
                         for m in canonical)
        self.last_role = canonical[-1]["role"] if canonical else None
        self.last_user = next((m["content"] or "" for m in reversed(canonical)
                               if m["role"] == "user"), "")
        self.system = "\n".join(m["content"] or "" for m in canonical if m["role"] == "system")
        self.tool_results = sum(1 for m in canonical if m["role"] == "tool")
        self.latest_tool_result = next((m["content"] or "" for m in reversed(canonical)
                                        if m["role"] == "tool"), "")
        self.last_tool: str | None = None
        self.last_tool_result: str | None = None
        if canonical and canonical[-1]["role"] == "tool":
            last = canonical[-1]
            self.last_tool_result = last["content"] or ""
            call_id = last.get("tool_call_id")
            for message in reversed(canonical[:-1]):
                if message["role"] != "assistant":
                    continue
                for call in message.get("tool_calls", ()):
                    if call["id"] == call_id:
                        self.last_tool = call["name"]
                        break
                if self.last_tool is not None:
                    break
        self.offered_tools = frozenset(_tool_name(tool) for tool in tools or ()
                                       if isinstance(tool, Mapping))

    def fingerprint(self, model: str) -> str:
        return hashlib.sha256((model + canonical_json(self.canonical)).encode()).hexdigest()


def flatten_text(content: Any) -> str:
    """The text of a message's content: a string, or the text of its parts joined by lines."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        texts: list[str] = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, Mapping) and isinstance(part.get("text"), str):
                texts.append(part["text"])
        return "\n".join(texts)
    return str(content)


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no spaces: the form that is hashed."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _canonical_call(call: Mapping[str, Any]) -> dict[str, str]:
    function = call.get("function")
    function = function if isinstance(function, Mapping) else {}
    arguments = function.get("arguments", "")
    return {"id": str(call.get("id", "")), "name": str(function.get("name", "")),
            "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)}


def _tool_name(tool: Mapping[str, Any]) -> str:
    function = tool.get("function")
    if isinstance(function, Mapping) and "name" in function:
        return str(function["name"])
    return str(tool.get("name", ""))


def _render(rule: Rule, model: str, conversation: _Conversation) -> ScriptedReply:
    content = rule.content
    if content is not None:
        values = {"last_user": conversation.last_user,
                  "last_tool_result": conversation.latest_tool_result}
        # One pass over the rule's text: user text is inserted, never re-expanded.
        content = _TEMPLATE.sub(lambda m: values[m.group(1)], content)
    if content is None and not rule._calls:
        content = ""
    base = conversation.fingerprint(model)[:12]
    calls = tuple(ScriptedToolCall(id=f"call_{base}_{i}", name=name, arguments=arguments)
                  for i, (name, arguments) in enumerate(rule._calls))
    finish = rule.finish_reason or ("tool_calls" if calls else "stop")
    usage = rule.usage or {}
    out_chars = len(content or "") + sum(len(c.arguments) for c in calls)
    return ScriptedReply(
        content=content, tool_calls=calls, finish_reason=finish,
        input_tokens=usage.get("input_tokens", max(1, math.ceil(conversation.chars / 4))),
        output_tokens=usage.get("output_tokens", max(1, math.ceil(out_chars / 4))))


def _check_str(name: str, value: Any) -> None:
    if value is not None and not isinstance(value, str):
        raise ConfigurationError(f"key {name!r} must be a string, not {type(value).__name__}")


def _check_count(name: str, value: Any, *, minimum: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(f"key {name!r} must be an integer >= {minimum}, not {value!r}")


def _tool_call_specs(calls: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(calls, Sequence) or isinstance(calls, str):
        raise ConfigurationError("key 'tool_calls' must be a list of "
                                 "{\"name\": ..., \"arguments\": {...}}")
    specs: list[tuple[str, str]] = []
    for i, call in enumerate(calls):
        where = f"key 'tool_calls' [{i}]"
        if not isinstance(call, Mapping):
            raise ConfigurationError(f"{where} must be an object {{\"name\", \"arguments\"}}")
        unknown = [key for key in call if key not in ("name", "arguments")]
        if unknown:
            raise ConfigurationError(f"{where}: unknown key {unknown[0]!r}; a tool call has "
                                     "'name' and 'arguments'")
        name = call.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"{where}: 'name' must be a non-empty string")
        arguments = call.get("arguments", {})
        if isinstance(arguments, Mapping):
            arguments = json.dumps(dict(arguments))
        elif not isinstance(arguments, str):
            raise ConfigurationError(f"{where}: 'arguments' must be an object or JSON text, "
                                     f"not {type(arguments).__name__}")
        specs.append((name, arguments))
    return tuple(specs)


def _usage_spec(usage: Any) -> dict[str, int]:
    if not isinstance(usage, Mapping):
        raise ConfigurationError("key 'usage' must be an object "
                                 "{\"input_tokens\": int, \"output_tokens\": int}")
    spec: dict[str, int] = {}
    for key, value in usage.items():
        if key not in ("input_tokens", "output_tokens"):
            raise ConfigurationError(f"key 'usage.{key}': unknown; usage has 'input_tokens' "
                                     "and 'output_tokens'")
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigurationError(f"key 'usage.{key}' must be an integer >= 0, not {value!r}")
        spec[key] = value
    return spec

