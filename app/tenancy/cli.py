"""`piston-gateway tenants ...` and `piston-gateway keys ...`: the same store the server uses.

The CLI writes straight to Redis (`GATEWAY_REDIS_URL`) through `RedisTenantStore`, so its changes
publish the same invalidations as the admin API and every running gateway sees them at once.
Every failure is one line on stderr and exit code 1; a traceback would be a bug.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, Final, TypeVar

import typer
from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.errors import GatewayError, NotFound
from app.limits import create_gate
from app.policy import check_tenant_caps
from app.redis import open_redis
from app.settings import Settings
from app.tenancy.keys import parse_duration
from app.tenancy.models import (
    ApiKey,
    Scope,
    Tenant,
    TenantCreate,
    check_browser_key_scopes,
    check_rate_limit,
)
from app.tenancy.origins import normalize_origins
from app.tenancy.store import RedisTenantStore

__all__ = ["keys_app", "tenants_app"]

_T = TypeVar("_T")
_REDIS_TIMEOUT_SECONDS: Final = 3.0

tenants_app = typer.Typer(
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False
)
keys_app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code=1)


def _describe(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first.get("loc", ()))
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


def _settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        raise _fail(f"invalid settings: {_describe(exc)}") from None


def _redis_url() -> str:
    settings = _settings()
    if settings.redis_url is None:
        raise _fail(
            "GATEWAY_REDIS_URL is not set: the CLI edits the store the gateway reads, which is "
            "Redis (e.g. GATEWAY_REDIS_URL=redis://127.0.0.1:6379/0)"
        )
    return str(settings.redis_url)


def _where(url: str) -> str:
    """The Redis address without credentials, for error messages."""
    return url.rsplit("@", 1)[-1].split("://", 1)[-1]


def _run(action: Callable[[RedisTenantStore], Awaitable[_T]]) -> _T:
    return _run_on_redis(lambda store, _: action(store))


def _run_on_redis(action: Callable[[RedisTenantStore, Redis], Awaitable[_T]]) -> _T:
    url = _redis_url()

    async def main() -> _T:
        redis = open_redis(
            url,
            name="pgw-cli",
            connect_timeout_s=_REDIS_TIMEOUT_SECONDS,
            timeout_s=_REDIS_TIMEOUT_SECONDS,
        )
        try:
            return await action(RedisTenantStore(redis), redis)
        finally:
            await redis.aclose()

    try:
        return asyncio.run(main())
    except GatewayError as exc:
        raise _fail(exc.message) from None
    except (RedisError, OSError) as exc:
        raise _fail(f"cannot reach Redis at {_where(url)}: {exc}") from None


def _echo_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2))


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [
        max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=False)
    ]
    for line in (headers, *rows):
        typer.echo(
            "  ".join(
                str(cell).ljust(width) for cell, width in zip(line, widths, strict=True)
            ).rstrip()
        )


def _shown(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ",".join(str(item) for item in value)
    return str(value)


def _print_tenant(tenant: Tenant, *, as_json: bool) -> None:
    fields = tenant.model_dump(mode="json")
    if as_json:
        _echo_json(fields)
        return
    width = max(len(name) for name in fields)
    for name, value in fields.items():
        typer.echo(f"{name.ljust(width)}  {_shown(value)}")


def _key_status(key: ApiKey) -> str:
    if key.revoked:
        return "revoked"
    return "active" if key.usable() else "expired"


# --- tenants ----------------------------------------------------------------------------------


@tenants_app.command("create")
def create_tenant(
    tenant_id: Annotated[str, typer.Argument(metavar="ID", help="Tenant id: [a-z0-9][a-z0-9_-]*.")],
    name: Annotated[str | None, typer.Option(help="Display name.")] = None,
    languages: Annotated[
        str | None, typer.Option(help="Allowed languages, comma separated (python,scala), or '*'.")
    ] = None,
    rate_limit: Annotated[
        str | None, typer.Option(help="Rate limit, e.g. 60/minute or 10/second;500/hour.")
    ] = None,
    max_concurrency: Annotated[
        int | None, typer.Option(help="Executions in flight at once.")
    ] = None,
    daily_quota: Annotated[int | None, typer.Option(help="Executions per UTC day.")] = None,
    max_run_timeout: Annotated[int | None, typer.Option(help="Cap on run_timeout (ms).")] = None,
    max_compile_timeout: Annotated[
        int | None, typer.Option(help="Cap on compile_timeout (ms).")
    ] = None,
    max_run_cpu_time: Annotated[int | None, typer.Option(help="Cap on run_cpu_time (ms).")] = None,
    max_compile_cpu_time: Annotated[
        int | None, typer.Option(help="Cap on compile_cpu_time (ms).")
    ] = None,
    max_run_memory_limit: Annotated[
        int | None, typer.Option(help="Cap on run_memory_limit (bytes, -1 none).")
    ] = None,
    max_compile_memory_limit: Annotated[
        int | None, typer.Option(help="Cap on compile_memory_limit (bytes, -1 none).")
    ] = None,
    cache: Annotated[bool, typer.Option("--cache/--no-cache", help="Use the result cache.")] = True,
    as_json: JsonFlag = False,
) -> None:
    """Create a tenant; omitted limits take the gateway's global defaults."""
    fields: dict[str, Any] = {
        "id": tenant_id,
        "name": name,
        "allowed_languages": languages.split(",") if languages is not None else None,
        "rate_limit": rate_limit,
        "max_concurrency": max_concurrency,
        "daily_quota": daily_quota,
        "max_run_timeout": max_run_timeout,
        "max_compile_timeout": max_compile_timeout,
        "max_run_cpu_time": max_run_cpu_time,
        "max_compile_cpu_time": max_compile_cpu_time,
        "max_run_memory_limit": max_run_memory_limit,
        "max_compile_memory_limit": max_compile_memory_limit,
        "cache": cache,
    }
    try:
        data = TenantCreate.model_validate(fields)
        check_tenant_caps(data, _settings())
    except ValidationError as exc:
        raise _fail(_describe(exc)) from None
    except GatewayError as exc:
        raise _fail(exc.message) from None
    tenant = _run(lambda store: store.create_tenant(data))
    _print_tenant(tenant, as_json=as_json)


