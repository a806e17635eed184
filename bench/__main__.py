"""`make bench`: the gateway's hot path against its floor, measured in one run.

Every server runs under the same uvicorn settings (one worker, uvloop, httptools, no access log);
load comes from wrk, a second process on loopback. Each figure is printed with the floor taken in
the same run, as a ratio, because the machines are shared and an absolute time means little.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson

from tests.support import RedisServer, Service, cli, free_port, mint_key, start_engine

RESULTS = Path(__file__).with_name("results.json")
ADMIN_KEY = "pgw_bench_admin_" + secrets.token_hex(16)
PROGRAM = {"language": "python", "version": "*", "files": [{"content": "print(6 * 7)"}]}


@dataclass
class Load:
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if match is None:
        raise ValueError(f"wrk printed a latency this harness cannot read: {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def wrk(
    url: str, body: bytes, headers: dict[str, str], *, seconds: float, connections: int
) -> Load:
    """POST the same body for `seconds` from wrk (one thread: the other core serves)."""
    lua = "wrk.method = 'POST'\nwrk.body = " + json.dumps(body.decode()) + "\n"
    for name, value in {"Content-Type": "application/json", **headers}.items():
        lua += f"wrk.headers[{json.dumps(name)}] = {json.dumps(value)}\n"
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(lua)
    import subprocess

    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            "--latency",
            "-s",
            script.name,
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    os.unlink(script.name)
    done = re.search(r"(\d+) requests in ([\d.]+)(ms|s)", out)
    if done is None or re.search(r"^\s+99%\s+(\S+)\s*$", out, re.M) is None:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    elapsed = float(done.group(2)) / (1000 if done.group(3) == "ms" else 1)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    )
    return Load(
        requests=int(done.group(1)),
        seconds=elapsed,
        rps=float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        p50_ms=_ms(re.search(r"^\s+50%\s+(\S+)\s*$", out, re.M).group(1)),  # type: ignore[union-attr]
        p99_ms=_ms(re.search(r"^\s+99%\s+(\S+)\s*$", out, re.M).group(1)),  # type: ignore[union-attr]
        errors=(int(errors.group(1)) if errors else 0)
        + (sum(int(n) for n in socket_errors.groups()) if socket_errors else 0),
    )


def uvicorn_app(factory: str, env: dict[str, str] | None = None) -> Service:
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        factory,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    service = Service(argv, port, env=env or {})
    return service


def gateway(upstream: str, redis_url: str, log_level: str = "warning") -> Service:
    """The gateway as `serve` runs it; at `warning` (no access line), like the floors, unless
    the figure is the default level's (info)."""
    port = free_port()
    env = {
        "GATEWAY_PISTON_URLS": upstream,
        "GATEWAY_REDIS_URL": redis_url,
        "GATEWAY_ADMIN_KEY": ADMIN_KEY,
        "GATEWAY_LOG_LEVEL": log_level,
        "GATEWAY_MAX_CONCURRENCY": "256",
    }
    return Service(cli("serve", "--port", str(port), "--workers", "1"), port, env=env)


def mint(gw: Service, tenant: str, **fields: Any) -> str:
    """A tenant whose rate limit is far above any load here, and its key."""
    return mint_key(gw, ADMIN_KEY, tenant, **{"rate_limit": "100000000/hour", **fields})


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def gc_pauses(url: str) -> dict[str, dict[str, float]]:
    """Per generation: collections so far, their summed pause, and each bucket's count (le, s)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    seen: dict[str, dict[str, float]] = {}
    for match in re.finditer(
        r'^pgw_gc_pause_seconds_(bucket|count|sum)\{(?:generation="(\d)",?)?(?:le="([^"]+)",?)?'
        r'(?:generation="(\d)")?\} (\S+)$',
        text,
        re.M,
    ):
        kind, gen_a, le, gen_b, value = match.groups()
        figures = seen.setdefault(gen_a or gen_b, {})
        figures[f"le {le}" if kind == "bucket" else kind] = float(value)
    return seen


def gc_during(
    before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]
) -> dict[str, Any]:
    """Collections between two readings, per generation, and the longest pause's bucket."""
    out: dict[str, Any] = {}
    for gen, figures in after.items():
        start = before.get(gen, {})
        count = figures.get("count", 0) - start.get("count", 0)
        bounds = sorted(
            (float(name[3:]), value - start.get(name, 0))
            for name, value in figures.items()
            if name.startswith("le ") and name != "le +Inf"
        )
        # The smallest bound every collection of the phase fell under: the longest pause <= it.
        longest = next((bound for bound, n in bounds if n >= count), float("inf"))
        out[gen] = {
            "collections": count,
            "pause_ms_total": (figures.get("sum", 0) - start.get("sum", 0)) * 1000,
            "longest_pause_ms_at_most": longest * 1000 if count else 0.0,
        }
    return out


