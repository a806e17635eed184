"""HTTP plumbing shared by the routers: bounded JSON bodies, raw JSON answers, request context.

The middleware is plain ASGI (not BaseHTTPMiddleware) so it adds no task or buffering per request.
It also bounds every request body, for every route, as the route reads it: a declared
Content-Length past `GATEWAY_MAX_BODY_BYTES` is refused before the app runs (nothing is read);
otherwise bytes are counted as the app receives them (so nothing is read before a route's own key
check) and the body must arrive whole within `GATEWAY_BODY_TIMEOUT_SECONDS`. Both refusals close
the connection: the rest of the body is not worth reading.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

import orjson
import structlog
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType, error_response
from app.logging import access_log
from app.metrics import Metrics

__all__ = [
    "BodyRefused",
    "LiveOriginsCORSMiddleware",
    "RawResponse",
    "RequestContextMiddleware",
    "UnexpectedErrorMiddleware",
    "json_response",
    "parse_json",
    "raw_headers",
    "read_body",
    "read_json_body",
]

log = structlog.get_logger(__name__)


def json_response(
    content: Any, status_code: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(
        orjson.dumps(content),
        status_code=status_code,
        headers=headers,
        media_type="application/json",
    )


class RawResponse(Response):
    """A Response given its headers as the list uvicorn writes (lower-case name, value bytes),
    built in one pass: the hot path's answer skips Starlette's header normalisation."""

    def __init__(self, body: bytes, status_code: int, raw_headers: list[tuple[bytes, bytes]]):
        self.body = body
        self.status_code = status_code
        self.background = None
        self.raw_headers = raw_headers


_RAW_NAMES: dict[str, bytes] = {}


def raw_headers(headers: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
    """`headers` as raw header lines, names lower-cased (each name encoded once per process)."""
    raw = []
    for name, value in headers.items():
        encoded = _RAW_NAMES.get(name)
        if encoded is None:
            encoded = _RAW_NAMES.setdefault(name, name.lower().encode("latin-1"))
        raw.append((encoded, value.encode("latin-1")))
    return raw


async def read_body(request: Request, max_bytes: int) -> bytes:
    """A JSON request's bytes, refused early: 415 if not JSON, 413 past `max_bytes`."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":  # parameters (`; charset=utf-8`) allowed, no prefix
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
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def parse_json(raw: bytes) -> Any:
    """The body as JSON, or 400."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("request body is not valid JSON") from None


async def read_json_body(request: Request, max_bytes: int) -> Any:
    """The JSON body, refused early: 415 if not JSON, 413 past `max_bytes`, 400 if unparseable."""
    return parse_json(await read_body(request, max_bytes))


_REQUEST_ID_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:")


# A generated id: 16 random bytes as 32 hex digits, as before, drawn from the OS 256 ids at a
# time rather than one syscall per request. Random, not a counter: an id must not tell a client
# how many requests the server handled between two of its own.
_ID_BATCH: Final = 256
_ids: list[str] = []


def _new_request_id() -> str:
    if not _ids:
        pool = secrets.token_bytes(16 * _ID_BATCH)
        _ids.extend(pool[i : i + 16].hex() for i in range(0, len(pool), 16))
    return _ids.pop()


def _request_id(candidate: bytes | None) -> str:
    if candidate is not None:
        text = candidate.decode("latin-1")
        # Echo a caller's id only if it is short and plain, so it cannot forge log lines.
        if 0 < len(text) <= 128 and set(text) <= _REQUEST_ID_OK:
            return text
    return _new_request_id()


class BodyRefused(HTTPException):
    """A body past the byte cap or the deadline, raised from `receive` inside whatever route reads
    it. A Starlette HTTPException, so that FastAPI's own body parsing passes it on unchanged (it
    turns any other exception into a 400), and the error handler renders it `{"message"}`."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(status_code, detail=message, headers={"Connection": "close"})


_CLIENT_CLOSED = 499  # nginx's number for a client that went away before its answer