@tenants_app.command("list")
def list_tenants(as_json: JsonFlag = False) -> None:
    """List every tenant."""
    tenants = _run(lambda store: store.list_tenants())
    if as_json:
        _echo_json([tenant.model_dump(mode="json") for tenant in tenants])
        return
    _table(
        ["ID", "NAME", "LANGUAGES", "RATE LIMIT", "CONCURRENCY", "DAILY QUOTA", "CACHE"],
        [
            [
                tenant.id,
                _shown(tenant.name),
                _shown(tenant.allowed_languages),
                _shown(tenant.rate_limit),
                _shown(tenant.max_concurrency),
                _shown(tenant.daily_quota),
                _shown(tenant.cache),
            ]
            for tenant in tenants
        ],
    )


@tenants_app.command("show")
def show_tenant(
    tenant_id: Annotated[str, typer.Argument(metavar="ID")], as_json: JsonFlag = False
) -> None:
    """Show one tenant."""

    async def fetch(store: RedisTenantStore) -> Tenant:
        tenant = await store.get_tenant(tenant_id)
        if tenant is None:
            raise NotFound(f"tenant '{tenant_id}' does not exist")
        return tenant

    _print_tenant(_run(fetch), as_json=as_json)


@tenants_app.command("delete")
def delete_tenant(tenant_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """Delete a tenant, revoking all its keys and dropping its usage and counters."""
    settings = _settings()

    async def delete(store: RedisTenantStore, redis: Redis) -> None:
        tenant = await store.get_tenant(tenant_id)
        if tenant is None:
            raise NotFound(f"tenant '{tenant_id}' does not exist")
        await store.delete_tenant(tenant_id)
        # The gate that counts for the server, so the counters it wrote are the ones found.
        gate = create_gate(redis, settings=settings, metrics=None)
        await gate.forget(tenant)

    _run_on_redis(delete)
    typer.echo(f"deleted tenant '{tenant_id}' and revoked its keys", err=True)


# --- keys -------------------------------------------------------------------------------------


@keys_app.command("create")
def create_key(
    tenant_id: Annotated[str, typer.Argument(metavar="TENANT")],
    name: Annotated[str | None, typer.Option(help="A label to recognise the key by.")] = None,
    admin: Annotated[bool, typer.Option("--admin", help="Also grant the admin scope.")] = False,
    expires_in: Annotated[
        str | None, typer.Option(help="Lifetime: 30d, 12h, 90m, 45s or 2w (default: never).")
    ] = None,
    origin: Annotated[
        list[str] | None,
        typer.Option(
            "--origin",
            metavar="URL",
            help="Make a browser key that works only from this origin (scheme://host[:port]);"
            " repeat for several.",
        ),
    ] = None,
    client_rate_limit: Annotated[
        str | None,
        typer.Option(
            metavar="LIMIT", help="Limit each client address using the key, e.g. 10/minute."
        ),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Mint a key for TENANT and print it: this is the only time it is shown."""
    try:
        expires_at = datetime.now(UTC) + parse_duration(expires_in) if expires_in else None
    except ValueError as exc:
        raise _fail(f"--expires-in: {exc}") from None
    try:
        if origin and admin:
            check_browser_key_scopes(["admin"])
        origins = normalize_origins(origin) if origin else None
    except ValueError as exc:
        raise _fail(f"--origin: {exc}") from None
    if client_rate_limit is not None:
        try:
            check_rate_limit(client_rate_limit)
        except ValueError as exc:
            raise _fail(f"--client-rate-limit: {exc}") from None
    scopes: list[Scope] = ["execute", "admin"] if admin else ["execute"]
    key, secret = _run(
        lambda store: store.create_key(
            tenant_id,
            name=name,
            scopes=scopes,
            expires_at=expires_at,
            allowed_origins=origins,
            client_rate_limit=client_rate_limit,
        )
    )
    if as_json:
        _echo_json({**key.model_dump(mode="json"), "key": secret})
    else:
        # The key alone on stdout, so `KEY=$(piston-gateway keys create acme)` just works.
        typer.echo(secret)
    typer.echo(
        f"key {key.id} ({key.prefix}..., scopes {','.join(key.scopes)}) for tenant "
        f"'{key.tenant}': store it now, it cannot be shown again",
        err=True,
    )


@keys_app.command("list")
def list_keys(
    tenant_id: Annotated[str, typer.Argument(metavar="TENANT")], as_json: JsonFlag = False
) -> None:
    """List a tenant's keys (never the keys themselves: only their prefixes)."""
    keys = _run(lambda store: store.list_keys(tenant_id))
    if as_json:
        _echo_json([key.model_dump(mode="json") for key in keys])
        return
    _table(
        ["ID", "PREFIX", "NAME", "SCOPES", "CREATED", "EXPIRES", "STATUS"],
        [
            [
                key.id,
                key.prefix,
                _shown(key.name),
                _shown(key.scopes),
                _shown(key.model_dump(mode="json")["created_at"]),
                _shown(key.model_dump(mode="json")["expires_at"]),
                _key_status(key),
            ]
            for key in keys
        ],
    )


@keys_app.command("revoke")
def revoke_key(key_id: Annotated[str, typer.Argument(metavar="KEY_ID")]) -> None:
    """Revoke a key; every gateway refuses it within 2 seconds."""
    key = _run(lambda store: store.revoke_key(key_id))
    typer.echo(f"revoked {key.id} ({key.prefix}...) of tenant '{key.tenant}'", err=True)
