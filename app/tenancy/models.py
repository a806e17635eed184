"""Tenants, API keys and the Principal a request acts as."""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Final, Literal

from annotated_types import Ge, Gt, Le, MaxLen
from limits import RateLimitItem, parse_many
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    Strict,
    ValidationInfo,
    field_serializer,
    field_validator,
)
from pydantic_core import PydanticCustomError, PydanticKnownError, core_schema

from app.tenancy.origins import normalize_origins

__all__ = [
    "MAX_INTEGER",
    "TENANT_ID_PATTERN",
    "ApiKey",
    "KeyCreate",
    "Principal",
    "Scope",
    "Tenant",
    "TenantCreate",
    "TenantUpdate",
    "check_browser_key_scopes",
    "check_rate_limit",
]

TENANT_ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
Scope = Literal["execute", "admin"]
# The largest integer every JSON client reads exactly (a double's 53 bits): the contract's bound.
MAX_INTEGER: Final = 2**53 - 1
# "Longer than a year" is refused: a window nobody means, and TTLs Redis would refuse.
_MAX_WINDOW_SECONDS: Final = 365 * 86_400
_Strict = Strict()
# A window count as written ("1/0 second" is read by `limits` as one second).
_WINDOW_COUNT = re.compile(r"(?:/|\bper\b)\s*(\d+)", re.IGNORECASE)


def check_rate_limit(text: str) -> list[RateLimitItem]:
    """The windows of a limit string, or ValueError naming what is wrong with it.

    Beyond `limits`' syntax, a tenant must be able to run and every number must fit: an amount
    of at least 1, amounts and window counts up to MAX_INTEGER, windows of at most a year.
    """
    try:
        items = parse_many(text)
    except ValueError:
        raise ValueError(
            f"{text!r} is not a rate limit like '60/minute' or '10/second;500/hour'"
        ) from None
    for part in re.split(r"[;,|]", text):
        written = _WINDOW_COUNT.search(part)
        if written is not None and int(written.group(1)) == 0:
            raise ValueError(f"{part.strip()!r} has a window of 0; it must be at least 1")
    for item in items:
        if item.amount < 1:
            raise ValueError(f"'{item}' allows no request; the amount must be at least 1")
        if item.amount > MAX_INTEGER or item.multiples > MAX_INTEGER:
            raise ValueError(f"'{item}' holds a number above the maximum of {MAX_INTEGER}")
        if item.get_expiry() > _MAX_WINDOW_SECONDS:
            raise ValueError(f"'{item}' has a window longer than a year")
    return items


def _default_scopes() -> list[Scope]:
    return ["execute"]


def _invalid(message: str) -> PydanticCustomError:
    """A validation error whose message is shown as is (no "Value error, " in front of it)."""
    return PydanticCustomError("invalid", message)


def _utc_iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# A tenant's fields are read by two kinds of model. A client's JSON goes into the strict ones,
# `TenantCreate` and `TenantUpdate`: JSON integers only (not "5", 5.0 or true), a boolean only,
# every bound and check below, so nothing reaches Redis, orjson or Piston that they cannot hold.
# A stored tenant is read back by `Tenant` as it was written, some before those bounds existed
# (a timeout cap of -1, say): the checks do not run there, and its own looser bounds apply.
# Each field is declared once, in `_TenantFields`, with both kinds' bounds (`_Bounds`).


def _from_client(config: Mapping[str, Any] | None) -> bool:
    """True in the models a client's JSON is read into: the strict ones."""
    return bool(config and config.get("strict"))


_Bound = Ge | Gt | Le | MaxLen


def _check_bound(bound: _Bound, value: Any) -> None:
    """Pydantic's own error for the bound, as `Field(ge=..., ...)` would raise it."""
    if isinstance(bound, Ge) and value < bound.ge:
        raise PydanticKnownError("greater_than_equal", {"ge": bound.ge})
    if isinstance(bound, Gt) and value <= bound.gt:
        raise PydanticKnownError("greater_than", {"gt": bound.gt})
    if isinstance(bound, Le) and value > bound.le:
        raise PydanticKnownError("less_than_equal", {"le": bound.le})
    if isinstance(bound, MaxLen) and len(value) > bound.max_length:
        raise PydanticKnownError("string_too_long", {"max_length": bound.max_length})


