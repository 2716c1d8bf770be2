"""The LLM server's connection layer: one write per loop pass, and faults that cut a TCP
connection.

uvicorn writes a response's head and body in separate `transport.write` calls. Each
accepted socket gets TCP_NODELAY (asyncio sets it too; set here so it never depends on
that) and its transport is wrapped so every write made in one event-loop pass leaves in
one `send`: a plain answer is one segment on loopback. `Connections` maps an ASGI scope's
peer to its transport, so a `reset` or `truncate` fault can close the real socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

try:
    import uvicorn
    from starlette.types import Scope
    from uvicorn.protocols.http.h11_impl import H11Protocol
except ImportError as exc:  # pragma: no cover - exercised without the extra installed
    raise ImportError("garrison.testing.LLMServer needs starlette and uvicorn: "
                      "pip install 'garrison[llm-server]'") from exc

__all__ = ["BatchingTransport", "Connection", "Connections", "UvicornServer", "protocol_class"]


class BatchingTransport(asyncio.Transport):
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
class Connection:
    """One accepted connection: its transport, and an event set once it is lost."""

    transport: BatchingTransport
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


class Connections:
    """Open connections by peer address (the ASGI scope's `client`)."""

    def __init__(self, *, tracked: bool) -> None:
        # False when the app runs under another ASGI server: no connection is ever known.
        self.tracked = tracked
        self._by_peer: dict[tuple[str, int], Connection] = {}

    def add(self, peer: tuple[str, int], transport: BatchingTransport) -> None:
        self._by_peer[peer] = Connection(transport, asyncio.Event())

    def discard(self, peer: tuple[str, int]) -> None:
        connection = self._by_peer.pop(peer, None)
        if connection is not None:
            connection.closed.set()

    def get(self, scope: Scope) -> Connection | None:
        client = scope.get("client")
        return self._by_peer.get((str(client[0]), int(client[1]))) if client else None

    def abort_all(self) -> None:
        for connection in list(self._by_peer.values()):
            connection.transport.abort()


def protocol_class(connections: Connections) -> type[H11Protocol]:
    class _Protocol(H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # uvicorn's own signature
            sock = transport.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            batching = BatchingTransport(transport, self.loop)
            super().connection_made(batching)
            if self.client is not None:
                connections.add(self.client, batching)

        def connection_lost(self, exc: Exception | None) -> None:
            if self.client is not None:
                connections.discard(self.client)
            super().connection_lost(exc)

    return _Protocol


class UvicornServer(uvicorn.Server):
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
