"""Piston's interactive protocol (`WS /api/v2/connect`), relayed to an upstream.

The gateway checks the key and the `init` message itself (the same parsing, resolution and policy
as an execute), then opens the upstream socket and relays text messages both ways until either
side closes; Piston's own close codes (4999 when the job completed) reach the client unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any

import orjson
import structlog
from starlette.websockets import WebSocket, WebSocketDisconnect
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, WebSocketException

from app.piston.client import stage_times

__all__ = ["CLOSE_ERROR", "RelayOutcome", "notify_error", "relay", "ws_url"]

log = structlog.get_logger(__name__)

CLOSE_ERROR = 4002  # Piston's "Notified Error": an {"type": "error"} message was sent first
_MAX_MESSAGE = 1 << 20


def ws_url(http_url: str) -> str:
    """The upstream's connect endpoint: http(s) becomes ws(s)."""
    base = http_url.rstrip("/")
    scheme, rest = base.split("://", 1)
    return f"{'wss' if scheme == 'https' else 'ws'}://{rest}/api/v2/connect"


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
    client: WebSocket, upstream_url: str, init: dict[str, Any], *, open_timeout: float
) -> RelayOutcome:
    """Open the upstream socket, send `init`, relay both ways, mirror the upstream's close."""
    outcome = RelayOutcome()
    try:
        upstream = await connect(
            upstream_url, open_timeout=open_timeout, max_size=_MAX_MESSAGE, proxy=None
        )
    except (OSError, TimeoutError, WebSocketException) as exc:
        log.warning("upstream_ws_unreachable", upstream=upstream_url, error=type(exc).__name__)
        outcome.error = True
        await notify_error(client, "no upstream Piston is reachable; try again shortly")
        return outcome
    async with upstream:
        await upstream.send(orjson.dumps(init).decode())
        to_upstream = asyncio.create_task(_client_to_upstream(client, upstream))
        to_client = asyncio.create_task(_upstream_to_client(upstream, client, outcome))
        done, pending = await asyncio.wait(
            {to_upstream, to_client}, return_when=asyncio.FIRST_COMPLETED
        )
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if to_client in done and not to_client.cancelled() and to_client.exception() is None:
            code, reason = to_client.result()
            with contextlib.suppress(RuntimeError, WebSocketDisconnect):
                await client.close(code=code, reason=reason)
    return outcome


async def _client_to_upstream(client: WebSocket, upstream: ClientConnection) -> None:
    """The client's messages (stdin, signals) go up as they come; a client gone ends the job."""
    try:
        while True:
            text = await client.receive_text()
            await upstream.send(text)
    except (WebSocketDisconnect, RuntimeError, KeyError):
        await upstream.close()  # Piston kills the job when its socket closes
    except ConnectionClosed:
        pass


async def _upstream_to_client(
    upstream: ClientConnection, client: WebSocket, outcome: RelayOutcome
) -> tuple[int, str]:
    """The upstream's messages go down as they come; returns its close code and reason."""
    try:
        async for message in upstream:
            text = message if isinstance(message, str) else message.decode()
            outcome.observe(text)
            await client.send_text(text)
    except ConnectionClosed:
        pass
    close = upstream.protocol.close_rcvd  # the Close frame Piston sent, if any
    if close is None:
        return 1011, "upstream connection lost"
    return close.code, close.reason


async def notify_error(client: WebSocket, message: str) -> None:
    """Piston's way to refuse: an error message, then close 4002 "Notified Error"."""
    with contextlib.suppress(RuntimeError, WebSocketDisconnect):
        await client.send_text(orjson.dumps({"type": "error", "message": message}).decode())
        await client.close(code=CLOSE_ERROR, reason="Notified Error")
