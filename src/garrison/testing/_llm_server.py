"""The local OpenAI- and Anthropic-compatible LLM server: scripted replies, injected faults.

One `Script` answers both APIs (Anthropic requests are converted to the OpenAI chat shape
first); `Faults` decide per request whether it fails and how. Served by uvicorn (h11) on
its own thread and event loop (`LLMServer`), or on the caller's loop (`LLMServer.serve`,
what `garrison llm-server` runs).

Latency: uvicorn writes a response's head and body in separate `transport.write` calls.
Each accepted socket gets TCP_NODELAY (asyncio sets it too; set here so it never depends
on that) and its transport is wrapped so every write made in one event-loop pass leaves
in one `send`: a plain answer is one segment on loopback. Measured through
`openai.AsyncOpenAI`, 300 sequential calls: see docs/llm-server.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

try:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route
    from starlette.types import Receive, Scope, Send
    from uvicorn.protocols.http.h11_impl import H11Protocol
except ImportError as exc:  # pragma: no cover - exercised without the extra installed
    raise ImportError("garrison.testing.LLMServer needs starlette and uvicorn: "
                      "pip install 'garrison[llm-server]'") from exc

from garrison._log import get_logger
from garrison.errors import ConfigurationError
from garrison.testing._faults import TERMINAL_KINDS, Fault, Faults
from garrison.testing._script import (
    Script,
    ScriptedReply,
    ScriptedToolCall,
    fingerprint,
    flatten_text,
)

__all__ = ["LLMServer", "create_app"]

log = get_logger(__name__)

# Linux caps this at net.core.somaxconn (4096 here); 100 simultaneous connects must queue.
_BACKLOG = 2048
_DEFAULT_MODEL = "garrison-test"
_JSON = b"application/json"
_SSE = b"text/event-stream; charset=utf-8"

FaultsLike = Faults | str | Sequence[Fault | Mapping[str, Any]] | None
ScriptLike = Script | Mapping[str, Any] | None


class LLMServer:
    """A local OpenAI/Anthropic-compatible server on its own thread and event loop.

    ```python
    with LLMServer({"rules": [{"last_user_contains": "hi", "content": "hello"}]},
                   faults="429:1x1@2") as server:
        client = openai.AsyncOpenAI(base_url=server.openai_base_url, api_key="test")
    ```

    Its loop is not the caller's, so a test's loop can block or be torn down freely;
    `async with` starts and stops it in a worker thread so the caller's loop never blocks.

    Args:
        script: replies (`Script` or its dict form); `None` answers "ok".
        faults: a `Faults`, a spec string (`Faults.parse`), or a list of faults.
        host: the address to listen on.
        port: the port; 0 picks a free one (read it from `url`).
        seed: seeds the faults' dice when `faults` is not a `Faults`.

    Raises:
        ConfigurationError: a bad script or fault spec.
    """

    def __init__(self, script: ScriptLike = None, *, faults: FaultsLike = None,
                 host: str = "127.0.0.1", port: int = 0, seed: int = 0) -> None:
        self._state = _State(_as_script(script), _as_faults(faults, seed), seed)
        self._host = host
        self._port = port
        self._address: tuple[str, int] | None = None
        self._used = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        """`http://HOST:PORT` of the running server.

        Raises:
            ConfigurationError: the server was never started.
        """
        if self._address is None:
            raise ConfigurationError("LLMServer.url: the server is not started; call start() "
                                     "or use `with LLMServer() as server:`")
        host, port = self._address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    @property
    def openai_base_url(self) -> str:
        """`base_url` for `openai.OpenAI`/`AsyncOpenAI`: `url + "/v1"`."""
        return self.url + "/v1"

    @property
    def anthropic_base_url(self) -> str:
        """`base_url` for `anthropic.Anthropic`/`AsyncAnthropic`: `url`."""
        return self.url

    def start(self) -> LLMServer:
        """Start serving on a new thread; returns once connections are accepted.

        Raises:
            ConfigurationError: already started once, or the address cannot be bound.
        """
        sock = self._claim_and_bind()
        ready = threading.Event()

        async def run() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            await self._serve(sock, self._stop, lambda _url: ready.set())

        def main() -> None:
            try:
                asyncio.run(run())
            except Exception as exc:  # handed to the owner's thread by start()/stop()
                self._error = exc
            finally:
                ready.set()

        self._thread = threading.Thread(target=main, name=f"garrison-llm-server-{self.url}",
                                        daemon=True)
        self._thread.start()
        if not ready.wait(timeout=30.0) or not self._thread.is_alive():
            self._thread.join(timeout=5.0)
            error = self._error
            raise ConfigurationError(f"LLMServer on {self.url} did not start: "
                                     f"{error or 'no answer within 30 s'}") from error
        log.debug("llm_server.started", url=self.url)
        return self

    def stop(self) -> None:
        """Stop serving: in-flight requests are cut off, their connections closed.

        Raises:
            Exception: whatever made the server's thread fail while serving.
        """
        thread, loop, stop = self._thread, self._loop, self._stop
        if thread is None or loop is None or stop is None:
            return
        if thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(stop.set)
            thread.join(timeout=30.0)
        self._thread = None
        log.debug("llm_server.stopped", url=self.url)
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    async def serve(self, stop: asyncio.Event, *,
                    ready: Callable[[str], None] | None = None) -> None:
        """Serve on the running loop until `stop` is set (what `garrison llm-server` runs).

        Args:
            stop: set it to stop serving.
            ready: called with `url` once connections are accepted.

        Raises:
            ConfigurationError: already started once, or the address cannot be bound.
        """
        sock = self._claim_and_bind()
        await self._serve(sock, stop, ready or (lambda _url: None))

    def requests(self) -> list[dict[str, Any]]:
        """The request log in arrival order (the shape `GET /_garrison/requests` returns)."""
        return self._state.requests()

    def set_faults(self, faults: FaultsLike) -> None:
        """Replace the faults (`None` or `[]` clears them); takes effect for the next request.

        Raises:
            ConfigurationError: a bad fault spec.
        """
        self._state.faults = _as_faults(faults, self._state.seed)

    def set_script(self, script: Script | Mapping[str, Any]) -> None:
        """Replace the script; takes effect for the next request.

        Raises:
            ConfigurationError: a bad script.
        """
        self._state.script = _as_script(script)

    def reset(self) -> None:
        """Clear the request log (numbering restarts at 1) and the script's `times` counters."""
        self._state.reset()

    def __enter__(self) -> LLMServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    async def __aenter__(self) -> LLMServer:
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await asyncio.to_thread(self.stop)

    def _claim_and_bind(self) -> socket.socket:
        if self._used:
            raise ConfigurationError("LLMServer: already started once; create a new LLMServer "
                                     "to serve again")
        self._used = True
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # Accepted sockets inherit it on Linux; each one is also set in connection_made.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.bind((self._host, self._port))
            sock.listen(_BACKLOG)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise ConfigurationError(f"LLMServer: cannot listen on {self._host}:{self._port}: "
                                     f"{exc}; pick another --port or host") from exc
        name = sock.getsockname()
        self._address = (str(name[0]), int(name[1]))
        return sock

    async def _serve(self, sock: socket.socket, stop: asyncio.Event,
                     ready: Callable[[str], None]) -> None:
        connections = _Connections(tracked=True)
        app = _build_app(self._state, connections)
        config = uvicorn.Config(
            app, http=_protocol_class(connections), lifespan="off", log_config=None,
            access_log=False, proxy_headers=False, server_header=False, date_header=False,
            backlog=_BACKLOG)

        def stopping() -> None:
            self._state.stopping.set()
            connections.abort_all()

        server = _UvicornServer(config, stop=stop, ready=lambda: ready(self.url),
                                stopping=stopping)
        try:
            await server.serve(sockets=[sock])
        finally:
            sock.close()


