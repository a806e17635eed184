"""The `piston-gateway` command: serve, engine, dev, and the tenant and key administration."""

from __future__ import annotations

import typer

__all__ = ["app", "main"]

app = typer.Typer(
    name="piston-gateway",
    help="API keys, tenants, rate limits and a result cache in front of Piston.",
    no_args_is_help=True,
    add_completion=False,
)


@app.command()
def engine(
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(2000, help="Port to listen on."),
) -> None:
    """Run the embedded Piston-compatible engine (host interpreters inside bubblewrap)."""
    from app.engine.server import run

    run(host=host, port=port)


def main() -> None:
    app()
