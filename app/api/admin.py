"""The admin API (`/admin`, scope `admin`): tenants, their keys, and their usage."""

from __future__ import annotations

from datetime import date
from typing import Annotated, Final

from fastapi import APIRouter, Body, Depends, Response, status
from pydantic import BaseModel

from app.errors import NotFound, message_responses
from app.state import AppState, StateDep
from app.tenancy.auth import require_scope
from app.tenancy.models import ApiKey, KeyCreate, Tenant, TenantCreate, TenantUpdate

__all__ = ["MintedKey", "Usage", "UsageDay", "router"]

USAGE_DAYS: Final = 7

router = APIRouter(
    prefix="/admin",
    tags=["admin"],
    # Router-level, so a route added here later is admin-only without anyone remembering to.
    dependencies=[Depends(require_scope("admin"))],
    responses=message_responses(401, 403, 429),
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


async def _existing_tenant(state: AppState, tenant_id: str) -> Tenant:
    tenant = await state.store.get_tenant(tenant_id)
    if tenant is None:
        raise NotFound(f"tenant '{tenant_id}' does not exist")
    return tenant


@router.post(
    "/tenants",
    status_code=status.HTTP_201_CREATED,
    response_model=Tenant,
    responses=message_responses(400, 409),
)
async def create_tenant(body: TenantCreate, state: StateDep) -> Tenant:
    """Create a tenant (409 if the id is taken)."""
    return await state.store.create_tenant(body)


@router.get("/tenants", response_model=list[Tenant])
async def list_tenants(state: StateDep) -> list[Tenant]:
    """List every tenant, by id."""
    return await state.store.list_tenants()


@router.get("/tenants/{tenant_id}", response_model=Tenant, responses=message_responses(404))
async def get_tenant(tenant_id: str, state: StateDep) -> Tenant:
    """One tenant."""
    return await _existing_tenant(state, tenant_id)


@router.patch("/tenants/{tenant_id}", response_model=Tenant, responses=message_responses(400, 404))
async def update_tenant(tenant_id: str, body: TenantUpdate, state: StateDep) -> Tenant:
    """Change the fields sent; null resets a field to the global default."""
    return await state.store.update_tenant(tenant_id, body)


@router.delete(
    "/tenants/{tenant_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=message_responses(404),
)
async def delete_tenant(tenant_id: str, state: StateDep) -> Response:
    """Delete a tenant and revoke all its keys."""
    await state.store.delete_tenant(tenant_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/tenants/{tenant_id}/keys",
    status_code=status.HTTP_201_CREATED,
    response_model=MintedKey,
    responses=message_responses(400, 404),
)
async def mint_key(
    tenant_id: str, state: StateDep, body: Annotated[KeyCreate | None, Body()] = None
) -> MintedKey:
    """Mint a key; the answer's `key` is shown this once and never again."""
    request = body or KeyCreate()
    key, secret = await state.store.create_key(
        tenant_id, name=request.name, scopes=request.scopes, expires_at=request.expires_at
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
