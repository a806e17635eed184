"""`piston-gateway engine`: one uvicorn process serving the engine app."""

from __future__ import annotations

import asyncio
import sys

import structlog
import uvicorn

from app.engine.app import create_app
from app.engine.config import EngineSettings
from app.engine.jobs import Engine
from app.engine.sandbox import SandboxUnavailable
from app.logging import configure_logging

__all__ = ["run"]


def run(*, host: str = "127.0.0.1", port: int = 2000) -> None:
    """Prove the sandbox and find the runtimes first, so a broken host fails with one line."""
    settings = EngineSettings()
    engine = Engine(settings)
    try:
        asyncio.run(engine.prepare())
    except SandboxUnavailable as exc:
        engine.close()
        sys.stderr.write(f"piston-gateway engine: {exc}\n")
        raise SystemExit(1) from None
    configure_logging("info")  # JSON lines like the gateway's; no per-request access lines
    structlog.get_logger("app.engine").info(
        "engine_runtimes", runtimes=[f"{rt.language}-{rt.version}" for rt in engine.catalog]
    )
    # The asyncio loop, not uvloop: job stages drop to the job uid through subprocess's
    # user/group arguments, which uvloop's subprocess support lacks.
    uvicorn.run(
        create_app(settings, engine),
        host=host,
        port=port,
        loop="asyncio",
        workers=1,
        log_config=None,
        access_log=False,
        # No WebSocket message larger than an execute body is read (closed with 1009 past it).
        ws_max_size=settings.max_body_bytes,
    )