class RequestContextMiddleware:
    """X-Request-ID on every answer and log line, one access log line, pgw_requests_total, and
    the byte cap and deadline on every request body."""

    def __init__(
        self, app: ASGIApp, metrics: Metrics, *, max_body_bytes: int, body_timeout: float
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout
        self.too_large = f"request body is larger than the limit of {max_body_bytes} bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http":
            if kind == "websocket":  # uvicorn's own lines for the socket carry the id too
                ws_id = next((v for n, v in scope["headers"] if n == b"x-request-id"), None)
                structlog.contextvars.bind_contextvars(request_id=_request_id(ws_id))
                try:
                    await self.app(scope, receive, send)
                finally:
                    structlog.contextvars.unbind_contextvars("request_id")
                return
            await self.app(scope, receive, send)
            return
        id_header: bytes | None = None
        declared: bytes | None = None
        chunked = False
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                id_header = value
            elif name == b"content-length":
                declared = value
            elif name == b"transfer-encoding":
                chunked = True
        request_id = _request_id(id_header)
        encoded_id = request_id.encode()
        status = 500
        response_started = False
        started = time.perf_counter()
        structlog.contextvars.bind_contextvars(request_id=request_id)

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
                message["headers"] = [*message.get("headers", []), (b"x-request-id", encoded_id)]
            await send(message)

        received = 0
        body_done = not chunked and (declared is None or declared == b"0")
        deadline = asyncio.get_running_loop().time() + self.body_timeout

        async def bounded_receive() -> Message:
            nonlocal received, body_done
            if body_done:
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise BodyRefused(
                    408, f"the request body did not arrive within {self.body_timeout:g} s"
                ) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyRefused(413, self.too_large)
                body_done = not message.get("more_body", False)
            return message

        try:
            if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
                refusal = error_response(413, self.too_large, {"Connection": "close"})
                await refusal(scope, receive, send_with_id)
            else:
                await self.app(scope, bounded_receive, send_with_id)
        except ClientDisconnect:
            if not response_started:
                status = _CLIENT_CLOSED  # nobody to answer; not an error of ours
        except asyncio.CancelledError:
            if not response_started:
                status = _CLIENT_CLOSED  # cancelled (the server stopping): nobody was answered
            raise
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.metrics.count_request(path, status)
            if access_log.enabled:
                principal = getattr(scope.get("state", {}).get("principal"), "key_prefix", None)
                access_log.write(
                    request_id,
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
        except ClientDisconnect:
            raise  # the client went away mid-body: RequestContextMiddleware logs it, no traceback
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


class LiveOriginsCORSMiddleware(CORSMiddleware):
    """Starlette's CORS for `GATEWAY_CORS_ORIGINS`, and also for every origin of a live browser
    key: `live(origin)` answers from the process's in-memory origin set (kept by the key cache's
    pub/sub), so a preflight never waits on Redis. Matching a key's origin compares the
    normalized forms (case, default port); the answer echoes the request's Origin as sent."""

    def __init__(self, app: ASGIApp, /, *, live: Callable[[str], bool], **options: Any) -> None:
        super().__init__(app, **options)
        self._live = live

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # No Origin, nothing to add: the hot path (server-side clients) skips the header work.
        if scope["type"] != "http" or not any(
            name == b"origin" for name, _ in scope.get("headers", ())
        ):
            await self.app(scope, receive, send)
            return
        await super().__call__(scope, receive, send)

    def is_allowed_origin(self, origin: str) -> bool:
        return super().is_allowed_origin(origin) or self._live(origin)


class DirectRoutes:
    """The hot path's routes served in front of FastAPI's routing, through the same middleware.

    FastAPI's router, its dependency resolution and its own middleware cost a cache hit about a
    third of its CPU (bench/, py-spy): more than the auth, the plan and the Redis call together.
    A route marked `served_directly` (app.api.deps) is matched here by method and exact path, and
    runs inside the very middleware the app was given (request id, access log, request metrics,
    body bounds, CORS, the 500 of last resort: `app.user_middleware`, built a second time around
    it) with the app's own exception handlers; anything else goes to the full stack. So an answer
    cannot tell which way it came: the suite runs both (a request with an Origin, or one to a
    route not served here, takes the other way; `tests/integration/test_direct_routes.py`).
    """

    def __init__(self, full: ASGIApp, direct: dict[tuple[str, str], ASGIApp]) -> None:
        self.full = full
        self.direct = direct

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            root = scope.get("root_path", "")
            if root and path.startswith(root):  # as Starlette's routing reads the path
                path = path[len(root) :]
            app = self.direct.get((scope["method"], path))
            if app is not None:
                await app(scope, receive, send)
                return
        await self.full(scope, receive, send)


class _IndexedHeaders(Headers):
    """Starlette's request headers, looked up through a dict made once per request.

    Starlette scans the header list on every lookup and, for a header that is absent (most
    requests send no X-API-Key, no Origin), raises and catches a KeyError; the hot path asks
    for six headers. The first line of a name wins, as Starlette's scan returns it; `getlist`
    and everything else are Starlette's own.
    """

    def __init__(self, scope: Scope) -> None:
        super().__init__(scope=scope)
        self._index: dict[str, str] = {}
        for name, value in reversed(self._list):
            self._index[name.decode("latin-1")] = value.decode("latin-1")

    def __getitem__(self, key: str) -> str:
        return self._index[key.lower()]

    def get(self, key: str, default: Any = None) -> Any:
        return self._index.get(key.lower(), default)

    def __contains__(self, key: Any) -> bool:
        return isinstance(key, str) and key.lower() in self._index


class _DirectRequest(Request):
    @property
    def headers(self) -> Headers:
        if not hasattr(self, "_headers"):
            self._headers = _IndexedHeaders(self.scope)
        return self._headers


def direct_route_app(
    route: Any,
    authorize: Callable[[Request, str | None], Any],
    handlers: dict[Any, Callable[[Request, Exception], Any]],
) -> ASGIApp:
    """One route's endpoint `(request) -> Response` as an ASGI app: authorize, run, answer.

    `handlers`: the app's exception handlers by class (GatewayError, HTTPException, ...); an
    exception none of them takes (a bug, a client gone) goes on out, to the middleware.
    """
    endpoint = route.endpoint
    scope_name = route.required_scope

    async def serve(scope: Scope, receive: Receive, send: Send) -> None:
        scope["route"] = route  # the metrics' route label, as the router would set it
        scope["endpoint"] = endpoint
        request = _DirectRequest(scope, receive)
        try:
            await authorize(request, scope_name)
            response = await endpoint(request)
        except Exception as exc:
            handler = next((handlers[c] for c in type(exc).__mro__ if c in handlers), None)
            if handler is None:
                raise
            response = await handler(request, exc)
        await response(scope, receive, send)

    return serve
