"""What routes depend on: the caller (auth by default), the app's state, the route registrars.

`authorize(connection, scope)` is the one check of a key, for HTTP and WebSocket alike: 401 for a
missing, unknown, revoked or expired key (one answer for all), 403 for a key without `scope`,
429 for an address past its failed attempts. A router made by `keyed_router(scope=...)` runs it
before anything else of every route it holds (before the body, the path parameters and any
dependency), so a route added later is protected without anyone remembering to. It runs as a
plain call rather than a FastAPI dependency: on a cache hit, resolving dependencies cost a fifth
of the request's CPU (bench/, cProfile); the 401/403 answers are the same.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any, ClassVar

from fastapi import APIRouter, Depends, Request
from fastapi.routing import APIRoute
from starlette.requests import HTTPConnection
from starlette.responses import Response

from app.errors import Forbidden, Unauthorized
from app.limits.failures import client_address
from app.state import AppState, StateDep, get_state
from app.tenancy.keys import key_from_headers
from app.tenancy.models import Principal

__all__ = [
    "AppState",
    "PrincipalDep",
    "StateDep",
    "authorize",
    "get_state",
    "keyed_router",
    "principal_of",
    "with_trailing_slash",
]


def _presented_key(connection: HTTPConnection) -> str | None:
    headers = connection.headers
    key = key_from_headers(headers.get("authorization"), headers.get("x-api-key"))
    if key is None and connection.scope["type"] == "websocket":
        # Browsers cannot set headers on a WebSocket: `?api_key=` is accepted there only.
        key = connection.query_params.get("api_key")
    return key


async def _identify(connection: HTTPConnection, state: AppState, key: str) -> Principal | None:
    """The Principal for `key`, or None.

    A valid key is served whatever else came from its address; only a key that fails is
    checked against its address's failures (429 past the limit) and counted as one more.
    """
    principal = await state.authenticator.principal_for(key)
    if principal is None:
        host = connection.client.host if connection.client is not None else "unknown"
        address = client_address(
            host, connection.headers.get("x-forwarded-for"), state.settings.trusted_proxies
        )
        state.auth_failures.check(address)
        await state.auth_failures.failed(address)
    return principal


async def authorize(connection: HTTPConnection, scope: str | None) -> Principal:
    """The caller's Principal if its key is valid and (unless `scope` is None) has `scope`."""
    key = _presented_key(connection)
    principal = None if key is None else await _identify(connection, get_state(connection), key)
    if principal is None:
        raise Unauthorized()
    # The access log names the key by its prefix (app.middleware).
    connection.state.principal = principal
    if scope is not None and not principal.can(scope):
        raise Forbidden(f"this key lacks the '{scope}' scope")
    return principal


def principal_of(connection: HTTPConnection) -> Principal:
    """The Principal `authorize` found for this request (on a keyed router's route)."""
    principal: Principal = connection.state.principal
    return principal


async def _principal_dependency(request: Request) -> Principal:
    return principal_of(request)


PrincipalDep = Annotated[Principal, Depends(_principal_dependency)]


class _AuthorizedRoute(APIRoute):
    """A route that authorizes the caller before FastAPI reads anything of the request."""

    required_scope: ClassVar[str | None] = None

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        scope = self.required_scope

        async def authorized(request: Request) -> Response:
            await authorize(request, scope)
            return await handler(request)

        return authorized


def keyed_router(*, scope: str | None, **kwargs: Any) -> APIRouter:
    """An APIRouter whose every HTTP route needs a valid key with `scope` (None: any scope).

    WebSocket routes call `authorize` themselves: their refusal is a close code, not a 401.
    """
    route_class = type(
        f"AuthorizedRoute_{scope or 'any'}", (_AuthorizedRoute,), {"required_scope": scope}
    )
    return APIRouter(route_class=route_class, **kwargs)


def with_trailing_slash(
    router: APIRouter, method: str, path: str, endpoint: Callable[..., Any], **kwargs: Any
) -> None:
    """Register `path` and `path/` (aiopyston calls `execute/`) without a redirect; only the
    first appears on the docs page."""
    router.add_api_route(path, endpoint, methods=[method], **kwargs)
    slash_kwargs = {**kwargs, "include_in_schema": False}
    router.add_api_route(path + "/", endpoint, methods=[method], **slash_kwargs)
