"""Real processes for the suite: a redis-server and the embedded engine, each on a free port."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from redis.asyncio import Redis
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(
    port: int, *, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port} after {timeout}s")


@dataclass
class RedisServer:
    """A throw-away redis-server the suite owns; it can be stopped and started to test outages."""

    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    dir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="pgw-redis-"))

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, proc=self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


@dataclass
class Service:
    """A child process of the suite that serves HTTP on a port (engine, gateway)."""

    argv: Sequence[str]
    port: int
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, ready_path: str = "/", timeout: float = 30.0) -> None:
        env = {**os.environ, **self.env}
        log = tempfile.NamedTemporaryFile(prefix="pgw-svc-", suffix=".log", delete=False)
        self.log_path = Path(log.name)
        self.proc = subprocess.Popen(
            list(self.argv), env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT
        )
        wait_for_port(self.port, timeout=timeout, proc=self.proc)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + ready_path, timeout=2).status_code < 500:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{self.argv} not ready:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


# ---------------------------------------------------------------------------------------------
# The log scan: every log of every process the e2e tests start (gateways, the engine, the CLI's
# stderr) must be one JSON object per line and carry no key. `tests/e2e/conftest.py` runs it
# after each test over the lines written since the last scan.

# A key is `pgw_` + 43 characters; logs may show its 12-character prefix, never more of it.
_KEY_LIKE = re.compile(r"pgw_[A-Za-z0-9_-]{9,}")


@dataclass
class LogScan:
    """Logs to scan (path -> label, offset already scanned) and secrets that must not appear."""

    logs: dict[Path, tuple[str, int]] = field(default_factory=dict)
    texts: list[tuple[str, str]] = field(default_factory=list)  # captured stderr not yet scanned
    secrets: set[str] = field(default_factory=set)

    def watch(self, path: Path, label: str) -> None:
        self.logs.setdefault(path, (label, 0))

    def record(self, label: str, text: str) -> None:
        """Captured stderr of a command (its user-facing `error: ...` lines are not JSON logs:
        it is scanned for keys only)."""
        self.texts.append((label, text))

    def secret(self, value: str) -> None:
        self.secrets.add(value)

    def problems(self) -> list[str]:
        """Each offending line since the last call, with where it came from and why."""
        found: list[str] = []
        for path, (label, offset) in list(self.logs.items()):
            try:
                with path.open("rb") as handle:
                    handle.seek(offset)
                    data = handle.read()
            except FileNotFoundError:
                continue
            complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits
            self.logs[path] = (label, offset + len(complete))
            found += self._check(label, complete.decode(errors="replace"))
        for label, text in self.texts:
            found += self._check(label, text, json_lines=False)
        self.texts.clear()
        return found

    def _check(self, label: str, text: str, *, json_lines: bool = True) -> list[str]:
        found = []
        for line in text.splitlines():
            if not line.strip():
                continue
            leaked = [s for s in self.secrets if s in line] + _KEY_LIKE.findall(line)
            if leaked:
                found.append(f"{label}: a key in a log line: {line[:300]}")
            if not json_lines:
                continue
            try:
                parsed = json.loads(line)
            except ValueError:
                parsed = None
            if not isinstance(parsed, dict):
                found.append(f"{label}: not a JSON object: {line[:300]}")
        return found


LOG_SCAN = LogScan()


def cli(*args: str) -> list[str]:
    """argv that runs the project's console script with the suite's interpreter."""
    return [sys.executable, "-m", "app", *args]


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run a `piston-gateway` command; its stderr goes to the log scan, a key it prints on
    stdout (`keys create`) becomes a secret no log may show."""
    result = subprocess.run(
        cli(*args), env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )
    LOG_SCAN.record(f"cli {' '.join(args[:2])}", result.stderr)
    for key in _KEY_LIKE.findall(result.stdout):
        LOG_SCAN.secret(key)
    return result


def start_engine(port: int | None = None, env: dict[str, str] | None = None) -> Service:
    port = port or free_port()
    service = Service(cli("engine", "--port", str(port)), port, env=env or {})
    service.start(ready_path="/api/v2/runtimes")
    assert service.log_path is not None
    LOG_SCAN.watch(service.log_path, f"engine :{port}")
    return service


