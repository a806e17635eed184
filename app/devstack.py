"""`piston-gateway dev`: embedded defaults, and a dev tenant and key minted at start."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import typer

from app.settings import Settings
from app.state import AppState
from app.tenancy.models import TenantCreate

__all__ = ["dev_settings", "print_dev_banner"]

DEV_TENANT = "dev"


def dev_settings(engine_url: str) -> Settings:
    """The environment's settings, pointed at the embedded engine."""
    return Settings(piston_urls=[engine_url])


def print_dev_banner(base_url: str) -> Callable[[AppState], Awaitable[None]]:
    async def mint_and_print(state: AppState) -> None:
        if await state.store.get_tenant(DEV_TENANT) is None:
            await state.store.create_tenant(TenantCreate(id=DEV_TENANT, name="Development"))
        _, key = await state.store.create_key(
            DEV_TENANT, name="dev", scopes=["execute", "admin"], expires_at=None
        )
        runtimes = ", ".join(sorted({rt.language for rt in state.catalog.runtimes})) or "none"
        typer.echo(
            f"""
  piston-gateway is running at {base_url}   (docs: {base_url}/docs)
  upstream: {", ".join(u.url for u in state.pool.upstreams)}   runtimes: {runtimes}

  dev key (tenant '{DEV_TENANT}', scopes execute+admin, shown once):
    {key}

  try it:
    curl -s {base_url}/api/v2/execute -H 'Authorization: Bearer {key}' \\
      -H 'Content-Type: application/json' \\
      -d '{{"language": "python", "version": "*", "files": [{{"content": "print(6 * 7)"}}]}}'
""",
            err=True,
        )

    return mint_and_print
