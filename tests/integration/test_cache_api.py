"""The result cache as a client sees it: X-Cache, Cache-Control, scopes, what is not stored."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from app.redis import CACHE
from tests.conftest import Gateway, GatewayFactory
from tests.support import until_expired

RANDOM = {
    "language": "python",
    "version": "*",
    "files": [{"content": "import random\nprint(random.random())"}],
}


def _out(response: Any) -> str:
    return str(response.json()["run"]["stdout"])


class TestHitAndMiss:
    async def test_miss_then_hit_with_identical_bytes(self, gateway: Gateway) -> None:
        key = await gateway.tenant()
        first = await gateway.execute(key, RANDOM)
        second = await gateway.execute(key, RANDOM)
        assert (first.headers["x-cache"], second.headers["x-cache"]) == ("MISS", "HIT")
        assert first.content == second.content

    async def test_key_order_and_defaults_share_an_entry(self, gateway: Gateway) -> None:
        key = await gateway.tenant()
        await gateway.execute(key, RANDOM)
        reordered = {
            "files": RANDOM["files"],
            "version": "*",
            "language": "python",
            "stdin": "",
            "args": [],
            "run_timeout": 3000,
        }
        again = await gateway.execute(key, reordered)
        assert again.headers["x-cache"] == "HIT"

    async def test_aliases_resolve_to_the_same_entry(self, gateway: Gateway) -> None:
        key = await gateway.tenant()
        await gateway.execute(key, RANDOM)
        assert (await gateway.execute(key, {**RANDOM, "language": "py", "version": "3.x"})).headers[
            "x-cache"
        ] == "HIT"

    @pytest.mark.parametrize(
        "change",
        [
            {"stdin": "x"},
            {"args": ["x"]},
            {"run_timeout": 2999},
            {"files": [{"content": "import random\nprint(random.random())", "name": "other.py"}]},
        ],
    )
    async def test_what_changes_output_misses(
        self, gateway: Gateway, change: dict[str, Any]
    ) -> None:
        key = await gateway.tenant()
        await gateway.execute(key, RANDOM)
        assert (await gateway.execute(key, {**RANDOM, **change})).headers["x-cache"] == "MISS"


class TestCacheControl:
    async def test_no_cache_runs_again_and_stores(self, gateway: Gateway) -> None:
        key = await gateway.tenant()
        first = await gateway.execute(key, RANDOM)
        fresh = await gateway.execute(key, RANDOM, **{"Cache-Control": "no-cache"})
        assert fresh.headers["x-cache"] == "MISS"
        assert _out(fresh) != _out(first)
        after = await gateway.execute(key, RANDOM)
        assert after.headers["x-cache"] == "HIT"
        assert after.content == fresh.content

    async def test_no_store_neither_reads_nor_writes(self, gateway: Gateway) -> None:
        key = await gateway.tenant()
        skipped = await gateway.execute(key, RANDOM, **{"Cache-Control": "no-store"})
        assert skipped.headers["x-cache"] == "BYPASS"
        assert (await gateway.execute(key, RANDOM)).headers["x-cache"] == "MISS"

    async def test_tenant_with_cache_off(self, gateway: Gateway) -> None:
        key = await gateway.tenant(cache=False)
        outcomes = {(await gateway.execute(key, RANDOM)).headers["x-cache"] for _ in range(2)}
        assert outcomes == {"BYPASS"}

    async def test_ttl_zero_disables(self, make_gateway: GatewayFactory) -> None:
        gateway = await make_gateway(cache_ttl_seconds=0)
        key = await gateway.tenant()
        outcomes = {(await gateway.execute(key, RANDOM)).headers["x-cache"] for _ in range(2)}
        assert outcomes == {"BYPASS"}

    async def test_entries_expire(self, make_gateway: GatewayFactory) -> None:
        gateway = await make_gateway(cache_ttl_seconds=1)
        key = await gateway.tenant()
        await gateway.execute(key, RANDOM)
        assert (await gateway.execute(key, RANDOM)).headers["x-cache"] == "HIT"
        redis = gateway.state.redis
        [entry] = [name async for name in redis.scan_iter(match=f"{CACHE}*")]
        assert 0 < await redis.pttl(entry) <= 1_000  # the TTL the gateway was given
        await until_expired(redis, entry, within=5)
        assert (await gateway.execute(key, RANDOM)).headers["x-cache"] == "MISS"


class TestScope:
    async def test_tenants_are_kept_apart(self, gateway: Gateway) -> None:
        acme = await gateway.tenant("acme")
        globex = await gateway.tenant("globex")
        await gateway.execute(acme, RANDOM)
        assert (await gateway.execute(globex, RANDOM)).headers["x-cache"] == "MISS"

    async def test_global_scope_shares(self, make_gateway: GatewayFactory) -> None:
        gateway = await make_gateway(cache_scope="global")
        acme = await gateway.tenant("acme")
        globex = await gateway.tenant("globex")
        first = await gateway.execute(acme, RANDOM)
        shared = await gateway.execute(globex, RANDOM)
        assert shared.headers["x-cache"] == "HIT"
        assert shared.content == first.content


class TestNotStored:
    async def test_timeouts_are_not_stored(self, gateway: Gateway) -> None:
        key = await gateway.tenant()
        slow = {**RANDOM, "files": [{"content": "while True: pass"}], "run_timeout": 200}
        first = await gateway.execute(key, slow)
        assert first.json()["run"]["status"] == "TO"
        assert (await gateway.execute(key, slow)).headers["x-cache"] == "MISS"

    async def test_errors_are_not_stored(self, gateway: Gateway) -> None:
        key = await gateway.tenant()
        bad = {**RANDOM, "language": "cobol"}
        assert (await gateway.execute(key, bad)).status_code == 400
        assert (await gateway.execute(key, bad)).status_code == 400

    async def test_a_runtime_error_is_an_answer_and_is_stored(self, gateway: Gateway) -> None:
        key = await gateway.tenant()
        failing = {
            **RANDOM,
            "files": [{"content": "import random\nraise SystemExit(random.randint(1, 9))"}],
        }
        first = await gateway.execute(key, failing)
        assert first.json()["run"]["status"] == "RE"
        second = await gateway.execute(key, failing)
        assert second.headers["x-cache"] == "HIT"
        assert second.content == first.content


class TestSingleFlightInProcess:
    async def test_identical_requests_run_once(self, gateway: Gateway) -> None:
        key = await gateway.tenant(rate_limit="1000/minute")
        slow = {
            **RANDOM,
            "files": [{"content": "import random, time\ntime.sleep(0.5)\nprint(random.random())"}],
        }
        answers = await asyncio.gather(*(gateway.execute(key, slow) for _ in range(20)))
        assert {a.status_code for a in answers} == {200}
        assert len({_out(a) for a in answers}) == 1

    async def test_a_hit_still_counts_against_the_rate_limit(self, gateway: Gateway) -> None:
        key = await gateway.tenant(rate_limit="2/minute")
        await gateway.execute(key, RANDOM)
        hit = await gateway.execute(key, RANDOM)
        assert hit.headers["x-cache"] == "HIT"
        assert hit.headers["x-ratelimit-remaining"] == "0"
        assert (await gateway.execute(key, RANDOM)).status_code == 429