def create_app(script: Script, faults: Faults) -> Starlette:
    """The server's Starlette app, to embed in your own ASGI server or test transport.

    Served elsewhere than `LLMServer`, the app cannot reach the TCP connection: a `reset`
    fault and a `truncate` cut raise `ConnectionAbortedError` inside the app instead, which
    the ASGI server turns into a dropped connection.
    """
    return _build_app(_State(script, faults, 0), _Connections(tracked=False))


# -- connections: one write per loop pass, and a way for a fault to cut the TCP connection


class _BatchingTransport(asyncio.Transport):
    """Gathers the writes made during one event-loop pass into one `send`.

    uvicorn writes the status line and headers, then the body, then the end of message;
    three small segments invite the peer's delayed ACK (≈ 40 ms) when Nagle is on.
    """

    def __init__(self, inner: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._inner = inner
        self._loop = loop
        self._pending: list[bytes] = []
        self._closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed or not data:
            return
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(bytes(data))

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def _flush(self) -> None:
        if self._pending and not self._closed:
            data = b"".join(self._pending)
            self._pending.clear()
            self._inner.write(data)

    def close(self) -> None:
        if not self._closed:
            self._flush()
            self._closed = True
            self._inner.close()

    def abort(self) -> None:
        self._closed = True
        self._pending.clear()
        self._inner.abort()

    def is_closing(self) -> bool:
        return self._closed or self._inner.is_closing()

    def write_eof(self) -> None:
        self._flush()
        self._inner.write_eof()

    def can_write_eof(self) -> bool:
        return self._inner.can_write_eof()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._inner.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self._inner.pause_reading()

    def resume_reading(self) -> None:
        self._inner.resume_reading()

    def is_reading(self) -> bool:
        return self._inner.is_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._inner.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._inner.get_write_buffer_size() + sum(len(d) for d in self._pending)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._inner.get_write_buffer_limits()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._inner.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._inner.get_protocol()


@dataclass(slots=True)
class _Connection:
    transport: _BatchingTransport
    closed: asyncio.Event

    async def cut(self, *, reset: bool) -> None:
        """Close the connection now: gracefully (FIN after what was written) or with a RST."""
        if reset:
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                # Linger 0: close() sends a RST instead of a FIN.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.transport.abort()
        else:
            self.transport.close()
        # Wait for the protocol to see it, so the ASGI server does not answer after us.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5.0):
                await self.closed.wait()


class _Connections:
    """Open connections by peer address (the ASGI scope's `client`)."""

    def __init__(self, *, tracked: bool) -> None:
        # False when the app runs under another ASGI server: no connection is ever known.
        self.tracked = tracked
        self._by_peer: dict[tuple[str, int], _Connection] = {}

    def add(self, peer: tuple[str, int], transport: _BatchingTransport) -> None:
        self._by_peer[peer] = _Connection(transport, asyncio.Event())

    def discard(self, peer: tuple[str, int]) -> None:
        connection = self._by_peer.pop(peer, None)
        if connection is not None:
            connection.closed.set()

    def get(self, scope: Scope) -> _Connection | None:
        client = scope.get("client")
        return self._by_peer.get((str(client[0]), int(client[1]))) if client else None

    def abort_all(self) -> None:
        for connection in list(self._by_peer.values()):
            connection.transport.abort()


def _protocol_class(connections: _Connections) -> type[H11Protocol]:
    class _Protocol(H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # uvicorn's own signature
            sock = transport.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            batching = _BatchingTransport(transport, self.loop)
            super().connection_made(batching)
            if self.client is not None:
                connections.add(self.client, batching)

        def connection_lost(self, exc: Exception | None) -> None:
            if self.client is not None:
                connections.discard(self.client)
            super().connection_lost(exc)

    return _Protocol


class _UvicornServer(uvicorn.Server):
    """uvicorn's server, stopped by an event instead of its 100 ms polling loop."""

    def __init__(self, config: uvicorn.Config, *, stop: asyncio.Event,
                 ready: Callable[[], None], stopping: Callable[[], None]) -> None:
        super().__init__(config)
        self._stop_event = stop
        self._ready = ready
        self._stopping = stopping

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The owner handles signals: the CLI through its loop; a thread cannot have any.
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            self._ready()

    async def main_loop(self) -> None:
        await self._stop_event.wait()
        self._stopping()


# -- state shared by the app's handlers and the owner's thread


class _State:
    def __init__(self, script: Script, faults: Faults, seed: int) -> None:
        self.script = script
        self.faults = faults
        self.seed = seed
        # Wakes every injected pause when the server stops; used on the server's loop only.
        self.stopping = asyncio.Event()
        self._log: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def record(self, call: _Call, outcome: str, fired: list[str]) -> int:
        with self._lock:
            n = len(self._log) + 1
            self._log.append({
                "n": n, "api": call.api, "model": call.model, "stream": call.stream,
                "outcome": outcome, "faults": fired, "fingerprint": call.fingerprint,
                "last_user": call.last_user, "messages": len(call.messages), "at": time.time(),
            })
            return n

    def requests(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(entry, faults=list(entry["faults"])) for entry in self._log]

    def reset(self) -> None:
        with self._lock:
            self._log.clear()
        self.script.reset()


@dataclass(frozen=True, slots=True)
class _Call:
    """One chat request, in the neutral (OpenAI chat) shape the script reads."""

    api: str
    model: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]]
    stream: bool
    include_usage: bool
    fingerprint: str
    last_user: str

    @classmethod
    def of(cls, api: str, model: str, messages: list[dict[str, Any]],
           tools: list[dict[str, Any]], *, stream: bool, include_usage: bool) -> _Call:
        last_user = next((flatten_text(m.get("content")) for m in reversed(messages)
                          if m.get("role") == "user"), "")
        return cls(api, model, messages, tools, stream, include_usage,
                   fingerprint(model, messages), last_user)


