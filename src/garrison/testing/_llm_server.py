"""The local OpenAI- and Anthropic-compatible LLM server: scripted replies, injected faults.

One `Script` answers both APIs (Anthropic requests are converted to the OpenAI chat shape
first, `_llm_wire`); `Faults` decide per request whether it fails and how. Served by
uvicorn (h11) on its own thread and event loop (`LLMServer`), or on the caller's loop
(`LLMServer.serve`, what `garrison llm-server` runs). The connection layer (one write per
loop pass, TCP_NODELAY, cutting a connection for a fault) is `_llm_transport`; measured
through `openai.AsyncOpenAI`, 300 sequential calls: see docs/llm-server.md.

This module holds `LLMServer`, `create_app`, the app's handlers, the state they share with
the owner's thread, and the responses that stall, cut or break an answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

try:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import Response
    from starlette.routing import Route
    from starlette.types import Receive, Scope, Send
except ImportError as exc:  # pragma: no cover - exercised without the extra installed
    raise ImportError("garrison.testing.LLMServer needs starlette and uvicorn: "
                      "pip install 'garrison[llm-server]'") from exc

from garrison._log import get_logger
from garrison.errors import ConfigurationError
from garrison.testing._faults import TERMINAL_KINDS, Fault, Faults
from garrison.testing._llm_transport import Connections, UvicornServer, protocol_class
from garrison.testing._llm_wire import (
    AnthropicWire,
    BadRequest,
    Call,
    OpenAIWire,
    Wire,
    break_arguments,
)
from garrison.testing._script import Script, ScriptedReply

__all__ = ["LLMServer", "create_app"]

log = get_logger(__name__)

_BACKLOG = 2048
_DEFAULT_MODEL = "garrison-test"
_JSON = b"application/json"
_SSE = b"text/event-stream; charset=utf-8"

_Handler = Callable[[Request], Awaitable[Response]]

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
        connections = Connections(tracked=True)
        app = _build_app(self._state, connections)
        config = uvicorn.Config(
            app, http=protocol_class(connections), lifespan="off", log_config=None,
            access_log=False, proxy_headers=False, server_header=False, date_header=False,
            backlog=_BACKLOG)

        def stopping() -> None:
            self._state.stopping.set()
            connections.abort_all()

        server = UvicornServer(config, stop=stop, ready=lambda: ready(self.url),
                                stopping=stopping)
        try:
            await server.serve(sockets=[sock])
        finally:
            sock.close()


def create_app(script: Script, faults: Faults) -> Starlette:
    """The server's Starlette app, to embed in your own ASGI server or test transport.

    Served elsewhere than `LLMServer`, the app cannot reach the TCP connection: a `reset`
    fault and a `truncate` cut raise `ConnectionAbortedError` inside the app instead. The
    ASGI server logs it as an application error and ends the exchange its own way (uvicorn
    answers 500 if nothing was sent yet, else drops the connection); `LLMServer` cuts the
    socket itself and logs nothing.
    """
    return _build_app(_State(script, faults, 0), Connections(tracked=False))


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

    def record(self, call: Call, outcome: str, fired: list[str]) -> int:
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


# -- the app


def _json_response(data: Any, status: int = 200, headers: Mapping[str, str] | None = None
                   ) -> Response:
    return Response(json.dumps(data, separators=(",", ":")).encode(), status_code=status,
                    headers=dict(headers or {}), media_type="application/json")


class _Cut(Response):
    """Ends the connection instead of answering: a RST (`reset=True`) or a FIN."""

    def __init__(self, connections: Connections, *, reset: bool) -> None:
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


class _NoAnswer(Response):
    """Sends nothing: the client is gone, there is no one to answer."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        return


class _PartialBody(Response):
    """Declares the whole body's length, sends its first half, closes the connection."""

    def __init__(self, connections: Connections, body: bytes) -> None:
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

    def __init__(self, state: _State, connections: Connections, events: list[bytes],
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


def _build_app(state: _State, connections: Connections) -> Starlette:
    async def answer(request: Request, wire: Wire) -> Response:
        try:
            call = wire.parse(json.loads(await request.body()))
        except (BadRequest, json.JSONDecodeError, UnicodeDecodeError) as exc:
            bad = Call.of(wire.api, "", [], [], stream=False, include_usage=False)
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
            reply = break_arguments(reply)
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
        return await answer(request, OpenAIWire)

    async def messages(request: Request) -> Response:
        return await answer(request, AnthropicWire)

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
        Route(path, _unless_gone(handler), methods=[method]) for path, handler, method in [
            ("/v1/chat/completions", chat_completions, "POST"),
            ("/chat/completions", chat_completions, "POST"),
            ("/v1/messages", messages, "POST"),
            ("/v1/models", models, "GET"),
            ("/_garrison/requests", control_requests, "GET"),
            ("/_garrison/faults", control_faults, "POST"),
            ("/_garrison/script", control_script, "POST"),
            ("/_garrison/reset", control_reset, "POST"),
        ]]
    return Starlette(routes=routes)


def _unless_gone(handler: _Handler) -> _Handler:
    """`handler`, answering nothing when the client left before its request arrived whole.

    starlette raises `ClientDisconnect` from `request.body()` then (a client killed or
    timed out mid-upload). That is the client's doing, not a bug of the server's, so it
    does not reach uvicorn, which would log it with a traceback as an application error;
    any other exception still does.
    """
    @functools.wraps(handler)
    async def handle(request: Request) -> Response:
        try:
            return await handler(request)
        except ClientDisconnect:
            log.debug("llm_server.client_gone", path=request.url.path)
            return _NoAnswer()

    return handle


def _status_response(wire: Wire, fault: Fault, call: Call, n: int) -> Response:
    code = fault.error_code
    if code == "context_length_exceeded" and wire is AnthropicWire:
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
