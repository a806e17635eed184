"""The request policy: allow-lists and caps turn a parsed request into the effective request.

One pure function, so what is forwarded, cached and counted is decided in one place and can be
tested over a table of cases.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType

from app.errors import BadRequest, Forbidden
from app.memo import IdentityMemo
from app.protocol.errors import InvalidRequest
from app.protocol.resolve import Runtime
from app.protocol.schemas import LIMIT_FIELDS, ExecuteRequest, enforce_caps
from app.settings import Settings
from app.tenancy.models import Tenant, TenantCreate, TenantUpdate

__all__ = ["check_tenant_caps", "effective_caps", "effective_request", "language_allowed"]


def language_allowed(language: str, *allow_lists: Sequence[str]) -> bool:
    """True when every list allows the canonical language (`*` allows all)."""
    return all("*" in allowed or language in allowed for allowed in allow_lists)


def _tightest(*caps: int | None) -> int:
    """The smallest real cap; -1 (none) when no level sets one."""
    real = [cap for cap in caps if cap is not None and cap > 0]
    return min(real) if real else -1


def check_tenant_caps(fields: TenantCreate | TenantUpdate, settings: Settings) -> None:
    """400 for a tenant cap above the global maximum: it would be stored but never apply."""
    global_caps = settings.global_caps
    for name in LIMIT_FIELDS:
        value = getattr(fields, f"max_{name}")
        cap = global_caps[name]
        if value is not None and cap > 0 and value > cap:
            raise BadRequest(
                f"max_{name}: {value} is above the global maximum of {cap} "
                f"(GATEWAY_MAX_{name.upper()})"
            )


def _caps(tenant: Tenant, settings: Settings) -> Mapping[str, int]:
    global_caps = settings.global_caps
    return MappingProxyType(
        {
            name: _tightest(getattr(tenant, f"max_{name}"), global_caps[name])
            for name in LIMIT_FIELDS
        }
    )


_caps_of: IdentityMemo[Mapping[str, int]] = IdentityMemo(_caps)


def effective_caps(tenant: Tenant, settings: Settings) -> Mapping[str, int]:
    """Each limit's cap for this tenant: its own `max_*`, under the global maximum (computed
    once per tenant object and settings: app.memo)."""
    return _caps_of(tenant, settings)


def effective_request(
    tenant: Tenant,
    request: ExecuteRequest,
    runtime: Runtime,
    *,
    global_languages: Sequence[str],
    caps: Mapping[str, int],
) -> ExecuteRequest:
    """The request as it will run: canonical runtime, allowed, every capped limit filled in.

    Raises Forbidden for a language outside either allow-list and BadRequest (Piston's wording)
    for a limit above its cap or negative.
    """
    if not language_allowed(runtime.language, global_languages, tenant.allowed_languages):
        raise Forbidden(f"language '{runtime.language}' is not allowed for this key")
    try:
        enforce_caps(request, caps)
    except InvalidRequest as exc:  # the protocol's 400, as the gateway's own
        raise BadRequest(exc.message) from None
    limits: dict[str, int | None] = {}
    for name in LIMIT_FIELDS:
        asked = request.limits.get(name)
        cap = caps.get(name, -1)
        # An omitted (or 0, which Piston treats as omitted) limit runs at the tenant's cap.
        limits[name] = (cap if cap > 0 else None) if not asked else asked
    return ExecuteRequest(
        language=runtime.language,
        version=runtime.version,
        files=request.files,
        stdin=request.stdin,
        args=request.args,
        limits=limits,
    )