_JSON_SCHEMA_KEYS: Final[dict[type[_Bound], tuple[str, str]]] = {
    Ge: ("minimum", "ge"),
    Gt: ("exclusiveMinimum", "gt"),
    Le: ("maximum", "le"),
    MaxLen: ("maxLength", "max_length"),
}


@dataclass(frozen=True, slots=True)
class _Bounds:
    """A field's bounds: `client` on a client's JSON, `stored` on a stored tenant."""

    client: tuple[_Bound, ...]
    stored: tuple[_Bound, ...] = ()

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.with_info_after_validator_function(self._check, handler(source))

    def _check(self, value: Any, info: ValidationInfo) -> Any:
        if value is not None:
            for bound in self.client if _from_client(info.config) else self.stored:
                _check_bound(bound, value)
        return value

    def json_schema(self, *, client: bool) -> dict[str, Any]:
        bounds = self.client if client else self.stored
        return {key: getattr(b, attr) for b in bounds for key, attr in [_JSON_SCHEMA_KEYS[type(b)]]}


def _bounds_in_schema(schema: dict[str, Any], model: type[Any]) -> None:
    """Each field's bounds in the model's JSON schema, as that model checks them."""
    client = _from_client(model.model_config)
    for name, field in model.model_fields.items():
        for bounds in field.metadata:
            if isinstance(bounds, _Bounds):
                prop = schema["properties"][name]
                typed = next(p for p in prop.get("anyOf", [prop]) if p.get("type") != "null")
                typed.update(bounds.json_schema(client=client))


_FITS = Le(MAX_INTEGER)
Count = Annotated[int | None, _Bounds(client=(Ge(1), _FITS), stored=(Gt(0),))]
TimeCap = Annotated[int | None, _Bounds(client=(Ge(1), _FITS), stored=(Ge(-1),))]
MemoryCap = Annotated[int | None, _Bounds(client=(Ge(-1), _FITS), stored=(Ge(-1),))]
Name = Annotated[str | None, _Bounds(client=(MaxLen(200),))]


