"""One exception hierarchy, rendered as Piston's `{"message": ...}` answers.

Validation problems become 400 in Piston's shape (never FastAPI's 422), and an unexpected exception
is logged and answered `500 {"message": "internal error"}` with no traceback.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import orjson
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

__all__ = [
    "BadGateway",
    "BadRequest",
    "Conflict",
    "Forbidden",
    "GatewayError",
    "GatewayTimeout",
    "NotFound",
    "PayloadTooLarge",
    "ServiceUnavailable",
    "TooManyRequests",
    "Unauthorized",
    "UnsupportedMediaType",
    "error_response",
    "install_error_handlers",
    "message_responses",
]

log = structlog.get_logger(__name__)


class GatewayError(Exception):
    """An answer the client should see: a status, a message that says what to fix, headers."""

    status_code: ClassVar[int] = 500

    def __init__(
        self,
        message: str,
        *,
        headers: Mapping[str, str] | None = None,
        status_code: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.headers: dict[str, str] = dict(headers or {})
        if status_code is not None:
            self.status_code = status_code  # type: ignore[misc]  # an upstream's own 4xx


class BadRequest(GatewayError):
    status_code = 400


class Unauthorized(GatewayError):
    status_code = 401

    def __init__(self, message: str = "a valid API key is required") -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class Forbidden(GatewayError):
    status_code = 403


class NotFound(GatewayError):
    status_code = 404


class Conflict(GatewayError):
    status_code = 409


class PayloadTooLarge(GatewayError):
    status_code = 413


class UnsupportedMediaType(GatewayError):
    status_code = 415

    def __init__(self, message: str = "requests must be of type application/json") -> None:
        super().__init__(message)


class TooManyRequests(GatewayError):
    status_code = 429


class BadGateway(GatewayError):
    status_code = 502


class ServiceUnavailable(GatewayError):
    status_code = 503


class GatewayTimeout(GatewayError):
    status_code = 504


def error_response(
    status_code: int, message: str, headers: Mapping[str, str] | None = None
) -> Response:
    return Response(
        orjson.dumps({"message": message}),
        status_code=status_code,
        headers=dict(headers or {}),
        media_type="application/json",
    )


def _describe_validation_error(exc: RequestValidationError) -> str:
    errors = exc.errors()
    if not errors:
        return "invalid request"
    first = errors[0]
    location = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path")]
    where = ".".join(location)
    if first.get("type") == "json_invalid":
        return "request body is not valid JSON"
    return f"{where}: {first.get('msg', 'invalid')}" if where else str(first.get("msg", "invalid"))


def install_error_handlers(app: FastAPI) -> None:
    async def on_gateway_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, GatewayError)
        return error_response(exc.status_code, exc.message, exc.headers)

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return error_response(400, _describe_validation_error(exc))

    async def on_http_exception(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        return error_response(exc.status_code, message, exc.headers)

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled_error", path=request.url.path)
        return error_response(500, "internal error")

    app.add_exception_handler(GatewayError, on_gateway_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_exception)
    app.add_exception_handler(Exception, on_unexpected)


_MESSAGE_SCHEMA: dict[str, Any] = {
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {"message": {"type": "string"}},
                "required": ["message"],
            }
        }
    }
}


def message_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries for error answers, all in the `{"message"}` shape."""
    descriptions = {
        400: "Invalid request",
        401: "Missing, unknown, revoked or expired API key",
        403: "The key lacks the scope, or the language is not allowed",
        404: "Not found",
        409: "Already exists",
        413: "Request body too large",
        415: "Body is not JSON",
        429: "Rate limit, concurrency cap or daily quota reached",
        501: "Not supported",
        502: "The upstream answered with an error or garbage",
        503: "No upstream reachable, overloaded, or Redis unavailable",
        504: "The upstream took too long",
    }
    return {
        code: {"description": descriptions.get(code, "Error"), **_MESSAGE_SCHEMA} for code in codes
    }
