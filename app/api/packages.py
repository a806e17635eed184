"""Piston's package routes: the listing for any valid key, installs and removals for `admin`."""

from __future__ import annotations

from typing import Any, Final

import orjson
from fastapi import Request
from starlette.responses import Response

from app.api.deps import AppState, PrincipalDep, StateDep, keyed_router, with_trailing_slash
from app.errors import BadGateway, message_responses
from app.middleware import json_response, read_json_body
from app.policy import language_allowed
from app.upstream.pool import upstream_error

__all__ = ["admin_router", "router"]

# The listing: any valid key (app.api.deps); what it shows is filtered by the key's languages.
router = keyed_router(scope=None, prefix="/api/v2", tags=["piston"])
# Installing and removing change the upstream for everyone: scope `admin`, on a router of its own.
admin_router = keyed_router(scope="admin", prefix="/api/v2", tags=["piston"])


async def packages(principal: PrincipalDep, state: StateDep) -> Response:
    """The upstream's packages, without those this key may not use."""
    status, body = await state.pool.forward("GET", "/api/v2/packages")
    if status != 200:
        raise upstream_error(status, body)
    allowed = (state.settings.allowed_languages, principal.tenant.allowed_languages)
    try:
        listed = orjson.loads(body)
        visible = [
            pkg for pkg in listed if language_allowed(str(pkg.get("language", "")), *allowed)
        ]
    except (orjson.JSONDecodeError, AttributeError, TypeError):
        raise BadGateway("the upstream answered its package list with garbage") from None
    return json_response(visible)


async def _forward_package_change(request: Request, state: AppState) -> Response:
    body = await read_json_body(request, state.settings.max_body_bytes)
    status, answer = await state.pool.forward(
        request.method, "/api/v2/packages", orjson.dumps(body), read_timeout=600.0
    )
    if status >= 400:
        raise upstream_error(status, answer)
    return Response(answer, status_code=status, media_type="application/json")


async def install_package(request: Request, state: StateDep) -> Response:
    """Install a language package on the upstream (scope `admin`)."""
    return await _forward_package_change(request, state)


async def uninstall_package(request: Request, state: StateDep) -> Response:
    """Remove a language package from the upstream (scope `admin`)."""
    return await _forward_package_change(request, state)


_CHANGE_ANSWERS: Final[dict[int | str, dict[str, Any]]] = message_responses(
    400, 401, 403, 404, 413, 415, 502, 503, 504
)
with_trailing_slash(
    router, "GET", "/packages", packages, responses=message_responses(401, 502, 503, 504)
)
with_trailing_slash(admin_router, "POST", "/packages", install_package, responses=_CHANGE_ANSWERS)
with_trailing_slash(
    admin_router, "DELETE", "/packages", uninstall_package, responses=_CHANGE_ANSWERS
)