def _monitored(redis_url: str, send: Callable[[], Any]) -> tuple[list[dict[str, Any]], Any]:
    """Every command Redis saw while `send()` ran (MONITOR), and what `send` returned.

    `send` runs once the MONITOR subscription is live; its return value comes back as it is."""
    import threading

    import redis

    stop = "pgw-bench-monitor-stop"
    seen: list[dict[str, Any]] = []
    ready = threading.Event()

    def watch() -> None:
        with redis.Redis.from_url(redis_url).monitor() as monitor:  # type: ignore[no-untyped-call]
            ready.set()
            for command in monitor.listen():
                if stop in command["command"]:
                    return
                seen.append(command)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    ready.wait(5)
    time.sleep(0.2)  # the MONITOR subscription is live once its reply has been read
    returned = send()
    redis.Redis.from_url(redis_url).echo(stop)
    watcher.join(10)
    return seen, returned


def round_trips_per_request(redis_url: str, send: Callable[[], object], requests: int) -> float:
    """Commands that clients sent to Redis (not those a script ran inside it), per request.

    MONITOR shows each command a client sends, and marks those a Lua script issued as `lua`:
    they cost no round trip, so they are not counted.
    """
    seen, _ = _monitored(redis_url, send)
    return len([c for c in seen if c.get("client_type") != "lua"]) / requests


def round_trips_per_miss(redis_url: str, url: str, headers: dict[str, str], misses: int) -> float:
    """Commands a miss sent to Redis while its client waited for the answer, per miss.

    One miss after another, each with a stdin never sent before; a command counts for a miss
    when Redis saw it between the request's sending and its answer's arrival (MONITOR's clock
    and ours are the host's). Not counted: what a Lua script ran inside Redis, the pub/sub
    connections (their pings; a request sends nothing there), and whatever a gateway sends
    after the answer (none today, but that would be off the critical path).
    """
    import redis

    def send() -> tuple[list[tuple[float, float]], set[str]]:
        windows: list[tuple[float, float]] = []
        json_headers = {"Content-Type": "application/json", **headers}
        with httpx.Client(timeout=30, headers=json_headers) as c:
            c.post(url, content=orjson.dumps({**PROGRAM, "stdin": "warm up"})).raise_for_status()
            for _ in range(misses):
                body = orjson.dumps({**PROGRAM, "stdin": secrets.token_hex(8)})
                sent = time.time()
                response = c.post(url, content=body)
                windows.append((sent, time.time()))
                response.raise_for_status()
                if response.headers["x-cache"] != "MISS":
                    cache = response.headers["x-cache"]
                    raise RuntimeError(f"expected a miss, got X-Cache {cache}")
        clients = redis.Redis.from_url(redis_url).client_list()
        return windows, {c["addr"] for c in clients if int(c["sub"]) + int(c["psub"]) > 0}

    seen, (windows, subscribers) = _monitored(redis_url, send)
    counted = 0
    for command in seen:
        if command.get("client_type") == "lua":
            continue
        if f"{command['client_address']}:{command['client_port']}" in subscribers:
            continue
        at = float(command["time"])
        counted += any(start <= at <= end for start, end in windows)
    return counted / misses


async def _burst(
    url: str, body: bytes, headers: dict[str, str], count: int, concurrency: int
) -> float:
    """Send `count` requests, `concurrency` at a time; returns requests per second."""
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=120) as client:
        queue = iter(range(count))

        async def worker() -> None:
            for _ in queue:
                response = await client.post(
                    url, content=body, headers={"Content-Type": "application/json", **headers}
                )
                response.raise_for_status()

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return count / (time.perf_counter() - started)


