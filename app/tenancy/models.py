"""Tenants, API keys and the Principal a request acts as."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Literal

from limits import parse_many
from pydantic import BaseModel, ConfigDict, Field, field_serializer, field_validator
from pydantic_core import PydanticCustomError

__all__ = [
    "TENANT_ID_PATTERN",
    "ApiKey",
    "KeyCreate",
    "Principal",
    "Scope",
    "Tenant",
    "TenantCreate",
    "TenantUpdate",
]

TENANT_ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
Scope = Literal["execute", "admin"]
Cap = Annotated[int, Field(ge=-1)] | None
PositiveOrNone = Annotated[int, Field(gt=0)] | None


def _default_scopes() -> list[Scope]:
    return ["execute"]


def _invalid(message: str) -> PydanticCustomError:
    """A validation error whose message is shown as is (no "Value error, " in front of it)."""
    return PydanticCustomError("invalid", message)


def _utc_iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class _TenantFields(BaseModel):
    """Policy fields shared by create, update and the stored tenant."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, max_length=200)
    allowed_languages: list[str] | None = None
    rate_limit: str | None = None
    max_concurrency: PositiveOrNone = None
    daily_quota: PositiveOrNone = None
    max_run_timeout: Cap = None
    max_compile_timeout: Cap = None
    max_run_cpu_time: Cap = None
    max_compile_cpu_time: Cap = None
    max_run_memory_limit: Cap = None
    max_compile_memory_limit: Cap = None
    cache: bool | None = None

    @field_validator("rate_limit")
    @classmethod
    def _valid_rate_limit(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            parse_many(value)
        except ValueError:
            raise _invalid(
                f"{value!r} is not a rate limit like '60/minute' or '10/second;500/hour'"
            ) from None
        return value

    @field_validator("allowed_languages")
    @classmethod
    def _languages(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        cleaned = [item.strip().lower() for item in value if item.strip()]
        if not cleaned:
            raise _invalid("name at least one language, or '*' for all")
        return cleaned


class TenantCreate(_TenantFields):
    id: str = Field(json_schema_extra={"pattern": TENANT_ID_PATTERN})

    @field_validator("id")
    @classmethod
    def _valid_id(cls, value: str) -> str:
        if re.fullmatch(TENANT_ID_PATTERN, value) is None:
            raise _invalid(
                f"{value!r} is not a tenant id: 1-64 characters of a-z, 0-9, '_' and '-', "
                "starting with a letter or digit"
            )
        return value


class TenantUpdate(_TenantFields):
    """PATCH body: only the fields sent are changed (`model_fields_set`)."""


class Tenant(BaseModel):
    """A stored tenant. None in a policy field means "the global default applies"."""

    model_config = ConfigDict(frozen=True)

    id: str = Field(pattern=TENANT_ID_PATTERN)
    name: str | None = None
    allowed_languages: list[str] = Field(default_factory=lambda: ["*"])
    rate_limit: str | None = None
    max_concurrency: PositiveOrNone = None
    daily_quota: PositiveOrNone = None
    max_run_timeout: Cap = None
    max_compile_timeout: Cap = None
    max_run_cpu_time: Cap = None
    max_compile_cpu_time: Cap = None
    max_run_memory_limit: Cap = None
    max_compile_memory_limit: Cap = None
    cache: bool = True
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    @field_serializer("created_at")
    def _ser_time(self, value: datetime) -> str | None:
        return _utc_iso(value)


class ApiKey(BaseModel):
    """A key as listed: never the secret, only its hash (kept out of answers) and prefix."""

    model_config = ConfigDict(frozen=True)

    id: str
    tenant: str
    name: str | None = None
    prefix: str
    scopes: list[Scope] = Field(default_factory=lambda: _default_scopes())
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    expires_at: datetime | None = None
    revoked: bool = False
    hash: str = Field(exclude=True, repr=False)

    @field_serializer("created_at", "expires_at")
    def _ser_time(self, value: datetime | None) -> str | None:
        return _utc_iso(value)

    def usable(self, now: datetime | None = None) -> bool:
        if self.revoked:
            return False
        return self.expires_at is None or self.expires_at > (now or datetime.now(UTC))


class KeyCreate(BaseModel):
    """Body of `POST /admin/tenants/{id}/keys`: every field optional."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, max_length=200)
    scopes: list[Scope] = Field(default_factory=lambda: _default_scopes(), min_length=1)
    expires_at: datetime | None = None

    @field_validator("scopes")
    @classmethod
    def _unique_scopes(cls, value: list[Scope]) -> list[Scope]:
        return list(dict.fromkeys(value))

    @field_validator("expires_at")
    @classmethod
    def _future_utc(cls, value: datetime | None) -> datetime | None:
        if value is None:
            return None
        # A time without an offset is read as UTC: every time this API shows is UTC.
        aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        if aware <= datetime.now(UTC):
            raise _invalid("must be in the future (ISO 8601 in UTC, e.g. 2026-12-31T00:00:00Z)")
        return aware.astimezone(UTC)


class Principal(BaseModel):
    """Who a request acts as: the tenant (with its policy), the key, its scopes."""

    model_config = ConfigDict(frozen=True)

    tenant: Tenant
    key_id: str
    key_prefix: str
    scopes: frozenset[str]

    def can(self, scope: str) -> bool:
        return scope in self.scopes
