"""Piston's interactive protocol (`WS /api/v2/connect`), relayed to an upstream.

The gateway checks the key and the `init` message itself (the same parsing, resolution and policy
as an execute), then opens the upstream socket and relays messages both ways until either side
closes; Piston's own close codes (4999 when the job completed) reach the client unchanged.

What a socket may hold in the gateway is bounded: each message the client sends (the `init`
included) is at most `GATEWAY_MAX_BODY_BYTES`, and the messages read from the client but not yet
sent up (stdin the job has not taken, or all of it while the job waits for a slot) at most
`GATEWAY_WS_MAX_PENDING_STDIN_BYTES`; past either the socket is told why and closed with 1009.
The client is read from the moment its `init` is accepted, so a wait for a slot is bounded too,
and a client that leaves while waiting gives its place up. A binary frame is read as the same
JSON text as a text frame, as Piston does.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson
import structlog
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, WebSocketException

from app.upstream.pool import stage_times

__all__ = [
    "CLOSE_ERROR",
    "CLOSE_TOO_BIG",
    "ClientGone",
    "Inbox",
    "MessageRefused",
    "RelayOutcome",
    "close_client",
    "notify_error",
    "read_client",
    "receive_message",
    "relay",
    "ws_url",
]

log = structlog.get_logger(__name__)

CLOSE_ERROR = 4002  # Piston's "Notified Error": an {"type": "error"} message was sent first
CLOSE_TOO_BIG = 1009  # RFC 6455 "Message Too Big"
_JOB_DONE = frozenset({4999, 1000})  # Piston's "Job Completed", or a plain normal close
_MAX_MESSAGE = 1 << 20  # what the gateway reads from an upstream in one message


class ClientGone(Exception):
    """The client closed its socket (or the server did, e.g. for an over-large frame)."""


class MessageRefused(Exception):
    """A client message the gateway will not take; the client is told why, then closed."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def ws_url(http_url: str) -> str:
    """The upstream's connect endpoint: http(s) becomes ws(s)."""
    base = http_url.rstrip("/")
    scheme, rest = base.split("://", 1)
    return f"{'wss' if scheme == 'https' else 'ws'}://{rest}/api/v2/connect"


async def receive_message(client: WebSocket, max_bytes: int) -> tuple[str, int]:
    """The client's next message as JSON text and its size in bytes; text and binary alike."""
    message = await client.receive()
    if message["type"] == "websocket.disconnect":
        raise ClientGone
    text = message.get("text")
    if text is None:
        data: bytes = message.get("bytes") or b""
        size = len(data)
        if size <= max_bytes:
            try:
                text = data.decode()
            except UnicodeDecodeError:
                raise MessageRefused(
                    "a binary message must hold the same UTF-8 JSON text as a text message",
                    CLOSE_ERROR,
                ) from None
    else:
        size = len(text) if text.isascii() else len(text.encode())
    if size > max_bytes:
        raise MessageRefused(
            f"a message cannot be larger than {max_bytes} bytes (GATEWAY_MAX_BODY_BYTES)",
            CLOSE_TOO_BIG,
        )
    assert text is not None
    return text, size


class Inbox:
    """The client's messages not yet sent up, bounded in bytes."""

    def __init__(self, max_pending_bytes: int) -> None:
        self.max_pending_bytes = max_pending_bytes
        self.pending_bytes = 0
        self._messages: deque[tuple[str, int]] = deque()
        self._arrived = asyncio.Event()

    def put(self, text: str, size: int) -> None:
        if self.pending_bytes + size > self.max_pending_bytes:
            raise MessageRefused(
                f"more than {self.max_pending_bytes} bytes of stdin are waiting for the job "
                "(GATEWAY_WS_MAX_PENDING_STDIN_BYTES); send it as the program reads it",
                CLOSE_TOO_BIG,
            )
        self._messages.append((text, size))
        self.pending_bytes += size
        self._arrived.set()

    async def get(self) -> tuple[str, int]:
        """The oldest message; its bytes stay pending until `sent` is called for it."""
        while not self._messages:
            self._arrived.clear()
            await self._arrived.wait()
        return self._messages.popleft()

    def sent(self, size: int) -> None:
        self.pending_bytes -= size