async def _single_flight(url: str, headers: dict[str, str], count: int) -> None:
    body = orjson.dumps({**PROGRAM, "stdin": secrets.token_hex(8)})  # a miss nobody cached yet
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=count)) as client:
        answers = await asyncio.gather(
            *(
                client.post(
                    url, content=body, headers={"Content-Type": "application/json", **headers}
                )
                for _ in range(count)
            )
        )
    assert all(a.status_code == 200 for a in answers), {a.status_code for a in answers}


def run(smoke: bool) -> dict[str, Any]:
    seconds = 1 if smoke else 5
    connections = 16
    results: dict[str, Any] = {"smoke": smoke, "cores": os.cpu_count()}
    redis_server = RedisServer()
    redis_server.start()
    started: list[Service] = []

    def up(service: Service, ready: str = "/") -> Service:
        service.start(ready_path=ready)
        started.append(service)
        return service

    try:
        floor = up(uvicorn_app("bench.servers:floor_app"), "/docs")
        naive = up(
            uvicorn_app("bench.servers:naive_floor_app", {"BENCH_REDIS_URL": redis_server.url}),
            "/ready",
        )
        upstream = up(uvicorn_app("bench.servers:instant_upstream_app"), "/api/v2/runtimes")
        gw = up(gateway(upstream.url, redis_server.url), "/healthz")
        gw_info = up(gateway(upstream.url, redis_server.url, log_level="info"), "/healthz")
        key = mint(gw, "bench")
        info_auth = {"Authorization": f"Bearer {mint(gw_info, 'bench-info')}"}
        bypass_key = mint(gw, "bench-nocache", cache=False)
        auth = {"Authorization": f"Bearer {key}"}
        body = orjson.dumps(PROGRAM)

        # 1-2. Floor and the cache-hit path.
        for server, headers in ((gw, auth), (gw_info, info_auth)):
            httpx.post(
                f"{server.url}/api/v2/execute",
                content=body,
                headers={**headers, "Content-Type": "application/json"},
            ).raise_for_status()
        # Interleaved, best of two each: a burst of noise from a neighbour on the shared machine
        # then hurts a figure and its floor alike, instead of whichever ran at the time.
        phases = {
            "floor": (floor, {}),
            "naive_floor": (naive, {}),
            "cache_hit": (gw, auth),
            "cache_hit_info": (gw_info, info_auth),
        }
        runs: dict[str, list[Load]] = {name: [] for name in phases}
        gc_before = gc_pauses(gw.url)
        for _ in range(2):
            for name, (server, headers) in phases.items():
                runs[name].append(
                    wrk(
                        f"{server.url}/api/v2/execute",
                        body,
                        headers,
                        seconds=seconds,
                        connections=connections,
                    )
                )
        # Collections in the hit server over its two runs (and, idle, the others' in between).
        results["gc_during_hits"] = gc_during(gc_before, gc_pauses(gw.url))
        best = {name: max(loads, key=lambda load: load.rps) for name, loads in runs.items()}
        floor_load, naive_load = best["floor"], best["naive_floor"]
        results["floor"] = asdict(floor_load)
        results["naive_floor"] = {
            **asdict(naive_load),
            "ratio_to_floor": naive_load.rps / floor_load.rps,
        }
        for name in ("cache_hit", "cache_hit_info"):
            hit = best[name]
            results[name] = {
                **asdict(hit),
                "ratio_to_floor": hit.rps / floor_load.rps,
                "ratio_to_naive": hit.rps / naive_load.rps,
                "p99_to_floor_p99": hit.p99_ms / floor_load.p99_ms,
            }
        # 7. Redis round trips per cache hit: commands the gateway sent, counted by MONITOR.
        hits = 100 if smoke else 1_000
        results["redis_round_trips_per_hit"] = round_trips_per_request(
            redis_server.url,
            lambda: asyncio.run(_burst(f"{gw.url}/api/v2/execute", body, auth, hits, 8)),
            hits,
        )
        # The same for a miss, counted only while its client waited (the answer's critical path).
        results["redis_round_trips_per_miss"] = round_trips_per_miss(
            redis_server.url, f"{gw.url}/api/v2/execute", auth, 20 if smoke else 200
        )

        # 3. Pass-through: the instant upstream alone, then through the gateway (cache off).
        # Added latency is taken on one connection, where a figure is a request's own cost,
        # not the queue that a saturated single worker builds; throughput on `connections`.
        bypass = {"Authorization": f"Bearer {bypass_key}"}
        execute_direct = f"{upstream.url}/api/v2/execute"
        execute_gateway = f"{gw.url}/api/v2/execute"
        direct_1 = wrk(execute_direct, body, {}, seconds=seconds, connections=1)
        through_1 = wrk(execute_gateway, body, bypass, seconds=seconds, connections=1)
        direct = wrk(execute_direct, body, {}, seconds=seconds, connections=connections)
        through = wrk(execute_gateway, body, bypass, seconds=seconds, connections=connections)
        results["pass_through"] = {
            "direct_one_connection": asdict(direct_1),
            "gateway_one_connection": asdict(through_1),
            "direct": asdict(direct),
            "gateway": asdict(through),
            "added_p50_ms": through_1.p50_ms - direct_1.p50_ms,
            "added_p99_ms": through_1.p99_ms - direct_1.p99_ms,
            "throughput_ratio": through.rps / direct.rps,
        }

        # 6. Memory: RSS after 1,000 and after 100,000 requests (cache hits).
        assert gw.proc is not None
        total = 0
        target_small, target_large = (200, 2_000) if smoke else (1_000, 100_000)
        asyncio.run(_burst(f"{gw.url}/api/v2/execute", body, auth, target_small, 8))
        rss_small = rss_mb(gw.proc.pid)
        total = target_small
        while total < target_large:
            load = wrk(
                f"{gw.url}/api/v2/execute", body, auth, seconds=seconds, connections=connections
            )
            total += load.requests
        results["memory"] = {
            "rss_mb_after_small": rss_small,
            "small": target_small,
            "rss_mb_after_large": rss_mb(gw.proc.pid),
            "large": total,
            "growth_mb": rss_mb(gw.proc.pid) - rss_small,
        }

        # 4. Single-flight: 200 concurrent identical misses behind a slow upstream.
        slow = up(
            uvicorn_app("bench.servers:instant_upstream_app", {"BENCH_UPSTREAM_DELAY_MS": "300"}),
            "/api/v2/runtimes",
        )
        slow_gw = up(gateway(slow.url, redis_server.url), "/healthz")
        slow_key = mint(slow_gw, "bench-flight")
        asyncio.run(
            _single_flight(
                f"{slow_gw.url}/api/v2/execute",
                {"Authorization": f"Bearer {slow_key}"},
                20 if smoke else 200,
            )
        )
        results["single_flight"] = {
            "requests": 20 if smoke else 200,
            "upstream_executions": int(httpx.get(f"{slow.url}/count").text),
        }

        # 5. Real execution: a small Python program, direct to the engine and through the gateway.
        engine = start_engine()
        started.append(engine)
        real_gw = up(gateway(engine.url, redis_server.url), "/healthz")
        real_key = mint(real_gw, "bench-real", cache=False)
        count = 20 if smoke else 200
        real_auth = {"Authorization": f"Bearer {real_key}"}
        direct_runs, gateway_runs = [], []
        for _ in range(2):  # interleaved, best of two (see the cache-hit figures)
            direct_runs.append(
                asyncio.run(_burst(f"{engine.url}/api/v2/execute", body, {}, count, 8))
            )
            gateway_runs.append(
                asyncio.run(_burst(f"{real_gw.url}/api/v2/execute", body, real_auth, count, 8))
            )
        direct_rps, gw_rps = max(direct_runs), max(gateway_runs)
        results["real_execution"] = {
            "requests": count,
            "direct_rps": direct_rps,
            "gateway_rps": gw_rps,
            "ratio": gw_rps / direct_rps,
        }
    finally:
        for service in reversed(started):
            service.stop()
        redis_server.stop()
    return results