def start_gateway(
    *,
    redis_url: str | None,
    piston_url: str,
    admin_key: str | None = None,
    env: dict[str, str] | None = None,
    workers: int = 1,
) -> Service:
    """`piston-gateway serve` as a real process, ready when /healthz answers."""
    port = free_port()
    settings = {"GATEWAY_PISTON_URLS": piston_url, **(env or {})}
    if redis_url:
        settings["GATEWAY_REDIS_URL"] = redis_url
    if admin_key:
        settings["GATEWAY_ADMIN_KEY"] = admin_key
        LOG_SCAN.secret(admin_key)
    service = Service(
        cli("serve", "--port", str(port), "--workers", str(workers)), port, env=settings
    )
    service.start(ready_path="/healthz")
    assert service.log_path is not None
    LOG_SCAN.watch(service.log_path, f"gateway :{port}")
    return service


def engine_jobs(engine: Service) -> float:
    """How many jobs the engine has run, from its own /metrics: real executions, counted."""
    text = httpx.get(f"{engine.url}/metrics", timeout=5).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("pgw_engine_jobs_total{")
    )


def mint_key(gateway: Service, admin_key: str, tenant_id: str, **fields: object) -> str:
    """Create a tenant through the admin API and mint it an execute key; returns the key."""
    admin = {"Authorization": f"Bearer {admin_key}"}
    httpx.post(
        f"{gateway.url}/admin/tenants", headers=admin, json={"id": tenant_id, **fields}, timeout=10
    ).raise_for_status()
    minted = httpx.post(
        f"{gateway.url}/admin/tenants/{tenant_id}/keys", headers=admin, json={}, timeout=10
    )
    minted.raise_for_status()
    key = str(minted.json()["key"])
    LOG_SCAN.secret(key)
    return key


async def ws_conversation(
    url: str,
    messages: list[dict[str, Any] | str | bytes],
    headers: dict[str, str] | None = None,
    *,
    origin: str | None = None,
) -> tuple[list[dict[str, Any]], int | None]:
    """Send the messages one by one, then read until the server closes; (received, close code).

    A dict goes as JSON text; a str or bytes is sent as it is (a text or a binary frame).
    `origin`: the handshake's Origin header, as a browser sends it."""
    received: list[dict[str, Any]] = []
    async with ws_connect(
        url,
        additional_headers=headers or {},
        origin=origin,  # type: ignore[arg-type]
        proxy=None,
        max_size=None,
    ) as socket:
        try:
            # The server may close before every message is sent (a refused key is closed 1008 at
            # once): a send then raises ConnectionClosed, and the close code is the answer.
            for message in messages:
                await socket.send(
                    message if isinstance(message, str | bytes) else json.dumps(message)
                )
            async with asyncio.timeout(20):
                async for text in socket:
                    received.append(json.loads(text))
        except ConnectionClosed:
            pass
        return received, socket.protocol.close_rcvd.code if socket.protocol.close_rcvd else None


class MovableClock:
    """An `app.clock.Clock` that stands still until the test moves it (`advance`).

    It starts at the real time, so what the component stamps with it (a window's reset, a day)
    reads as now, and only ever moves forward, as time does."""

    def __init__(self) -> None:
        self._monotonic = time.monotonic()
        self._wall = time.time()

    def monotonic(self) -> float:
        return self._monotonic

    def wall(self) -> float:
        return self._wall

    def advance(self, seconds: float) -> None:
        assert seconds >= 0, "time does not go back"
        self._monotonic += seconds
        self._wall += seconds


async def until_expired(redis: Redis, key: str, *, within: float) -> None:
    """Until Redis has expired `key` (the event its TTL ends in); fails past `within` seconds.

    EXISTS expires a key whose TTL is over at once (Redis checks on access), so the poll sees
    the expiry itself, not Redis's background sweep."""
    assert await redis.exists(key), f"{key} is not there to expire"
    async with asyncio.timeout(within):
        while await redis.exists(key):  # noqa: ASYNC110 (a TTL's end is no event to await)
            await asyncio.sleep(0.01)
