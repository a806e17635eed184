"""What routes depend on: the caller (auth by default), the app's state, the route registrars.

`authorize(connection, scope)` is the one check of a key, for HTTP and WebSocket alike: 401 for a
missing, unknown, revoked or expired key (one answer for all), 403 for a key without `scope` (or,
on HTTP, a browser key from an origin it does not allow), 429 for an address past its failed
attempts. The WebSocket checks a browser key's origin itself (`check_origin`), since its refusal
is an `error` message and a close, not a 403. A router made by `keyed_router(scope=...)` runs it
before anything else of every route it holds (before the body, the path parameters and any
dependency), so a route added later is protected without anyone remembering to. It runs as a
plain call rather than a FastAPI dependency: on a cache hit, resolving dependencies cost a fifth
of the request's CPU (bench/, cProfile); the 401/403 answers are the same.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from typing import Annotated, Any, ClassVar, Final, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.routing import APIRoute
from starlette.requests import HTTPConnection
from starlette.responses import Response

from app.errors import Forbidden, Unauthorized
from app.limits.failures import client_address
from app.limits.gate import ClientLimit
from app.state import AppState, get_state
from app.tenancy.keys import key_from_headers
from app.tenancy.models import Principal
from app.tenancy.origins import request_origin

__all__ = [
    "AppState",
    "PrincipalDep",
    "StateDep",
    "authorize",
    "check_origin",
    "client_limit",
    "get_state",
    "keyed_router",
    "principal_of",
    "served_directly",
    "with_trailing_slash",
]


def _presented_key(connection: HTTPConnection) -> str | None:
    headers = connection.headers
    key = key_from_headers(headers.get("authorization"), headers.get("x-api-key"))
    if key is None and connection.scope["type"] == "websocket":
        # Browsers cannot set headers on a WebSocket: `?api_key=` is accepted there only.
        key = connection.query_params.get("api_key")
    return key


def _client_address(connection: HTTPConnection, state: AppState) -> str:
    host = connection.client.host if connection.client is not None else "unknown"
    # Several header lines are one list (RFC 9110 5.3); the proxy's own line comes last, so
    # reading only the first would trust what the client wrote.
    forwarded = ", ".join(connection.headers.getlist("x-forwarded-for")) or None
    return client_address(host, forwarded, state.settings.trusted_proxies)


async def _identify(connection: HTTPConnection, state: AppState, key: str) -> Principal | None:
    """The Principal for `key`, or None.

    A valid key is served whatever else came from its address; only a key that fails is
    checked against its address's failures (429 past the limit) and counted as one more.
    """
    principal = await state.authenticator.principal_for(key)
    if principal is None:
        address = _client_address(connection, state)
        state.auth_failures.check(address)
        await state.auth_failures.failed(address)
    return principal


def check_origin(principal: Principal, origin: str | None) -> None:
    """403 unless a browser key comes from one of its origins (`origin`: the Origin header)."""
    allowed = principal.allowed_origins
    if allowed is None:
        return
    if origin is None:
        raise Forbidden(
            "this key is a browser key: it only works from its allowed origins, and the "
            "request has no Origin header"
        )
    if request_origin(origin) not in allowed:
        raise Forbidden(f"origin '{origin}' is not allowed for this key")


def client_limit(connection: HTTPConnection, principal: Principal) -> ClientLimit | None:
    """The key's `client_rate_limit` for this client's address (X-Forwarded-For only from a
    trusted proxy), counted per key and address; None for a key without one."""
    if principal.client_rate_limit is None:
        return None
    address = _client_address(connection, get_state(connection))
    return ClientLimit(principal.client_rate_limit, f"{principal.key_id}/{address}")


async def authorize(connection: HTTPConnection, scope: str | None) -> Principal:
    """The caller's Principal if its key is valid and (unless `scope` is None) has `scope`."""
    key = _presented_key(connection)
    principal = None if key is None else await _identify(connection, get_state(connection), key)
    if principal is None:
        raise Unauthorized()
    # The access log names the key by its prefix (app.middleware).
    connection.state.principal = principal
    if connection.scope["type"] == "http":
        check_origin(principal, connection.headers.get("origin"))
    if scope is not None and not principal.can(scope):
        raise Forbidden(f"this key lacks the '{scope}' scope")
    return principal


def principal_of(connection: HTTPConnection) -> Principal:
    """The Principal `authorize` found for this request (on a keyed router's route)."""
    principal: Principal = connection.state.principal
    return principal


async def _state_dependency(request: Request) -> AppState:
    # async on purpose: FastAPI runs a plain `def` dependency in a thread pool, a thread hop
    # per request.
    return get_state(request)


StateDep = Annotated[AppState, Depends(_state_dependency)]


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


_DIRECT: Final = "__pgw_served_directly__"


_Endpoint = TypeVar("_Endpoint", bound=Callable[[Request], Awaitable[Response]])


def served_directly(endpoint: _Endpoint) -> _Endpoint:
    """Mark a keyed route's endpoint `(request) -> Response` to be served in front of FastAPI's
    routing, inside the same middleware (app.middleware.DirectRoutes): the hot path's one route.
    It must take nothing but the request: no dependency is resolved there."""
    setattr(endpoint, _DIRECT, True)
    return endpoint


def is_served_directly(route: object) -> bool:
    return isinstance(route, _AuthorizedRoute) and getattr(route.endpoint, _DIRECT, False)


def with_trailing_slash(
    router: APIRouter, method: str, path: str, endpoint: Callable[..., Any], **kwargs: Any
) -> None:
    """Register `path` and `path/` (aiopyston calls `execute/`) without a redirect; only the
    first appears on the docs page."""
    router.add_api_route(path, endpoint, methods=[method], **kwargs)
    slash_kwargs = {**kwargs, "include_in_schema": False}
    router.add_api_route(path + "/", endpoint, methods=[method], **slash_kwargs)