def report(results: dict[str, Any]) -> str:
    hit, floor, pt = results["cache_hit"], results["floor"], results["pass_through"]
    naive, hit_info = results["naive_floor"], results["cache_hit_info"]
    gc_hits = results["gc_during_hits"]
    full_gc = gc_hits.get("2", {})
    real, memory = results["real_execution"], results["memory"]
    rows = [
        (
            "floor: bare FastAPI, same bytes",
            f"{floor['rps']:.0f} req/s",
            f"p50 {floor['p50_ms']:.2f} ms, p99 {floor['p99_ms']:.2f} ms",
            "1.00",
        ),
        (
            "floor: FastAPI + 1 redis-py EVALSHA",
            f"{naive['rps']:.0f} req/s",
            f"p50 {naive['p50_ms']:.2f} ms, p99 {naive['p99_ms']:.2f} ms",
            f"{naive['ratio_to_floor']:.2f} of floor",
        ),
        (
            "cache hit (auth, limits, cache)",
            f"{hit['rps']:.0f} req/s",
            f"p50 {hit['p50_ms']:.2f} ms, p99 {hit['p99_ms']:.2f} ms",
            f"{hit['ratio_to_floor']:.2f} of floor (target >= 0.50), "
            f"{hit['ratio_to_naive']:.2f}x naive (>= 1.2), "
            f"p99 {hit['p99_to_floor_p99']:.1f}x floor's (<= 3)",
        ),
        (
            "cache hit, log level info (default)",
            f"{hit_info['rps']:.0f} req/s",
            f"p50 {hit_info['p50_ms']:.2f} ms, p99 {hit_info['p99_ms']:.2f} ms",
            f"{hit_info['ratio_to_floor']:.2f} of floor, one access line per request",
        ),
        (
            "GC during the hit runs",
            " ".join(
                f"gen{gen} {figures['collections']:.0f}" for gen, figures in sorted(gc_hits.items())
            )
            + " collections",
            f"longest full (gen2) <= {full_gc.get('longest_pause_ms_at_most', 0):g} ms",
            f"{sum(f['pause_ms_total'] for f in gc_hits.values()):.1f} ms paused in all",
        ),
        (
            "pass-through overhead",
            f"{pt['gateway']['rps']:.0f} vs {pt['direct']['rps']:.0f} req/s",
            f"+{pt['added_p50_ms']:.2f} ms p50, +{pt['added_p99_ms']:.2f} ms p99",
            f"{pt['throughput_ratio']:.2f} of direct (target +1 ms p50, +5 ms p99)",
        ),
        (
            "single-flight misses",
            f"{results['single_flight']['requests']} requests",
            f"{results['single_flight']['upstream_executions']} upstream execution(s)",
            "target 1",
        ),
        (
            "real execution (python)",
            f"{real['gateway_rps']:.1f} vs {real['direct_rps']:.1f} req/s",
            "",
            f"{real['ratio']:.2f} of direct (target >= 0.95)",
        ),
        (
            "memory (RSS)",
            f"{memory['rss_mb_after_small']:.1f} -> {memory['rss_mb_after_large']:.1f} MB",
            f"after {memory['small']} -> {memory['large']} requests",
            f"{memory['growth_mb']:+.1f} MB (target <= 10)",
        ),
        (
            "Redis round trips per cache hit",
            f"{results['redis_round_trips_per_hit']:.2f}",
            "",
            "target <= 1",
        ),
        (
            "Redis round trips per miss before the answer",
            f"{results['redis_round_trips_per_miss']:.2f}",
            "",
            "target <= 2",
        ),
    ]
    width = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(width[i]) for i, cell in enumerate(row)) for row in rows)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="a tiny load, to check the harness")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--redis-floors",
        action="store_true",
        help="only the Redis client micro-floors (bench/redis_floors.py), not the gateway figures",
    )
    args = parser.parse_args()
    from bench import redis_floors

    results = {"smoke": args.smoke} if args.redis_floors else run(args.smoke)
    results["redis_floors"] = redis_floors.run(args.smoke, wrk=wrk, uvicorn_app=uvicorn_app)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    if not args.redis_floors:
        print(report(results))  # noqa: T201
    print("\nRedis clients, the real admit script (a cache hit):")  # noqa: T201
    print(redis_floors.report(results["redis_floors"]))  # noqa: T201
    print(f"\nwritten to {args.out}")  # noqa: T201


if __name__ == "__main__":
    main()
