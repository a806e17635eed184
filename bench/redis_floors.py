"""Redis client micro-floors: which call path can the hot path afford? (issue 13, item 1)

Every client does the gateway's real admit script (app/limits/redis_gate.py ADMIT_SCRIPT) with
the keys and arguments a cache hit of a bench tenant sends, against a redis-server of its own:

- redis-py's asyncio client, configured as the gateway configures it (app.redis.open_redis);
- coredis (its `register_script`, EVALSHA with NOSCRIPT fallback);
- valkey-glide (`invoke_script`; a Rust core on a thread of its own);
- app.redis_pipeline.PipelinedRedis (one connection, an asyncio.Protocol over hiredis's reader,
  every pending command of concurrent callers written once per loop iteration).

Two figures per client, in the same run:
1. in-process, under uvloop: client CPU per call (this process's CPU, every thread counted, so
   glide's Rust thread too; Redis's own CPU is not) and calls/s with N concurrent callers;
2. end to end: a FastAPI endpoint that does one admit EVALSHA and answers the cached bytes, under
   wrk on loopback (one uvicorn worker), as a ratio to the bare FastAPI floor measured just before
   it (interleaved, best of the rounds, so noise shows as a spread instead of a bias).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Any, cast

from fastapi import FastAPI
from starlette.responses import Response

from bench.servers import ANSWER

CLIENTS = ("redis-py", "coredis", "valkey-glide", "pipeline")
TENANT = "bench"
CACHE_KEY = "pgw:cache:" + "ab" * 32
RATE_LIMIT = "100000000/hour"

Call = Callable[[], Awaitable[Any]]


class _Captured(Exception):
    """Raised by the recording client once RedisGate.admit has built its script call."""


async def admit_keys_args() -> tuple[list[Any], list[Any]]:
    """The keys and arguments RedisGate.admit itself sends for a cache hit of a bench tenant.

    Taken from the gate (through a client that records the script call) rather than rebuilt
    here, so the floors keep running the gate's call as the script and its arguments change.
    """
    from app.limits.redis_gate import RedisGate
    from app.tenancy.models import Tenant

    seen: dict[str, list[Any]] = {}

    class Recorder:
        def register_script(self, source: str) -> Callable[..., Awaitable[Any]]:
            async def call(keys: list[Any], args: list[Any]) -> Any:
                seen["keys"], seen["args"] = list(keys), list(args)
                raise _Captured

            return call

    gate = RedisGate(cast(Any, Recorder()), default_rate_limit=RATE_LIMIT)
    try:
        await gate.admit(Tenant(id=TENANT, rate_limit=RATE_LIMIT), cache_key=CACHE_KEY)
    except _Captured:
        return seen["keys"], seen["args"]
    raise RuntimeError("RedisGate.admit made no script call")


@asynccontextmanager
async def open_client(name: str, url: str) -> AsyncIterator[Call]:
    """A zero-argument admit call through client `name`; the client is closed on exit."""
    from app.limits.redis_gate import ADMIT_SCRIPT

    keys, args = await admit_keys_args()
    if name == "redis-py":
        from app.redis import open_redis

        redis = open_redis(url, name="pgw-bench")
        script = redis.register_script(ADMIT_SCRIPT)
        try:
            yield lambda: script(keys=keys, args=args)
        finally:
            await redis.aclose()
    elif name == "coredis":
        import coredis

        client = coredis.Redis.from_url(url, connect_timeout=0.5, stream_timeout=1.0)
        async with client:
            cscript = client.register_script(ADMIT_SCRIPT)
            yield lambda: cscript(keys, args)
    elif name == "valkey-glide":
        from glide import (
            GlideClient,
            GlideClientConfiguration,
            NodeAddress,
            ProtocolVersion,
            Script,
        )

        host, port = url.removeprefix("redis://").split("/")[0].split(":")
        config = GlideClientConfiguration(
            [NodeAddress(host, int(port))],
            request_timeout=1000,
            protocol=ProtocolVersion.RESP2,
        )
        glide = await GlideClient.create(config)
        gscript = Script(ADMIT_SCRIPT)  # type: ignore[no-untyped-call]
        gargs = [str(a) for a in args]  # glide takes str/bytes only
        try:
            yield lambda: glide.invoke_script(gscript, keys, gargs)
        finally:
            await glide.close()
    elif name == "pipeline":
        from app.redis_pipeline import PipelinedRedis

        pipelined = PipelinedRedis(url, client_name="pgw-bench")
        pscript = pipelined.register_script(ADMIT_SCRIPT)
        try:
            yield lambda: pscript(keys=keys, args=args)
        finally:
            await pipelined.aclose()
    else:
        raise ValueError(f"unknown client {name!r}; one of {', '.join(CLIENTS)}")


def _answer(reply: Any) -> bytes:
    cached = reply[1]
    if not cached:
        raise RuntimeError(f"the admit script found no cache entry (reply {reply!r})")
    return bytes(cached)


async def _micro(name: str, url: str, concurrency: int, seconds: float) -> dict[str, float]:
    """`concurrency` callers, each awaiting one admit after another, for `seconds`."""
    async with open_client(name, url) as call:
        _answer(await call())  # connected, script loaded, and a hit
        for _ in range(50):  # warm up
            await call()
        done = 0
        deadline = time.perf_counter() + seconds

        async def caller() -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                await call()
                done += 1

        cpu, wall = time.process_time(), time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {"cpu_us_per_call": cpu / done * 1e6, "calls_per_s": done / wall, "calls": done}


def micro_floors(url: str, *, smoke: bool, rounds: int) -> dict[str, Any]:
    """Per client and concurrency: best (least CPU) of `rounds`, clients interleaved per round."""
    import uvloop

    seconds = 0.3 if smoke else 2.0
    levels = (1, 16) if smoke else (1, 16, 64)
    runs: dict[str, dict[int, list[dict[str, float]]]] = {
        c: {n: [] for n in levels} for c in CLIENTS
    }
    for _ in range(rounds):
        for n in levels:
            for name in CLIENTS:
                runs[name][n].append(uvloop.run(_micro(name, url, n, seconds)))
    return {
        name: {
            str(n): {
                **min(per_n[n], key=lambda r: r["cpu_us_per_call"]),
                "cpu_us_runs": [round(r["cpu_us_per_call"], 1) for r in per_n[n]],
            }
            for n in levels
        }
        for name, per_n in runs.items()
    }


# ---------------------------------------------------------------------------------------------
# End to end: uvicorn apps (run by bench/__main__.uvicorn_app) doing one admit per request.


def _client_app(name: str) -> FastAPI:
    url = os.environ["BENCH_REDIS_URL"]
    calls: list[Call] = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with open_client(name, url) as call:
            _answer(await call())
            calls.append(call)
            yield

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    @app.post("/api/v2/execute")
    async def execute() -> Response:
        return Response(_answer(await calls[0]()), media_type="application/json")

    @app.get("/ready")
    async def ready() -> Response:
        return Response(b"ok")

    return app


def redispy_app() -> FastAPI:
    return _client_app("redis-py")


def coredis_app() -> FastAPI:
    return _client_app("coredis")


def glide_app() -> FastAPI:
    return _client_app("valkey-glide")


def pipeline_app() -> FastAPI:
    return _client_app("pipeline")


FACTORIES = {
    "redis-py": "bench.redis_floors:redispy_app",
    "coredis": "bench.redis_floors:coredis_app",
    "valkey-glide": "bench.redis_floors:glide_app",
    "pipeline": "bench.redis_floors:pipeline_app",
}


def run(smoke: bool, *, wrk: Callable[..., Any], uvicorn_app: Callable[..., Any]) -> dict[str, Any]:
    """Both figures for every client, against a redis-server of their own."""
    import redis

    from tests.support import RedisServer

    # Short alternations, many of them: a neighbour's burst on the shared machine then spoils
    # one pair, and the median of the per-pair ratios shows through it.
    seconds = 1 if smoke else 3
    rounds = 1 if smoke else 5
    server = RedisServer()
    server.start()
    started: list[Any] = []
    try:
        redis.Redis.from_url(server.url).set(CACHE_KEY, ANSWER, ex=3_600)
        micro = micro_floors(server.url, smoke=smoke, rounds=1 if smoke else 3)
        results: dict[str, Any] = {"micro": micro}
        body = b'{"language":"python","version":"*","files":[{"content":"print(6 * 7)"}]}'
        floor = uvicorn_app("bench.servers:floor_app")
        floor.start(ready_path="/docs")
        started.append(floor)
        servers = {}
        for name, factory in FACTORIES.items():
            service = uvicorn_app(factory, {"BENCH_REDIS_URL": server.url})
            service.start(ready_path="/ready")
            started.append(service)
            servers[name] = service
        e2e: dict[str, Any] = {}
        for name, service in servers.items():
            pairs = []
            for _ in range(rounds):  # floor, then figure: best of the rounds, both kept
                f = wrk(f"{floor.url}/api/v2/execute", body, {}, seconds=seconds, connections=16)
                c = wrk(f"{service.url}/api/v2/execute", body, {}, seconds=seconds, connections=16)
                pairs.append((f, c))
            best_floor = max(f.rps for f, _ in pairs)
            best = max((c for _, c in pairs), key=lambda load: load.rps)
            ratios = [c.rps / f.rps for f, c in pairs]
            e2e[name] = {
                **asdict(best),
                "floor_rps": best_floor,
                "floor_p99_ms": min(f.p99_ms for f, _ in pairs),
                "ratio_to_floor": best.rps / best_floor,
                "median_ratio": statistics.median(ratios),
                "ratios_per_round": [round(r, 3) for r in ratios],
            }
        results["e2e"] = e2e
        return results
    finally:
        for service in reversed(started):
            service.stop()
        server.stop()


def report(results: dict[str, Any]) -> str:
    micro, e2e = results["micro"], results["e2e"]
    levels = list(next(iter(micro.values())))
    head = ["client"]
    head += [f"CPU µs/call @{n}" for n in levels] + [f"calls/s @{n}" for n in levels]
    head += ["e2e req/s", "p99 ms", "best/best floor", "median of pairs (pairs)"]
    rows = [head]
    for name in CLIENTS:
        row = [name]
        row += [f"{micro[name][n]['cpu_us_per_call']:.0f}" for n in levels]
        row += [f"{micro[name][n]['calls_per_s']:.0f}" for n in levels]
        e = e2e[name]
        rounds = ", ".join(f"{r:.2f}" for r in e["ratios_per_round"])
        row += [f"{e['rps']:.0f}", f"{e['p99_ms']:.1f}", f"{e['ratio_to_floor']:.2f}"]
        row += [f"{e['median_ratio']:.2f} ({rounds})"]
        rows.append(row)
    floor = max(e["floor_rps"] for e in e2e.values())
    floor_p99 = min(e["floor_p99_ms"] for e in e2e.values())
    rows.append(["bare floor", *[""] * (2 * len(levels)), f"{floor:.0f}", f"{floor_p99:.1f}"])
    rows[-1] += ["1.00", ""]
    width = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(cell.ljust(width[i]) for i, cell in enumerate(r)) for r in rows)
