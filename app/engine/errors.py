"""The engine's errors, answered as Piston answers them: `{"message": ...}` with Piston's status.

An invalid request is the protocol's `InvalidRequest` (400, Piston's wording, shared with the
gateway); the rest are the engine's own. An unexpected exception is logged and answered
`500 {"message": "internal error"}` with no traceback.
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

from app.protocol.errors import InvalidRequest

__all__ = [
    "EngineError",
    "InvalidRequest",
    "NotImplementedByEngine",
    "PayloadTooLarge",
    "UnsupportedMediaType",
    "install_error_handlers",
    "message_responses",
]

log = structlog.get_logger(__name__)


class EngineError(Exception):
    """An answer the client should see: a status and a message."""

    status_code: ClassVar[int] = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class PayloadTooLarge(EngineError):
    status_code = 413


class UnsupportedMediaType(EngineError):
    status_code = 415

    def __init__(self, message: str = "requests must be of type application/json") -> None:
        super().__init__(message)


class NotImplementedByEngine(EngineError):
    status_code = 501


def _error_response(
    status_code: int, message: str, headers: Mapping[str, str] | None = None
) -> Response:
    return Response(
        orjson.dumps({"message": message}),
        status_code=status_code,
        headers=dict(headers or {}),
        media_type="application/json",
    )


def install_error_handlers(app: FastAPI) -> None:
    async def on_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, EngineError | InvalidRequest)
        return _error_response(exc.status_code, exc.message)

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        return _error_response(400, "invalid request")

    async def on_http_exception(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        return _error_response(exc.status_code, message, exc.headers)

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled_error", path=request.url.path)
        return _error_response(500, "internal error")

    app.add_exception_handler(EngineError, on_error)
    app.add_exception_handler(InvalidRequest, on_error)
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
_DESCRIPTIONS: dict[int, str] = {
    400: "Invalid request",
    413: "Request body too large",
    415: "Body is not JSON",
    501: "Not supported",
}


def message_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries for error answers, all in the `{"message"}` shape."""
    return {
        code: {"description": _DESCRIPTIONS.get(code, "Error"), **_MESSAGE_SCHEMA} for code in codes
    }
