"""uvicorn's HTTP protocol with the bounds the contract sets on connections.

uvicorn's httptools protocol has no limit on the size of a request head, no deadline for it, and
accepts every connection (its `limit_concurrency` answers 503 only once a request arrives, so
silent sockets still pile up). This subclass adds, per connection:

- a deadline for the whole request head (`GATEWAY_HEADER_TIMEOUT_SECONDS`), from the connection
  (or the first byte of a keep-alive request) to the end of the headers; past it the socket closes;
- a bound of 64 KiB on the head: counted on the raw bytes while it arrives (so a 50 MB header is
  never buffered) and on the parsed request line and headers; past it `431 {"message"}`;
- a cap on the connections a process holds (`GATEWAY_MAX_CONNECTIONS`, WebSockets included,
  as uvicorn keeps upgraded sockets in the same set): past it a new one is answered `503` and
  closed at once rather than held;
- a backstop for bodies that nobody reads: `RequestLimitsMiddleware` answers `408` to a route that
  reads a slow body; a body still arriving after its deadline plus a grace, once the answer was
  sent or while nothing reads it, has its connection closed;
- framing errors answered `400 {"message"}` instead of uvicorn's plain text.

Idle keep-alive connections are closed by uvicorn itself (`timeout_keep_alive`).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from app.settings import Settings

__all__ = ["MAX_HEAD_BYTES", "ConnectionLimits", "GatewayHttpProtocol", "uvicorn_options"]

MAX_HEAD_BYTES = 64 * 1024
_BODY_GRACE_SECONDS = 1.0  # the middleware's 408 comes first; this only catches unread bodies


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout: float
    body_timeout: float
    max_connections: int
    max_head_bytes: int = MAX_HEAD_BYTES


class _HeadTooLarge(Exception):
    pass


def _raw_answer(status: int, message: str) -> bytes:
    body = orjson.dumps({"message": message})
    return b"".join(
        [
            STATUS_LINE[status],
            b"content-type: application/json\r\n",
            b"content-length: " + str(len(body)).encode() + b"\r\n",
            b"connection: close\r\n\r\n",
            body,
        ]
    )


_HOLD_AT_MOST = 64 * 1024  # bytes held before they are written without waiting for the end


class _CoalescingTransport:
    """The connection's transport, with the writes of one loop iteration sent as one.

    uvicorn writes a response's head and its body separately: two `send` calls and, on loopback,
    two segments for one small answer. Held until the end of the iteration, they leave
    together (as do the answers of pipelined requests). Anything that ends the connection
    sends what is held first (`close`) or drops it (`abort`, as the transport would).
    """

    __slots__ = ("_held", "_loop", "_size", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: list[bytes] = []
        self._size = 0

    def write(self, data: bytes) -> None:
        if not self._held:
            self._loop.call_soon(self._flush)
            self._size = 0
        self._held.append(data)
        self._size += len(data)
        if self._size > _HOLD_AT_MOST:
            # A producer writing a lot without yielding: the transport's own buffer and its
            # flow control (pause_writing) take over, as without this layer.
            self._flush()

    def writelines(self, lines: Iterable[bytes]) -> None:
        self.write(b"".join(lines))

    def _flush(self) -> None:
        held, self._held = self._held, []
        if held and not self._transport.is_closing():
            self._transport.write(held[0] if len(held) == 1 else b"".join(held))

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        self._held = []
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class GatewayHttpProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._in_head = True
        self._awaiting_body = False
        self._raw_head_bytes = 0
        self._parsed_head_bytes = 0

    # Connections ------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        transport = cast(asyncio.Transport, _CoalescingTransport(transport, self.loop))
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self.connections.discard(self)
            transport.write(_raw_answer(503, "the server holds too many connections; retry later"))
            transport.close()
            return
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def _cancel_timers(self) -> None:
        for timer in (self._head_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = None

    def _close(self) -> None:
        if not self.transport.is_closing():
            self.transport.close()

    # The request head -------------------------------------------------------------------------
    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.limits.header_timeout, self._close)

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._raw_head_bytes += len(data)
        super().data_received(data)
        if self._in_head and self._raw_head_bytes > self.limits.max_head_bytes:
            self._refuse_head()
        elif self._awaiting_body and self._body_timer is None:
            # Armed here, not per request: a request without a body ends in the same feed.
            self._body_timer = self.loop.call_later(
                self.limits.body_timeout + _BODY_GRACE_SECONDS, self._body_overdue
            )

    def _refuse_head(self) -> None:
        if not self.transport.is_closing():
            self.transport.write(
                _raw_answer(
                    431, f"request headers are larger than {self.limits.max_head_bytes} bytes"
                )
            )
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        # uvicorn calls this for every parser error, a callback's own exception included.
        if self._parsed_head_bytes > self.limits.max_head_bytes:
            self._refuse_head()
            return
        if not self.transport.is_closing():
            self.transport.write(_raw_answer(400, "invalid HTTP request: malformed framing"))
            self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._parsed_head_bytes = 0
        self._arm_head_timer()

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)
        super().on_header(name, value)

    def _count_head(self, size: int) -> None:
        self._parsed_head_bytes += size
        if self._parsed_head_bytes > self.limits.max_head_bytes:
            raise _HeadTooLarge()

    def on_headers_complete(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._in_head = False
        self._raw_head_bytes = 0
        super().on_headers_complete()
        self._awaiting_body = not self.parser.should_upgrade()

    def on_message_complete(self) -> None:
        self._awaiting_body = False
        self._in_head = True  # the next bytes begin the next request's head
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        super().on_message_complete()

    def _body_overdue(self) -> None:
        self._body_timer = None
        self._close()


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """The uvicorn.run() options `serve` and `dev` share: the bounds on connections and
    messages, and the logging and headers they leave to the gateway."""
    limits = ConnectionLimits(
        header_timeout=settings.header_timeout_seconds,
        body_timeout=settings.body_timeout_seconds,
        max_connections=settings.max_connections,
    )
    return {
        "http": functools.partial(GatewayHttpProtocol, limits=limits),
        "timeout_keep_alive": settings.keepalive_seconds,
        "server_header": False,  # no `server: uvicorn`: it names the software to whoever asks
        "log_config": None,  # our JSON logging (app.logging), set up before uvicorn starts
        "access_log": False,  # one access line per request is ours (app.middleware)
        "ws_max_size": settings.max_body_bytes,  # a WebSocket message is held to the body bound
    }
