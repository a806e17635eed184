"""The `piston-gateway` command: serve, engine, dev, and the tenant and key administration.

The entry point of two programs, so each command imports its own inside it (the one place that
does): `engine` loads nothing of the gateway, `serve` nothing of the engine, and `--help` neither.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import typer

__all__ = ["app", "main"]

app = typer.Typer(
    name="piston-gateway",
    help="API keys, tenants, rate limits and a result cache in front of Piston.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code=1)


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, help="Port to listen on."),
    workers: int | None = typer.Option(
        None, min=1, help="Worker processes (default: $WEB_CONCURRENCY or 1)."
    ),
) -> None:
    """Run the gateway (uvicorn). Settings come from GATEWAY_* variables or .env."""
    import shutil
    import tempfile

    import uvicorn
    from pydantic import ValidationError

    from app.logging import configure_logging
    from app.metrics import MULTIPROC_DIR_VARIABLE
    from app.server import uvicorn_options
    from app.settings import Settings

    try:
        settings = Settings()
    except ValidationError as exc:
        raise _fail(f"invalid settings:\n{exc}") from None
    configure_logging(settings.log_level)
    os.environ["PGW_JSON_LOGS"] = "1"  # worker processes configure the same JSON logs
    processes = workers or int(os.environ.get("WEB_CONCURRENCY") or 1)
    metrics_dir = None
    if processes > 1 and not os.environ.get(MULTIPROC_DIR_VARIABLE):
        # Each worker writes its metrics here and a scrape sums them (app/metrics.py); the
        # directory is this run's own, made empty and removed when serve stops.
        metrics_dir = tempfile.mkdtemp(prefix="pgw-metrics-")
        os.environ[MULTIPROC_DIR_VARIABLE] = metrics_dir
    try:
        uvicorn.run(
            "app.main:create_app",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            proxy_headers=False,  # X-Forwarded-For is trusted only per GATEWAY_TRUSTED_PROXIES
            **uvicorn_options(settings),
        )
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


@app.command()
def engine(
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(2000, help="Port to listen on."),
) -> None:
    """Run the embedded Piston-compatible engine (host interpreters inside bubblewrap)."""
    from app.engine.server import run

    run(host=host, port=port)


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """In the engine child: SIGTERM it when `dev` goes. uvicorn re-raises the signal that stopped
    it once it has shut down, so `dev` dies by that signal and its `finally` never runs."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


@contextlib.contextmanager
def _engine_process(port: int) -> Iterator[str]:
    import httpx

    proc = subprocess.Popen(
        [sys.executable, "-m", "app", "engine", "--port", str(port)],
        preexec_fn=_die_with_parent,  # safe: dev has started no threads yet
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise _fail("the embedded engine did not start (see its message above)")
            try:
                if httpx.get(f"{url}/api/v2/runtimes", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise _fail("the embedded engine did not answer within 30 s")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@app.command()
def dev(
    host: str = typer.Option("127.0.0.1", help="Address for the gateway."),
    port: int = typer.Option(8000, help="Port for the gateway."),
    engine_port: int = typer.Option(
        2000, help="Port for the embedded engine (a free one if taken)."
    ),
) -> None:
    """The embedded engine and the gateway together, with a dev tenant and key printed at start."""
    import uvicorn

    from app.devstack import dev_settings, print_dev_banner
    from app.logging import configure_logging
    from app.main import create_app
    from app.server import uvicorn_options

    if not _port_free(port):
        raise _fail(f"port {port} is taken; pass --port")
    chosen = engine_port if _port_free(engine_port) else _free_port()
    with _engine_process(chosen) as engine_url:
        settings = dev_settings(engine_url)
        configure_logging(settings.log_level)
        gateway = create_app(settings)
        gateway.state.on_started = [print_dev_banner(f"http://{host}:{port}")]
        uvicorn.run(
            gateway,
            host=host,
            port=port,
            **uvicorn_options(settings),  # the same bounds on connections as `serve`
        )


@app.command()
def bootstrap(
    runtimes: str | None = typer.Option(
        None,
        help="LANGUAGE=VERSION,... to install (default: $GATEWAY_BOOTSTRAP_RUNTIMES,"
        " itself python=3.10.0,scala=3.0.0).",
    ),
    wait: float = typer.Option(
        300, min=0, help="Seconds to wait for every upstream to answer /api/v2/runtimes."
    ),
    progress_every: float = typer.Option(
        10, min=0.1, help="Seconds between progress lines while waiting or installing."
    ),
) -> None:
    """Install runtimes on every upstream in GATEWAY_PISTON_URLS (only what is missing)."""
    import asyncio

    from pydantic import ValidationError

    from app.bootstrap import bootstrap as run_bootstrap
    from app.bootstrap import parse_runtimes
    from app.settings import Settings

    try:
        settings = Settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"GATEWAY_{'.'.join(str(p) for p in error['loc']).upper()}: {error['msg']}"
            for error in exc.errors()
        )
        raise _fail(f"invalid settings: {problems}") from None
    try:
        wanted = parse_runtimes(runtimes if runtimes is not None else settings.bootstrap_runtimes)
    except ValueError as exc:
        raise _fail(f"--runtimes: {exc}") from None

    def echo(line: str) -> None:
        typer.echo(line)

    urls = [str(url) for url in settings.piston_urls]
    names = ", ".join(str(r) for r in wanted)
    echo(
        f"bootstrap: {names} on {', '.join(u.rstrip('/') for u in urls)} (waiting up to {wait:g} s)"
    )
    if not asyncio.run(
        run_bootstrap(urls, wanted, wait=wait, echo=echo, progress_every=progress_every)
    ):
        raise typer.Exit(code=1)


def _register_admin_commands() -> None:
    with contextlib.suppress(ImportError):
        from app.tenancy.cli import keys_app, tenants_app

        app.add_typer(tenants_app, name="tenants", help="Create, list and show tenants.")
        app.add_typer(keys_app, name="keys", help="Mint, list and revoke API keys.")


_register_admin_commands()


def main() -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app()
