"""The admin API (`/admin`, scope `admin`): tenants, their keys, and their usage.

The key is checked before a body is read: routes declare no body parameter (FastAPI reads and
parses those before the handler runs) and read theirs with `_body` once the router's admin
check has passed, bounded by `_MAX_BODY_BYTES`.
"""

from __future__ import annotations

from datetime import date
from typing import Any, Final, TypeVar

from fastapi import Request, Response, status
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from app.api.deps import AppState, StateDep, keyed_router
from app.errors import NotFound, message_responses
from app.middleware import read_json_body
from app.policy import check_tenant_caps
from app.tenancy.models import ApiKey, KeyCreate, Tenant, TenantCreate, TenantUpdate

__all__ = ["MintedKey", "Usage", "UsageDay", "router"]

USAGE_DAYS: Final = 7
# A tenant or key body is a few hundred bytes; this leaves room and refuses anything else (413).
_MAX_BODY_BYTES: Final = 16_384
_Body = TypeVar("_Body", bound=BaseModel)

# Router-level, so a route added here later is admin-only without anyone remembering to.
router = keyed_router(
    scope="admin", prefix="/admin", tags=["admin"], responses=message_responses(401, 403, 429)
)


class MintedKey(ApiKey):
    """A key as minted: the only answer that ever carries the key itself."""

    key: str


class UsageDay(BaseModel):
    date: date
    executions: int = 0
    cache_hits: int = 0
    rate_limited: int = 0
    errors: int = 0
    # Sums of Piston's per-stage times, which may carry fractions of a millisecond.
    cpu_time_ms: int | float = 0
    wall_time_ms: int | float = 0


class Usage(BaseModel):
    tenant: str
    days: list[UsageDay]


def _request_body(model: type[BaseModel], *, required: bool = True) -> dict[str, Any]:
    """The OpenAPI entry of a body the route reads itself (see `_body`)."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    return {
        "requestBody": {
            "required": required,
            "content": {"application/json": {"schema": schema}},
        }
    }


async def _body(request: Request, model: type[_Body], *, optional: bool = False) -> _Body | None:
    """The body as `model`, read only now that the key has been checked: 413/415/400 on the way.

    `optional`: no body at all (no Content-Type, nothing sent) is None.
    """
    if optional and "content-type" not in request.headers:
        declared = request.headers.get("content-length")
        if declared in (None, "0") and "transfer-encoding" not in request.headers:
            return None
    raw = await read_json_body(request, _MAX_BODY_BYTES)
    if optional and raw is None:
        return None
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        # The same 400 {"message"} naming the field as for any other invalid body.
        raise RequestValidationError(exc.errors(include_url=False)) from None


async def _existing_tenant(state: AppState, tenant_id: str) -> Tenant:
    tenant = await state.store.get_tenant(tenant_id)
    if tenant is None:
        raise NotFound(f"tenant '{tenant_id}' does not exist")
    return tenant


@router.post(
    "/tenants",
    status_code=status.HTTP_201_CREATED,
    response_model=Tenant,
    responses=message_responses(400, 409, 413, 415),
    openapi_extra=_request_body(TenantCreate),
)
async def create_tenant(request: Request, state: StateDep) -> Tenant:
    """Create a tenant (409 if the id is taken)."""
    body = await _body(request, TenantCreate)
    assert body is not None
    check_tenant_caps(body, state.settings)
    return await state.store.create_tenant(body)


@router.get("/tenants", response_model=list[Tenant])
async def list_tenants(state: StateDep) -> list[Tenant]:
    """List every tenant, by id."""
    return await state.store.list_tenants()


@router.get("/tenants/{tenant_id}", response_model=Tenant, responses=message_responses(404))
async def get_tenant(tenant_id: str, state: StateDep) -> Tenant:
    """One tenant."""
    return await _existing_tenant(state, tenant_id)


@router.patch(
    "/tenants/{tenant_id}",
    response_model=Tenant,
    responses=message_responses(400, 404, 413, 415),
    openapi_extra=_request_body(TenantUpdate),
)
async def update_tenant(tenant_id: str, request: Request, state: StateDep) -> Tenant:
    """Change the fields sent; null resets a field to the global default."""
    body = await _body(request, TenantUpdate)
    assert body is not None
    check_tenant_caps(body, state.settings)
    return await state.store.update_tenant(tenant_id, body)


@router.delete(
    "/tenants/{tenant_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=message_responses(404),
)
async def delete_tenant(tenant_id: str, state: StateDep) -> Response:
    """Delete a tenant, revoking all its keys and dropping its usage and counters."""
    tenant = await _existing_tenant(state, tenant_id)
    await state.store.delete_tenant(tenant_id)
    await state.gate.forget(tenant)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/tenants/{tenant_id}/keys",
    status_code=status.HTTP_201_CREATED,
    response_model=MintedKey,
    responses=message_responses(400, 404, 413, 415),
    openapi_extra=_request_body(KeyCreate, required=False),
)
async def mint_key(tenant_id: str, request: Request, state: StateDep) -> MintedKey:
    """Mint a key; the answer's `key` is shown this once and never again."""
    fields = await _body(request, KeyCreate, optional=True) or KeyCreate()
    key, secret = await state.store.create_key(
        tenant_id,
        name=fields.name,
        scopes=fields.scopes,
        expires_at=fields.expires_at,
        allowed_origins=fields.allowed_origins,
        client_rate_limit=fields.client_rate_limit,
    )
    return MintedKey.model_validate({**key.model_dump(), "hash": key.hash, "key": secret})


@router.get(
    "/tenants/{tenant_id}/keys", response_model=list[ApiKey], responses=message_responses(404)
)
async def list_keys(tenant_id: str, state: StateDep) -> list[ApiKey]:
    """List a tenant's keys, revoked ones included; never the key itself."""
    return await state.store.list_keys(tenant_id)


@router.delete(
    "/keys/{key_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=message_responses(404),
)
async def revoke_key(key_id: str, state: StateDep) -> Response:
    """Revoke a key: every gateway replica refuses it within 2 seconds."""
    await state.store.revoke_key(key_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/tenants/{tenant_id}/usage", response_model=Usage, responses=message_responses(404))
async def usage(tenant_id: str, state: StateDep) -> Usage:
    """Today's and the previous days' counts, today first (UTC days)."""
    await _existing_tenant(state, tenant_id)
    days = await _usage_days(state, tenant_id)
    return Usage(tenant=tenant_id, days=days)


async def _usage_days(state: AppState, tenant_id: str) -> list[UsageDay]:
    rows = await state.gate.usage(tenant_id, days=USAGE_DAYS)
    return [UsageDay.model_validate(row) for row in rows]
