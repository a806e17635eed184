"""Redis through Sentinel: a real `redis-server --sentinel` monitoring the suite's Redis.

open_redis asks the sentinel for the master's address, then talks to that master with the same
client name and timeouts as a plain URL; the URL's own host and port are not used.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from app.main import open_redis
from app.settings import Settings
from tests.support import RedisServer, free_port, wait_for_port

MASTER = "pgw-test-master"
_DB = 6
UNUSED_HOST_URL = f"redis://203.0.113.1:1/{_DB}"  # TEST-NET-3: connecting there would hang/fail


@pytest.fixture(scope="module")
def sentinel(redis_server: RedisServer) -> Iterator[str]:
    binary = shutil.which("redis-server")
    assert binary, "redis-server is not installed"
    port = free_port()
    folder = Path(tempfile.mkdtemp(prefix="pgw-sentinel-"))
    config = folder / "sentinel.conf"
    config.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {folder}\n"
        f"sentinel monitor {MASTER} 127.0.0.1 {redis_server.port} 1\n"
    )
    proc = subprocess.Popen(
        [binary, str(config), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for_port(port, proc=proc)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(folder, ignore_errors=True)


async def _client_names(redis_server: RedisServer) -> list[str]:
    direct = Redis.from_url(redis_server.url)
    try:
        return [str(c.get("name")) for c in await direct.client_list()]
    finally:
        await direct.aclose()


async def test_sentinel_client_reaches_the_master(sentinel: str, redis_server: RedisServer) -> None:
    client = open_redis(
        UNUSED_HOST_URL, name="pgw-sentinel", sentinels=[sentinel], sentinel_master=MASTER
    )
    direct = Redis.from_url(redis_server.url.rsplit("/", 1)[0] + f"/{_DB}")
    try:
        await client.set("pgw:sentinel:probe", "yes")
        assert await client.get("pgw:sentinel:probe") == b"yes"
        # It is the suite's Redis, in the URL's database.
        assert await direct.get("pgw:sentinel:probe") == b"yes"
        assert any(name.startswith("pgw-sentinel-") for name in await _client_names(redis_server))
    finally:
        await client.delete("pgw:sentinel:probe")
        await client.aclose()
        await direct.aclose()


async def test_sentinels_come_from_the_environment(
    sentinel: str, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GATEWAY_REDIS_SENTINELS", sentinel)
    monkeypatch.setenv("GATEWAY_REDIS_SENTINEL_MASTER", MASTER)
    client = open_redis(UNUSED_HOST_URL, name="pgw-sentinel-env")
    try:
        assert await client.ping()  # the URL's host is unreachable: only the sentinel helps
    finally:
        await client.aclose()


async def test_an_unknown_master_is_a_redis_error_not_a_hang(sentinel: str) -> None:
    from redis.exceptions import RedisError

    client = open_redis(
        UNUSED_HOST_URL, name="pgw-sentinel", sentinels=[sentinel], sentinel_master="no-such-master"
    )
    try:
        with pytest.raises(RedisError):
            await client.ping()
    finally:
        await client.aclose()


def test_sentinel_settings_parse_and_reject_bad_addresses() -> None:
    settings = Settings(redis_sentinels="s-0:26379, [fd00::1]:26379", redis_sentinel_master="m")
    assert settings.redis_sentinels == ["s-0:26379", "[fd00::1]:26379"]
    with pytest.raises(ValueError, match="host:port"):
        Settings(redis_sentinels="s-0")