class _BadRequest(Exception):
    """The request body is not a chat request; the message says what is wrong."""


# -- the two wire formats


class _OpenAIWire:
    api = "openai"

    @staticmethod
    def parse(body: Any) -> _Call:
        if not isinstance(body, dict):
            raise _BadRequest("the body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise _BadRequest("'model' must be a non-empty string")
        messages = body.get("messages")
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m
                                                     for m in messages):
            raise _BadRequest("'messages' must be a list of message objects with a 'role'")
        tools = body.get("tools") or []
        if not isinstance(tools, list):
            raise _BadRequest("'tools' must be a list")
        options = body.get("stream_options")
        return _Call.of("openai", model, messages, [t for t in tools if isinstance(t, dict)],
                        stream=bool(body.get("stream")),
                        include_usage=isinstance(options, dict)
                        and bool(options.get("include_usage")))

    @staticmethod
    def response_id(fingerprint: str, n: int) -> str:
        return f"chatcmpl-{fingerprint[:16]}{n:04d}"

    @staticmethod
    def completion(reply: ScriptedReply, call: _Call, rid: str) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": reply.content,
                                   "refusal": None}
        if reply.tool_calls:
            message["tool_calls"] = [
                {"id": c.id, "type": "function",
                 "function": {"name": c.name, "arguments": c.arguments}}
                for c in reply.tool_calls]
        return {
            "id": rid, "object": "chat.completion", "created": int(time.time()),
            "model": call.model, "system_fingerprint": "garrison-llm-server",
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": reply.finish_reason}],
            "usage": _openai_usage(reply),
        }

    @staticmethod
    def stream_events(reply: ScriptedReply, call: _Call, rid: str) -> list[bytes]:
        created = int(time.time())

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            data: dict[str, Any] = {
                "id": rid, "object": "chat.completion.chunk", "created": created,
                "model": call.model, "system_fingerprint": "garrison-llm-server",
                "choices": [{"index": 0, "delta": delta, "logprobs": None,
                             "finish_reason": finish}]}
            if call.include_usage:
                data["usage"] = None
            return _data_line(data)

        events = [chunk({"role": "assistant", "content": "", "refusal": None})]
        events += [chunk({"content": piece}) for piece in _pieces(reply.content or "")]
        for index, tool_call in enumerate(reply.tool_calls):
            events.append(chunk({"tool_calls": [{
                "index": index, "id": tool_call.id, "type": "function",
                "function": {"name": tool_call.name, "arguments": ""}}]}))
            events += [chunk({"tool_calls": [{"index": index, "function": {"arguments": p}}]})
                       for p in _pieces(tool_call.arguments, words=False)]
        events.append(chunk({}, reply.finish_reason))
        if call.include_usage:
            events.append(_data_line({
                "id": rid, "object": "chat.completion.chunk", "created": created,
                "model": call.model, "system_fingerprint": "garrison-llm-server",
                "choices": [], "usage": _openai_usage(reply)}))
        events.append(b"data: [DONE]\n\n")
        return events

    @staticmethod
    def broken_event() -> bytes:
        return b'data: {"id": "chatcmpl-broken", "choices": [{"delta": {"content": \n\n'

    @staticmethod
    def error(status: int, message: str, code: str | None) -> dict[str, Any]:
        kind, default_code = _OPENAI_ERRORS.get(status, (
            "server_error" if status >= 500 else "invalid_request_error", None))
        return {"error": {"message": message, "type": kind, "param": None,
                          "code": code or default_code}}


