"""HTTP plumbing shared by the routers: bounded JSON bodies, raw JSON answers, request context.

The middleware is plain ASGI (not BaseHTTPMiddleware) so it adds no task or buffering per request.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import orjson
import structlog
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from app.metrics import Metrics

__all__ = [
    "RequestContextMiddleware",
    "UnexpectedErrorMiddleware",
    "json_response",
    "read_json_body",
]

log = structlog.get_logger("app.access")


def json_response(
    content: Any, status_code: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(
        orjson.dumps(content),
        status_code=status_code,
        headers=headers,
        media_type="application/json",
    )


async def read_json_body(request: Request, max_bytes: int) -> Any:
    """The JSON body, refused early: 415 if not JSON, 413 past `max_bytes`, 400 if unparseable."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("application/json"):
        raise UnsupportedMediaType()
    too_large = PayloadTooLarge(f"request body is larger than the limit of {max_bytes} bytes")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:  # a chunked body declares no length: count as it arrives
            raise too_large
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("request body is not valid JSON") from None


_REQUEST_ID_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:")


def _request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            candidate: str = value.decode("latin-1")
            # Echo a caller's id only if it is short and plain, so it cannot forge log lines.
            if 0 < len(candidate) <= 128 and set(candidate) <= _REQUEST_ID_OK:
                return candidate
            break
    return secrets.token_hex(16)


class RequestContextMiddleware:
    """X-Request-ID on every answer and log line, one access log line, pgw_requests_total."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        encoded_id = request_id.encode()
        status = 500
        started = time.perf_counter()
        structlog.contextvars.bind_contextvars(request_id=request_id)

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", encoded_id)]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.metrics.count_request(path, status)
            principal = getattr(scope.get("state", {}).get("principal"), "key_prefix", None)
            log.info(
                "request",
                method=scope["method"],
                path=scope["path"],
                route=path,
                status=status,
                ms=round((time.perf_counter() - started) * 1000, 2),
                key_prefix=principal,
            )
            structlog.contextvars.unbind_contextvars("request_id")


class UnexpectedErrorMiddleware:
    """The last line of defence, innermost: an unexpected exception becomes a logged
    `500 {"message": "internal error"}` that still passes out through the request-id and CORS
    middlewares (Starlette's own `Exception` handler runs outside all of them)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            log.exception("unhandled_error", path=scope["path"])  # the request id is still bound
            if started:
                raise  # too late for an answer of our own; the server closes the connection
            body = orjson.dumps({"message": "internal error"})
            await send(
                {
                    "type": "http.response.start",
                    "status": 500,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