class _TenantFields(BaseModel):
    """A tenant's policy fields, each declared once; None means "the default applies"."""

    model_config = ConfigDict(json_schema_extra=_bounds_in_schema)

    name: Name = None
    allowed_languages: list[str] | None = None
    rate_limit: str | None = None
    max_concurrency: Count = None
    daily_quota: Count = None
    max_run_timeout: TimeCap = None
    max_compile_timeout: TimeCap = None
    max_run_cpu_time: TimeCap = None
    max_compile_cpu_time: TimeCap = None
    max_run_memory_limit: MemoryCap = None
    max_compile_memory_limit: MemoryCap = None
    cache: bool | None = None

    @field_validator("rate_limit")
    @classmethod
    def _valid_rate_limit(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None or not _from_client(info.config):
            return value
        try:
            check_rate_limit(value)
        except ValueError as exc:
            raise _invalid(str(exc)) from None
        return value

    @field_validator("name", "allowed_languages")
    @classmethod
    def _no_nul(cls, value: str | list[str] | None, info: ValidationInfo) -> str | list[str] | None:
        # A NUL ends a C string: a name or language that holds one is never what was meant.
        texts = [value] if isinstance(value, str) else value or []
        if _from_client(info.config) and any("\x00" in text for text in texts):
            raise _invalid("must not contain a NUL character")
        return value

    @field_validator("allowed_languages")
    @classmethod
    def _languages(cls, value: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if value is None or not _from_client(info.config):
            return value
        cleaned = [item.strip().lower() for item in value if item.strip()]
        if not cleaned:
            raise _invalid("name at least one language, or '*' for all")
        return cleaned


class _ClientTenantFields(_TenantFields):
    """The fields as a client sends them (see above): strict, checked, nothing else accepted."""

    model_config = ConfigDict(strict=True, extra="forbid")


class TenantCreate(_ClientTenantFields):
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


class TenantUpdate(_ClientTenantFields):
    """PATCH body: only the fields sent are changed (`model_fields_set`)."""


class _StoredId(BaseModel):
    # A base of its own so that `id` comes first in a stored tenant, as it is shown.
    id: str = Field(pattern=TENANT_ID_PATTERN)


class Tenant(_TenantFields, _StoredId):
    """A stored tenant. None in a policy field means "the global default applies"."""

    model_config = ConfigDict(frozen=True)

    # The two fields a stored tenant always has (None in a client's JSON means these defaults).
    allowed_languages: list[str] = Field(default_factory=lambda: ["*"])
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
    # A browser key's origins (normalized) and per-client limit; None for an ordinary key.
    allowed_origins: list[str] | None = None
    client_rate_limit: str | None = None
    hash: str = Field(exclude=True, repr=False)

    @field_serializer("created_at", "expires_at")
    def _ser_time(self, value: datetime | None) -> str | None:
        return _utc_iso(value)

    def usable(self, now: float | None = None) -> bool:
        """Neither revoked nor expired at `now` (epoch seconds; the real time by default)."""
        if self.revoked:
            return False
        if self.expires_at is None:
            return True  # the common key: no time read at all
        return self.expires_at.timestamp() > (time.time() if now is None else now)


def check_browser_key_scopes(scopes: Iterable[str]) -> None:
    """A browser key sits in public pages, and any script can send its Origin: it may run code
    (within its per-client limit) but never administer. ValueError otherwise."""
    if "admin" in scopes:
        raise ValueError(
            "a browser key (allowed_origins) is public in its pages and cannot have the admin"
            " scope; mint a separate key for administration"
        )


class KeyCreate(BaseModel):
    """Body of `POST /admin/tenants/{id}/keys`: every field optional."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, max_length=200)
    scopes: list[Scope] = Field(default_factory=lambda: _default_scopes(), min_length=1)
    expires_at: datetime | None = None
    allowed_origins: list[Annotated[str, _Strict]] | None = Field(
        default=None,
        description="Makes a browser key: it works only from these origins (scheme://host[:port])"
        " and CORS answers them.",
        examples=[["https://app.example.com", "http://localhost:5173"]],
    )
    client_rate_limit: Annotated[str, _Strict] | None = Field(
        default=None,
        description="Limits each client address using the key, on top of the tenant's rate_limit"
        " (the limits syntax).",
        examples=["10/minute"],
    )

    @field_validator("name")
    @classmethod
    def _no_nul(cls, value: str | None) -> str | None:
        if value is not None and "\x00" in value:
            raise _invalid("must not contain a NUL character")
        return value

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, value: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if value is None:
            return None
        try:
            check_browser_key_scopes(info.data.get("scopes", ()))
            return normalize_origins(value)
        except ValueError as exc:
            raise _invalid(str(exc)) from None

    @field_validator("client_rate_limit")
    @classmethod
    def _client_limit(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            check_rate_limit(value)
        except ValueError as exc:
            raise _invalid(str(exc)) from None
        return value

    @field_validator("scopes")
    @classmethod
    def _unique_scopes(cls, value: list[Scope]) -> list[Scope]:
        return list(dict.fromkeys(value))

    @field_validator("expires_at", mode="before")
    @classmethod
    def _iso_text(cls, value: object) -> object:
        # Strict like every admin field: 1893456000 is not read as a time.
        if value is not None and not isinstance(value, str):
            raise _invalid("must be an ISO 8601 time in UTC, e.g. 2026-12-31T00:00:00Z")
        return value

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
    # From the key: a browser key's normalized origins (None: any or no Origin) and the limit
    # of each client address using it (None: only the tenant's limits).
    allowed_origins: frozenset[str] | None = None
    client_rate_limit: str | None = None

    def can(self, scope: str) -> bool:
        return scope in self.scopes