async def read_client(client: WebSocket, inbox: Inbox, max_message_bytes: int) -> None:
    """Read the client into `inbox` until it leaves (ClientGone) or breaks a bound."""
    while True:
        text, size = await receive_message(client, max_message_bytes)
        inbox.put(text, size)


@dataclass
class RelayOutcome:
    """What the relay saw, for usage counting: the stages' reported figures and any error."""

    cpu_time_ms: float = 0.0
    wall_time_ms: float = 0.0
    error: bool = False
    exits: list[dict[str, Any]] = field(default_factory=list)

    def observe(self, text: str) -> None:
        with contextlib.suppress(orjson.JSONDecodeError):
            message = orjson.loads(text)
            if not isinstance(message, dict):
                return
            if message.get("type") == "exit":
                self.exits.append(message)
                cpu, wall = stage_times(message)  # an exit carries the stage's result
                self.cpu_time_ms += cpu
                self.wall_time_ms += wall
            elif message.get("type") == "error":
                self.error = True


async def relay(
    client: WebSocket,
    upstream_url: str,
    init: dict[str, Any],
    inbox: Inbox,
    outcome: RelayOutcome,
    *,
    open_timeout: float,
) -> tuple[int, str] | None:
    """Open the upstream socket, send `init`, relay both ways; the upstream's close, or None
    when the client has already been told (the upstream could not be reached)."""
    try:
        upstream = await connect(
            upstream_url, open_timeout=open_timeout, max_size=_MAX_MESSAGE, proxy=None
        )
    except (OSError, TimeoutError, WebSocketException) as exc:
        log.warning("upstream_ws_unreachable", upstream=upstream_url, error=type(exc).__name__)
        outcome.error = True
        await notify_error(client, "no upstream Piston is reachable; try again shortly")
        return None
    async with upstream:
        with contextlib.suppress(ConnectionClosed):  # its close is read below
            await upstream.send(orjson.dumps(init).decode())
        pump = asyncio.create_task(_inbox_to_upstream(inbox, upstream))
        try:
            code, reason = await _upstream_to_client(upstream, client, outcome)
        finally:
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)
    if code not in _JOB_DONE:
        outcome.error = True  # the upstream died or refused mid-way: not a completed run
    return code, reason


async def _inbox_to_upstream(inbox: Inbox, upstream: ClientConnection) -> None:
    """The client's messages (stdin, signals) go up in order, as fast as the upstream takes them."""
    with contextlib.suppress(ConnectionClosed):
        while True:
            text, size = await inbox.get()
            await upstream.send(text)  # waits while the upstream's socket is full
            inbox.sent(size)


async def _upstream_to_client(
    upstream: ClientConnection, client: WebSocket, outcome: RelayOutcome
) -> tuple[int, str]:
    """The upstream's messages go down as they come; returns its close code and reason."""
    try:
        async for message in upstream:
            text = message if isinstance(message, str) else message.decode()
            outcome.observe(text)
            try:
                await client.send_text(text)
            except (WebSocketDisconnect, RuntimeError, OSError):
                raise ClientGone from None  # the client's socket is closed: nothing to mirror
    except ConnectionClosed:
        pass
    close = upstream.protocol.close_rcvd  # the Close frame Piston sent, if any
    if close is None:
        return 1011, "upstream connection lost"
    return close.code, close.reason


def _client_open(client: WebSocket) -> bool:
    return (
        client.client_state == WebSocketState.CONNECTED
        and client.application_state == WebSocketState.CONNECTED
    )


async def close_client(client: WebSocket, code: int, reason: str) -> None:
    """Close the client's socket, unless it is closed already (never a second close)."""
    if _client_open(client):
        with contextlib.suppress(RuntimeError, WebSocketDisconnect, OSError):
            await client.close(code=code, reason=reason)


async def notify_error(client: WebSocket, message: str, *, code: int = CLOSE_ERROR) -> None:
    """Piston's way to refuse: an error message, then close (4002 "Notified Error")."""
    if not _client_open(client):
        return
    reason = "Notified Error" if code == CLOSE_ERROR else "Message Too Big"
    with contextlib.suppress(RuntimeError, WebSocketDisconnect, OSError):
        await client.send_text(orjson.dumps({"type": "error", "message": message}).decode())
    await close_client(client, code, reason)
