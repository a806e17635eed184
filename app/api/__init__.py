"""Routers only: each module holds routes and calls into the modules above it.

`deps` holds what the routes depend on; `ROUTERS` is every router the app includes, in order.
"""

from __future__ import annotations

from fastapi import APIRouter

from app.api import admin, batch, ops, packages, piston

__all__ = ["ROUTERS"]

ROUTERS: tuple[APIRouter, ...] = (
    piston.router,
    packages.router,
    packages.admin_router,
    admin.router,
    ops.router,
    batch.router,
)