class _AnthropicWire:
    api = "anthropic"

    @staticmethod
    def parse(body: Any) -> _Call:
        if not isinstance(body, dict):
            raise _BadRequest("the body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise _BadRequest("model: Field required (a non-empty string)")
        raw = body.get("messages")
        if not isinstance(raw, list) or not all(isinstance(m, dict) and "role" in m
                                                for m in raw):
            raise _BadRequest("messages: must be a list of {role, content} objects")
        messages: list[dict[str, Any]] = []
        system = body.get("system")
        if system:
            messages.append({"role": "system", "content": flatten_text(system)})
        for message in raw:
            messages += _anthropic_message(message)
        tools = body.get("tools") or []
        if not isinstance(tools, list):
            raise _BadRequest("tools: must be a list")
        neutral_tools = [{"type": "function", "function": {
            "name": str(t.get("name", "")), "description": t.get("description", ""),
            "parameters": t.get("input_schema", {})}} for t in tools if isinstance(t, dict)]
        return _Call.of("anthropic", model, messages, neutral_tools,
                        stream=bool(body.get("stream")), include_usage=False)

    @staticmethod
    def response_id(fingerprint: str, n: int) -> str:
        return f"msg_{fingerprint[:16]}{n:04d}"

    @staticmethod
    def completion(reply: ScriptedReply, call: _Call, rid: str) -> dict[str, Any]:
        content: list[dict[str, Any]] = []
        if reply.content or not reply.tool_calls:
            content.append({"type": "text", "text": reply.content or ""})
        content += [{"type": "tool_use", "id": c.id, "name": c.name,
                     "input": _tool_input(c.arguments)} for c in reply.tool_calls]
        return {"id": rid, "type": "message", "role": "assistant", "model": call.model,
                "content": content, "stop_reason": _STOP_REASONS[reply.finish_reason],
                "stop_sequence": None,
                "usage": {"input_tokens": reply.input_tokens,
                          "output_tokens": reply.output_tokens}}

    @staticmethod
    def stream_events(reply: ScriptedReply, call: _Call, rid: str) -> list[bytes]:
        events = [_event("message_start", {"type": "message_start", "message": {
            "id": rid, "type": "message", "role": "assistant", "model": call.model,
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": reply.input_tokens, "output_tokens": 1}}}),
            _event("ping", {"type": "ping"})]
        index = 0
        if reply.content or not reply.tool_calls:
            events.append(_event("content_block_start", {
                "type": "content_block_start", "index": index,
                "content_block": {"type": "text", "text": ""}}))
            events += [_event("content_block_delta", {
                "type": "content_block_delta", "index": index,
                "delta": {"type": "text_delta", "text": piece}})
                for piece in _pieces(reply.content or "")]
            events.append(_event("content_block_stop",
                                 {"type": "content_block_stop", "index": index}))
            index += 1
        for tool_call in reply.tool_calls:
            events.append(_event("content_block_start", {
                "type": "content_block_start", "index": index,
                "content_block": {"type": "tool_use", "id": tool_call.id,
                                  "name": tool_call.name, "input": {}}}))
            events += [_event("content_block_delta", {
                "type": "content_block_delta", "index": index,
                "delta": {"type": "input_json_delta", "partial_json": piece}})
                for piece in _pieces(tool_call.arguments, words=False)]
            events.append(_event("content_block_stop",
                                 {"type": "content_block_stop", "index": index}))
            index += 1
        events.append(_event("message_delta", {
            "type": "message_delta",
            "delta": {"stop_reason": _STOP_REASONS[reply.finish_reason], "stop_sequence": None},
            "usage": {"output_tokens": reply.output_tokens}}))
        events.append(_event("message_stop", {"type": "message_stop"}))
        return events

    @staticmethod
    def broken_event() -> bytes:
        return (b'event: content_block_delta\n'
                b'data: {"type": "content_block_delta", "index": 0, "delta": {\n\n')

    @staticmethod
    def error(status: int, message: str, code: str | None) -> dict[str, Any]:
        kind = _ANTHROPIC_ERRORS.get(status, "api_error" if status >= 500
                                     else "invalid_request_error")
        return {"type": "error", "error": {"type": kind, "message": message}}


_Wire = type[_OpenAIWire] | type[_AnthropicWire]

_OPENAI_ERRORS: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "unsupported_country_region_territory"),
    404: ("invalid_request_error", "model_not_found"),
    429: ("requests", "rate_limit_exceeded"),
    500: ("server_error", None),
    502: ("server_error", "bad_gateway"),
    503: ("server_error", "service_unavailable"),
}
_ANTHROPIC_ERRORS = {400: "invalid_request_error", 401: "authentication_error",
                     403: "permission_error", 404: "not_found_error",
                     413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
                     503: "overloaded_error", 529: "overloaded_error"}
_STOP_REASONS = {"stop": "end_turn", "tool_calls": "tool_use", "length": "max_tokens",
                 "content_filter": "refusal"}


def _anthropic_message(message: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One Anthropic message as OpenAI-shaped messages (tool results become tool messages)."""
    role = str(message.get("role"))
    content = message.get("content")
    if not isinstance(content, list):
        return [{"role": role, "content": flatten_text(content)}]
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for block in content:
        if not isinstance(block, Mapping):
            continue
        kind = block.get("type")
        if kind == "text":
            texts.append(str(block.get("text", "")))
        elif kind == "tool_use":
            calls.append({"id": str(block.get("id", "")), "type": "function", "function": {
                "name": str(block.get("name", "")),
                "arguments": json.dumps(block.get("input", {}))}})
        elif kind == "tool_result":
            results.append({"role": "tool", "tool_call_id": str(block.get("tool_use_id", "")),
                            "content": flatten_text(block.get("content"))})
    if role == "assistant":
        entry: dict[str, Any] = {"role": "assistant", "content": "\n".join(texts) or None}
        if calls:
            entry["tool_calls"] = calls
        return [entry]
    return results + ([{"role": role, "content": "\n".join(texts)}] if texts else [])


def _tool_input(arguments: str) -> Any:
    # Anthropic sends tool input as an object; text that is not JSON is sent as a string.
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments


def _openai_usage(reply: ScriptedReply) -> dict[str, int]:
    return {"prompt_tokens": reply.input_tokens, "completion_tokens": reply.output_tokens,
            "total_tokens": reply.input_tokens + reply.output_tokens}


def _data_line(data: Any) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def _event(name: str, data: Any) -> bytes:
    return (f"event: {name}\ndata: ".encode() + json.dumps(data, separators=(",", ":")).encode()
            + b"\n\n")


def _pieces(text: str, *, words: bool = True, minimum: int = 4) -> list[str]:
    """Split text for streaming: by words when there are enough, else in `minimum` slices."""
    if not text:
        return []
    if words:
        parts = [p for p in re.findall(r"\S*\s*", text) if p]
        if len(parts) >= minimum:
            return parts
    size = max(1, math.ceil(len(text) / minimum))
    return [text[i:i + size] for i in range(0, len(text), size)]


def _break_arguments(reply: ScriptedReply) -> ScriptedReply:
    """Tool call arguments cut in half and ended by an invalid escape: invalid JSON for
    `json.loads` and for partial parsers (Anthropic's SDK reads tool input leniently)."""
    def broken(call: ScriptedToolCall) -> ScriptedToolCall:
        half = call.arguments[: len(call.arguments) // 2].rstrip("\\")
        return dataclasses.replace(call, arguments=half + "\\x")

    return dataclasses.replace(reply, tool_calls=tuple(broken(c) for c in reply.tool_calls))


# -- the app


def _json_response(data: Any, status: int = 200, headers: Mapping[str, str] | None = None
                   ) -> Response:
    return Response(json.dumps(data, separators=(",", ":")).encode(), status_code=status,
                    headers=dict(headers or {}), media_type="application/json")


class _Cut(Response):
    """Ends the connection instead of answering: a RST (`reset=True`) or a FIN."""

    def __init__(self, connections: _Connections, *, reset: bool) -> None:
        super().__init__()
        self._connections = connections
        self._reset = reset

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        connection = self._connections.get(scope)
        if connection is not None:
            await connection.cut(reset=self._reset)
        elif not self._connections.tracked:
            raise ConnectionAbortedError("garrison llm-server: injected connection cut (the "
                                         "app runs outside LLMServer, which owns the sockets)")
        # Else the connection is already gone (the client left, or the server is stopping).


class _PartialBody(Response):
    """Declares the whole body's length, sends its first half, closes the connection."""

    def __init__(self, connections: _Connections, body: bytes) -> None:
        super().__init__()
        self._connections = connections
        self._whole = body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", _JSON), (b"content-length", str(len(self._whole)).encode())]})
        await send({"type": "http.response.body", "body": self._whole[: len(self._whole) // 2],
                    "more_body": True})
        await _Cut(self._connections, reset=False)(scope, receive, send)


class _EventStream(Response):
    """Server-sent events, each in its own write; a stall, cut or broken event midway."""

    def __init__(self, state: _State, connections: _Connections, events: list[bytes],
                 fault: Fault | None, broken_event: bytes) -> None:
        super().__init__()
        self._state = state
        self._connections = connections
        self._events = events
        self._fault = fault
        self._broken = broken_event
        # Midway: after the first half of the events, before the final one (or [DONE]).
        self._cut = max(1, len(events) // 2)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", _SSE), (b"cache-control", b"no-cache")]})
        kind = self._fault.kind if self._fault is not None else None
        for index, event in enumerate(self._events):
            if index == self._cut and self._fault is not None:
                if kind == "stall" and not await _pause(self._state, self._fault.seconds):
                    await _Cut(self._connections, reset=False)(scope, receive, send)
                    return
                if kind == "truncate":
                    await _Cut(self._connections, reset=False)(scope, receive, send)
                    return
                if kind == "malformed":
                    await send({"type": "http.response.body", "body": self._broken,
                                "more_body": True})
            await send({"type": "http.response.body", "body": event, "more_body": True})
            # Yield so the batching transport sends this event now, as a real stream does.
            await asyncio.sleep(0)
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _pause(state: _State, seconds: float) -> bool:
    """Sleep `seconds`; False if the server began stopping meanwhile."""
    if state.stopping.is_set():
        return False
    try:
        async with asyncio.timeout(seconds):
            await state.stopping.wait()
    except TimeoutError:
        return True
    return False


def _build_app(state: _State, connections: _Connections) -> Starlette:
    async def answer(request: Request, wire: _Wire) -> Response:
        try:
            call = wire.parse(json.loads(await request.body()))
        except (_BadRequest, json.JSONDecodeError, UnicodeDecodeError) as exc:
            bad = _Call.of(wire.api, "", [], [], stream=False, include_usage=False)
            state.record(bad, "status:400", [])
            message = f"garrison llm-server: not a chat request: {exc}"
            return _json_response(wire.error(400, message, None), 400)

        faults = state.faults.pick(wire.api, call.model, call.stream)
        decider = next((f for f in faults if f.kind in TERMINAL_KINDS), None)
        kind = decider.kind if decider is not None else None
        reply: ScriptedReply | None = None
        if kind not in ("status", "reset", "timeout"):
            # A reply the client never gets intact leaves `times` rules unspent.
            reply = state.script.reply(call.model, call.messages, call.tools,
                                       consume=kind in (None, "stall"))
        breaks_args = any(f.kind == "bad_args" for f in faults)
        if decider is not None:
            outcome = decider.outcome
        elif breaks_args and reply is not None and reply.tool_calls:
            outcome = "bad_args"
        else:
            outcome = "ok"
        # Logged before answering: a client that crashes on the answer does not lose it.
        n = state.record(call, outcome, [f.outcome for f in faults])
        if faults:
            log.debug("llm_server.fault", n=n, api=wire.api, model=call.model, outcome=outcome)

        delay_s = state.faults.delay_s(faults)
        if delay_s > 0 and not await _pause(state, delay_s):
            return _Cut(connections, reset=False)
        if decider is not None and kind == "status":
            return _status_response(wire, decider, call, n)
        if kind == "reset":
            return _Cut(connections, reset=True)
        if decider is not None and (kind == "timeout" or (kind == "stall" and not call.stream)):
            if not await _pause(state, decider.seconds):
                return _Cut(connections, reset=False)
            if reply is None:
                reply = state.script.reply(call.model, call.messages, call.tools,
                                           consume=not await request.is_disconnected())
        assert reply is not None  # every path without a reply has returned
        if breaks_args and reply.tool_calls:
            reply = _break_arguments(reply)
        rid = wire.response_id(call.fingerprint, n)
        headers = {"x-request-id": f"req_{n}", "request-id": f"req_{n}"}
        if call.stream:
            stream_fault = decider if kind in ("stall", "truncate", "malformed") else None
            return _EventStream(state, connections, wire.stream_events(reply, call, rid),
                                stream_fault, wire.broken_event())
        body = json.dumps(wire.completion(reply, call, rid), separators=(",", ":")).encode()
        if kind == "malformed":
            return Response(body[: len(body) // 2], headers=headers,
                            media_type="application/json")
        if kind == "truncate":
            return _PartialBody(connections, body)
        return Response(body, headers=headers, media_type="application/json")

    async def chat_completions(request: Request) -> Response:
        return await answer(request, _OpenAIWire)

    async def messages(request: Request) -> Response:
        return await answer(request, _AnthropicWire)

    async def models(request: Request) -> Response:
        names = [*state.script.models, _DEFAULT_MODEL]
        if "anthropic-version" in request.headers:
            data = [{"type": "model", "id": name, "display_name": name,
                     "created_at": "2025-01-01T00:00:00Z"} for name in names]
            return _json_response({"data": data, "has_more": False, "first_id": names[0],
                                   "last_id": names[-1]})
        return _json_response({"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "garrison"}
            for name in names]})

    async def control_requests(request: Request) -> Response:
        return _json_response({"requests": state.requests()})

    async def control_faults(request: Request) -> Response:
        try:
            body = await _control_body(request)
            seed = body.get("seed", state.seed)
            if "spec" in body and isinstance(body["spec"], str) and "faults" not in body:
                state.faults = Faults.parse(body["spec"], seed=seed)
            elif "faults" in body and "spec" not in body:
                state.faults = Faults(body["faults"], seed=seed)
            else:
                raise ConfigurationError('POST /_garrison/faults takes {"spec": "429:0.2,..."} '
                                         'or {"faults": [{"kind": ...}, ...]}')
        except ConfigurationError as exc:
            return _json_response({"error": {"message": str(exc)}}, 400)
        return _json_response({"faults": [dataclasses.asdict(f) for f in state.faults.faults]})

    async def control_script(request: Request) -> Response:
        try:
            state.script = Script.from_dict(await _control_body(request))
        except ConfigurationError as exc:
            return _json_response({"error": {"message": str(exc)}}, 400)
        return _json_response({"rules": len(state.script.rules)})

    async def control_reset(request: Request) -> Response:
        state.reset()
        return _json_response({"reset": True})

    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/messages", messages, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/_garrison/requests", control_requests, methods=["GET"]),
        Route("/_garrison/faults", control_faults, methods=["POST"]),
        Route("/_garrison/script", control_script, methods=["POST"]),
        Route("/_garrison/reset", control_reset, methods=["POST"]),
    ]
    return Starlette(routes=routes)


def _status_response(wire: _Wire, fault: Fault, call: _Call, n: int) -> Response:
    code = fault.error_code
    if code == "context_length_exceeded" and wire is _AnthropicWire:
        message = "prompt is too long (injected by garrison llm-server: context_length_exceeded)"
    else:
        message = (f"garrison llm-server: injected fault: HTTP {fault.status} for model "
                   f"{call.model!r}" + (f" ({code})" if code else ""))
    headers = {"x-request-id": f"req_{n}", "request-id": f"req_{n}"}
    if fault.retry_after is not None:
        headers["retry-after"] = f"{fault.retry_after:g}"
        headers["retry-after-ms"] = str(round(fault.retry_after * 1000))
    return _json_response(wire.error(fault.status, message, code), fault.status, headers)


async def _control_body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"{request.url.path}: the body is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise ConfigurationError(f"{request.url.path}: the body must be a JSON object")
    return body


def _as_script(script: ScriptLike) -> Script:
    if script is None:
        return Script()
    if isinstance(script, Script):
        return script
    return Script.from_dict(script)


def _as_faults(faults: FaultsLike, seed: int) -> Faults:
    if faults is None:
        return Faults(seed=seed)
    if isinstance(faults, Faults):
        return faults
    if isinstance(faults, str):
        return Faults.parse(faults, seed=seed)
    return Faults(faults, seed=seed)

