"""The Redis gate: every replica and worker shares one count, one Lua script per request.

The script runs atomically in Redis, so a burst over N replicas admits exactly the limit: there is
no read-then-write race between processes. It reads everything first and writes only when the
request is admitted, so a refused request consumes no window, no quota and no lease. Time comes
from Redis (`TIME`), not from the replicas, so clock skew between hosts cannot stretch a window or
expire a lease early. Needs Redis >= 5 (scripts replicated by effect, so TIME is allowed).

The client the app passes in decides how an outage feels: short socket timeouts, few retries
without backoff (redis-py's default is ten with backoff), and a pool that waits for a free
connection rather than failing a burst with MaxConnectionsError. Whatever it does, `deadline_s`
bounds one admit, so an outage is a prompt 503 (or, failing open, an unlimited answer). The
process's `RedisOutage` is told what each call found; while it holds, the gate does not wait on
Redis at all, and the outage is logged when it starts and ends, not per request.

The deliberate crossings from limits into the cache, each to spare a round trip: the admit
script reads the cache entry (a hit costs that one round trip) and, on a miss, claims the
single-flight lock with it; the finish script of an admission that claimed it also lands the
flight (stores the answer, releases the lock, publishes the wake-up), so a miss costs two round
trips before its answer. `app.cache.store` owns every other read and write of the cache,
`app.cache.flight` the wake-ups' meaning and every other use of the lock.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Final, Protocol

import structlog
from redis.asyncio import Redis

from app import redis as redis_keys
from app.clock import Clock
from app.limits.gate import (
    DEFAULT_LEASE_TTL_MS,
    USAGE_TTL_SECONDS,
    Admission,
    ClientLimit,
    Counted,
    PolicyState,
    Refusal,
    Strategy,
    Window,
    counted_windows,
    day_end,
    policy_header,
    quota_state,
    rate_limit_headers,
    refuse,
    usage_days,
    usage_row,
    utc_day,
)
from app.memo import IdentityMemo
from app.metrics import Metrics
from app.redis_outage import (
    OUTAGE_ERRORS,
    REDIS_DEADLINE_S,
    RedisOutage,
    RedisUnavailable,
)
from app.redis_pipeline import PipelinedRedis
from app.tenancy.models import Tenant

__all__ = ["ADMIT_SCRIPT", "RedisGate"]


class _ScriptCall(Protocol):
    """A registered script, redis-py's or the pipelined client's: the same call."""

    def __call__(self, keys: Sequence[Any] = ..., args: Sequence[Any] = ...) -> Awaitable[Any]: ...


log = structlog.get_logger(__name__)

# Outcomes the script returns first.
_ADMITTED: Final = 0
_RATE_LIMITED: Final = 1
_OVER_QUOTA: Final = 2
_OVER_CONCURRENCY: Final = 3
_REFUSALS: Final[dict[int, Refusal]] = {
    _RATE_LIMITED: "rate_limit",
    _OVER_QUOTA: "quota",
    _OVER_CONCURRENCY: "concurrency",
}

# KEYS[1] cache entry (read only when ARGV[1] == '1')   KEYS[2] quota counter of the day
# KEYS[3] the tenant's lease zset                        KEYS[4] usage hash of the day
# KEYS[5..] one key per rate-limit window, then the single-flight lock to claim on a miss ("")
# ARGV[1] read the cache (0/1)        ARGV[2] moving window (0/1)   ARGV[3] daily quota (0: none)
# ARGV[4] quota key TTL (s)           ARGV[5] concurrency cap (0: none)
# ARGV[6] token: this request's lease id, and its moving-window entry
# ARGV[7] lease TTL (ms)              ARGV[8] usage TTL (s)
# ARGV[9..] per window: amount, length (s)   then: cost, the executions asked for (a batch),
#           and the leases wanted (a batch running cases side by side; at least one is taken),
#           and the flight lock's lease (ms; 0: claim nothing),
#           and last, a test clock's now (ms), or "" (in production): Redis's TIME
# Returns {outcome, cached or false, now_ms, quota used, leases granted,
#          then per window: count, reset_ms, then 1 when the flight lock was claimed, else 0}
ADMIT_SCRIPT: Final = """
-- Redis's clock, shared by every replica; ms is enough for windows of a second or more.
-- (A test passes its clock's now as the last ARGV; production passes "", so TIME.)
local t = redis.call('TIME')
local now_ms = tonumber(ARGV[#ARGV]) or (tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
local moving = ARGV[2] == '1'
local quota = tonumber(ARGV[3])
local cap = tonumber(ARGV[5])
local token = ARGV[6]
local outcome = 0
local nwin = #KEYS - 5
local cost = tonumber(ARGV[9 + 2 * nwin])
local want = tonumber(ARGV[10 + 2 * nwin])
local granted = 0
local claimed = 0

-- 1. The cache read: a hit still counts against the limits, but takes no lease.
local cached = false
if ARGV[1] == '1' then
    cached = redis.call('GET', KEYS[1])
end

-- 2. Every window's state, without writing anything a refusal would have to undo.
local counts, resets = {}, {}
for i = 1, nwin do
    local key = KEYS[4 + i]
    local amount = tonumber(ARGV[7 + 2 * i])
    local window_ms = tonumber(ARGV[8 + 2 * i]) * 1000
    if moving then
        -- The moving window (like limits' acquire_moving_window): the entries of the last
        -- window_ms; older ones are dropped first, so the count is exact at this instant.
        redis.call('ZREMRANGEBYSCORE', key, '-inf', '(' .. (now_ms - window_ms))
        counts[i] = redis.call('ZCARD', key)
        local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
        resets[i] = oldest[2] and (tonumber(oldest[2]) + window_ms) or (now_ms + window_ms)
    else
        -- The fixed window (like limits' incr_expire): a counter that expires with its window.
        counts[i] = tonumber(redis.call('GET', key) or '0')
        local ttl = redis.call('PTTL', key)
        resets[i] = ttl > 0 and (now_ms + ttl) or (now_ms + window_ms)
    end
    if counts[i] + cost > amount then
        outcome = 1
    end
end

-- 3. The daily quota (its key names the UTC day, so it starts afresh at midnight).
local quota_used = 0
if quota > 0 then
    quota_used = tonumber(redis.call('GET', KEYS[2]) or '0')
    if outcome == 0 and quota_used + cost > quota then
        outcome = 2
    end
end

-- 4. The concurrency cap: leases scored by their expiry, the expired ones (a replica that died
--    mid-request) pruned first so they cannot hold a slot forever. A cache hit needs no slot.
local leases = 0
local want_lease = cap > 0 and not cached
if want_lease then
    redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now_ms)
    leases = redis.call('ZCARD', KEYS[3])
    if outcome == 0 and leases + 1 > cap then
        outcome = 3
    end
end

-- The reply, flat: {outcome, cached or false, now, quota used, leases, counts..., resets...,
-- claimed} (built by index: Lua keeps only the first value of an unpack() that is not last).
local function reply(result, entry)
    local out = {result, entry, now_ms, quota_used, granted}
    for i = 1, nwin do out[5 + i] = counts[i] end
    for i = 1, nwin do out[5 + nwin + i] = resets[i] end
    out[6 + 2 * nwin] = claimed
    return out
end

-- 5. Refused: count it in usage, touch nothing else.
local usage_ttl = tonumber(ARGV[8])
if outcome ~= 0 then
    redis.call('HINCRBY', KEYS[4], 'rate_limited', 1)
    redis.call('EXPIRE', KEYS[4], usage_ttl)
    return reply(outcome, false)
end

-- 6. Admitted: take `cost` from every window and the quota, and (on a miss) one lease.
for i = 1, nwin do
    local key = KEYS[4 + i]
    local seconds = tonumber(ARGV[8 + 2 * i])
    if moving then
        for j = 1, cost do
            redis.call('ZADD', key, now_ms, j == 1 and token or (token .. ':' .. j))
        end
        redis.call('EXPIRE', key, seconds)
        if counts[i] == 0 then
            resets[i] = now_ms + seconds * 1000
        end
    else
        -- INCRBY, and EXPIRE on the first hit only, so the window does not slide.
        if redis.call('INCRBY', key, cost) == cost then
            redis.call('EXPIRE', key, seconds)
            resets[i] = now_ms + seconds * 1000
        end
    end
    counts[i] = counts[i] + cost
end
if quota > 0 then
    quota_used = redis.call('INCRBY', KEYS[2], cost)
    if quota_used == cost then
        redis.call('EXPIRE', KEYS[2], tonumber(ARGV[4]))
    end
end
if want_lease then
    local lease_ttl = tonumber(ARGV[7])
    -- One lease, or as many of those wanted as are free (at least the one checked above).
    granted = math.min(want, cap - leases)
    for j = 1, granted do
        redis.call('ZADD', KEYS[3], now_ms + lease_ttl, j == 1 and token or (token .. ':' .. j))
    end
    leases = leases + granted
    -- The zset lives as long as its longest lease, never shorter.
    if redis.call('PTTL', KEYS[3]) < lease_ttl then
        redis.call('PEXPIRE', KEYS[3], lease_ttl)
    end
end

-- 7. Usage of the day, in the same step (a hit is an execution and a cache hit).
redis.call('HINCRBY', KEYS[4], 'executions', cost)
if cached then
    redis.call('HINCRBY', KEYS[4], 'cache_hits', 1)
end
redis.call('EXPIRE', KEYS[4], usage_ttl)

-- 8. A miss whose answer will be stored claims its single-flight lock (app.cache.flight) with
--    this token: atomic with the read above, so no leader can store and release in between,
--    and the claimant needs no second look at the cache. A hit or a refusal claims nothing.
local flight_ms = tonumber(ARGV[11 + 2 * nwin])
if not cached and flight_ms > 0
    and redis.call('SET', KEYS[5 + nwin], token, 'NX', 'PX', flight_ms) then
    claimed = 1
end
return reply(outcome, cached)
"""

# After the run: release the lease, add the run to usage; for an admission that claimed a
# single-flight lock, also its landing (the miss's second and last round trip before the
# answer): store the answer, release the lock if still ours, and publish the wake-up, as
# app.cache.flight's own release script does for the flights that took their lock themselves.
# KEYS: concurrency zset, usage hash, [cache entry or "", flight lock]
# ARGV: lease id or "", error 0/1, cpu_time_ms, wall_time_ms, cache hits (a batch's cases
#       answered from the cache), leases held (the lease id, then id:2, id:3, ...),
#       [lock token, wake-up, cache TTL (s; 0: store nothing), answer body]
FINISH_SCRIPT = """
if tonumber(ARGV[5]) ~= 0 then redis.call('HINCRBY', KEYS[2], 'cache_hits', ARGV[5]) end
if ARGV[1] ~= '' then
    redis.call('ZREM', KEYS[1], ARGV[1])
    for j = 2, tonumber(ARGV[6]) do redis.call('ZREM', KEYS[1], ARGV[1] .. ':' .. j) end
end
if ARGV[2] == '1' then redis.call('HINCRBY', KEYS[2], 'errors', 1) end
if tonumber(ARGV[3]) ~= 0 then redis.call('HINCRBYFLOAT', KEYS[2], 'cpu_time_ms', ARGV[3]) end
if tonumber(ARGV[4]) ~= 0 then redis.call('HINCRBYFLOAT', KEYS[2], 'wall_time_ms', ARGV[4]) end
if KEYS[4] then
    if tonumber(ARGV[9]) > 0 then redis.call('SET', KEYS[3], ARGV[10], 'EX', ARGV[9]) end
    if redis.call('GET', KEYS[4]) == ARGV[7] then redis.call('DEL', KEYS[4]) end
    redis.call('PUBLISH', KEYS[4], ARGV[8])
end
return 1
"""

# How long the quota counter outlives its day: just garbage collection, the key names the day.
_QUOTA_GRACE_SECONDS: Final = 3_600


def _bounded(script: _ScriptCall, deadline_s: float) -> _ScriptCall:
    async def call(keys: Sequence[Any] = (), args: Sequence[Any] = ()) -> Any:
        async with asyncio.timeout(deadline_s):
            return await script(keys=keys, args=args)

    return call


@dataclass(frozen=True, slots=True)
class _FixedPart:
    """The parts of a tenant's admit call that are the same for each of its requests that day."""

    windows: tuple[Window, ...]
    specs: tuple[tuple[str, int, int], ...]  # per window: policy name, amount, length (s)
    keys: tuple[str, ...]  # KEYS[2..]: quota, leases, usage, then one per window
    window_args: tuple[int, ...]  # per window: amount, length (s)
    moving: int
    quota: int
    max_concurrency: int
    policy: str  # RateLimit-Policy


class RedisGate:
    """The gate for a deployment with Redis (any number of replicas and workers)."""

    def __init__(
        self,
        redis: Redis,
        *,
        default_rate_limit: str,
        strategy: Strategy = "fixed-window",
        fail_open: bool = False,
        metrics: Metrics | None = None,
        outage: RedisOutage | None = None,
        deadline_s: float = REDIS_DEADLINE_S,
        scripts: PipelinedRedis | None = None,
        clock: Clock | None = None,
    ) -> None:
        self._redis = redis
        # Tests only: windows and leases on a clock they move instead of Redis's TIME.
        self._clock = clock
        self._default_rate_limit = default_rate_limit
        self._strategy: Strategy = strategy
        self._fail_open = fail_open
        self._metrics = metrics
        # A ceiling on one admit whatever the client's retry policy: an outage is answered
        # within this, never hung on.
        self._deadline_s = deadline_s
        # register_script: EVALSHA, and on NOSCRIPT (a restarted or flushed Redis) it loads the
        # script and runs it again, so recovery needs no restart of ours. The two calls of every
        # request go through `scripts` when given: the hot path's pipelined client, a fifth of
        # redis-py's cost per call (bench/redis_floors.py); redis-py serves the rest.
        # Each call is bounded by the deadline: the pipelined client keeps a bound per call
        # itself (no timer, no coroutine); redis-py's call is wrapped in a timeout.
        self._admit: _ScriptCall
        self._finish: _ScriptCall
        if scripts is not None:
            self._admit = partial(scripts.register_script(ADMIT_SCRIPT), timeout=deadline_s)
            self._finish = partial(scripts.register_script(FINISH_SCRIPT), timeout=deadline_s)
        else:
            self._admit = _bounded(redis.register_script(ADMIT_SCRIPT), deadline_s)
            self._finish = _bounded(redis.register_script(FINISH_SCRIPT), deadline_s)
        # What every admit of a tenant sends but for the request's own parts, once per tenant
        # object and day (app.memo): its keys, windows and policy header.
        self._fixed: IdentityMemo[_FixedPart] = IdentityMemo(self._fixed_part)
        self._day, self._day_start, self._day_end = "", 0.0, 0.0
        # Lease and lock tokens: unique across replicas (a random prefix per gate) and within
        # the process (a counter), without a uuid4 per request.
        self._token_prefix = secrets.token_hex(8) + "-"
        self._tokens = itertools.count(1)
        # On its own (tests), an outage state of its own; the app passes the process's one.
        self._outage = outage if outage is not None else RedisOutage(redis)

    async def admit(
        self,
        tenant: Tenant,
        *,
        cache_key: str | None,
        lease_ttl_ms: int = DEFAULT_LEASE_TTL_MS,
        cost: int = 1,
        client: ClientLimit | None = None,
        leases: int = 1,
        flight: str | None = None,
        flight_lease_ms: int = 0,
    ) -> Admission:
        """Count the request against every limit of `tenant` in one round trip, or raise 429.

        A `client`'s windows are just more windows of the same script call: every window must
        allow the request, and an admitted one takes from all of them. With `flight`, a miss
        admitted claims that single-flight lock in the same call (`Admission.flight_lock`).
        """
        now = time.time() if self._clock is None else self._clock.wall()
        day, day_end_s = self._today(now)
        fixed = self._fixed(tenant, day)
        windows = fixed.windows
        keys = [cache_key or "", *fixed.keys, flight or ""]
        token = f"{self._token_prefix}{next(self._tokens)}"
        args: list[int | str] = [
            1 if cache_key else 0,
            fixed.moving,
            fixed.quota,
            int(day_end_s - now) + _QUOTA_GRACE_SECONDS,
            fixed.max_concurrency,
            token,
            max(1, lease_ttl_ms),
            USAGE_TTL_SECONDS,
            *fixed.window_args,
        ]
        policy: str | None = fixed.policy
        if client is not None:  # a browser key's per-visitor windows: more of the same
            windows = counted_windows(
                tenant.rate_limit or self._default_rate_limit, client, self._strategy
            )
            ours = windows[len(fixed.windows) :]
            keys[-1:-1] = [redis_keys.rate_limit_window(w.key(tenant.id)) for w in ours]
            for w in ours:
                args += (w.amount, w.seconds)
            policy = None
        args += (max(1, cost), max(1, leases), max(1, flight_lease_ms) if flight else 0)
        # Last, a test clock's now (ms), or "": the script reads Redis's TIME.
        args.append("" if self._clock is None else int(now * 1000))
        if self._outage.active:
            return self._unavailable(tenant.id, day)
        try:
            reply = await self._admit(keys=keys, args=args)
        except OUTAGE_ERRORS as exc:
            self._outage.failed(exc, by="rate_limits")
            return self._unavailable(tenant.id, day)
        self._outage.succeeded()

        outcome, cached, now_ms, quota_used, granted = reply[:5]
        n = len(windows)
        counts: Sequence[int] = reply[5 : 5 + n]
        resets: Sequence[int] = reply[5 + n : 5 + 2 * n]
        redis_now = now_ms / 1000
        specs = fixed.specs if client is None else [(w.name, w.amount, w.seconds) for w in windows]
        states = [
            PolicyState(name, amount, seconds, amount - count, reset_ms / 1000)
            for (name, amount, seconds), count, reset_ms in zip(specs, counts, resets, strict=True)
        ]
        quota = fixed.quota
        if quota:
            states.append(quota_state(quota, quota_used, day))
        headers = rate_limit_headers(states, redis_now, policy=policy)

        if outcome != _ADMITTED:
            counted = Counted(
                windows=[
                    (w, state, state.remaining < cost)
                    for w, state in zip(windows, states[: len(windows)], strict=True)
                ],
                headers=headers,
                now=redis_now,
                day=day,
                quota=quota,
                quota_used=quota_used,
                cost=cost,
                max_concurrency=tenant.max_concurrency,
            )
            raise refuse(_REFUSALS[outcome], counted, metrics=self._metrics)
        took_lease = bool(tenant.max_concurrency) and cached is None
        return Admission(
            headers=headers,
            cached=cached.encode() if isinstance(cached, str) else cached,
            lease=token if took_lease else None,
            tenant_id=tenant.id,
            day=day,
            leases=max(1, int(granted)),
            flight_lock=flight if reply[5 + 2 * n] else None,
            token=token,
        )

    def _today(self, now: float) -> tuple[str, float]:
        """The UTC day of `now` and when it ends (epoch s), worked out once a day."""
        if not self._day_start <= now < self._day_end:
            day = utc_day(now)
            self._day_end = day_end(day).timestamp()
            self._day_start = self._day_end - 86_400
            self._day = day
        return self._day, self._day_end

    def _fixed_part(self, tenant: Tenant, day: str) -> _FixedPart:
        windows = counted_windows(
            tenant.rate_limit or self._default_rate_limit, None, self._strategy
        )
        quota = tenant.daily_quota or 0
        states = [PolicyState(w.name, w.amount, w.seconds, 0, 0.0) for w in windows]
        if quota:
            states.append(quota_state(quota, 0, day))
        return _FixedPart(
            windows=windows,
            specs=tuple((w.name, w.amount, w.seconds) for w in windows),
            keys=(
                redis_keys.quota_counter(tenant.id, day),
                redis_keys.concurrency_leases(tenant.id),
                redis_keys.usage_hash(tenant.id, day),
                *(redis_keys.rate_limit_window(w.key(tenant.id)) for w in windows),
            ),
            window_args=tuple(arg for w in windows for arg in (w.amount, w.seconds)),
            moving=1 if self._strategy == "moving-window" else 0,
            quota=quota,
            max_concurrency=tenant.max_concurrency or 0,
            policy=policy_header(states),
        )

    def _unavailable(self, tenant_id: str, day: str) -> Admission:
        """Redis is unreachable: 503 (fail closed, the default) or unlimited (fail open)."""
        if not self._fail_open:
            raise RedisUnavailable("rate limiting")
        return Admission(
            headers={}, cached=None, lease=None, tenant_id=tenant_id, day=day, degraded=True
        )

    async def finish(
        self,
        admission: Admission,
        *,
        error: bool,
        cpu_time_ms: float,
        wall_time_ms: float,
        cache_hits: int = 0,
    ) -> None:
        """Release the lease and add the run's figures to usage: one script call.

        An admission still holding the flight lock it claimed lands that flight in the same
        call: `admission.store` written, the lock released if still ours, `wake_up` published.
        """
        if admission.degraded:
            return  # nothing was counted, and Redis was just found unreachable
        flight = admission.flight_lock
        if (
            flight is None
            and admission.lease is None
            and not (error or cpu_time_ms or wall_time_ms or cache_hits)
        ):
            return  # nothing to count (a hit): spare the round trip, and the work before it
        if self._outage.active:
            return  # the lease and the lock expire by themselves; the outage is logged already
        keys = [
            redis_keys.concurrency_leases(admission.tenant_id),
            redis_keys.usage_hash(admission.tenant_id, admission.day),
        ]
        args: list[int | float | str | bytes] = [
            admission.lease or "",
            1 if error else 0,
            cpu_time_ms,
            wall_time_ms,
            cache_hits,
            admission.leases,
        ]
        if flight is not None:
            store = admission.store
            keys += (store[0] if store else "", flight)
            args += (
                admission.token,
                admission.wake_up,
                store[2] if store else 0,
                store[1] if store else b"",
            )
        try:
            # One script call: a redis-py pipeline of the same commands cost three times the
            # client CPU (bench/, cProfile).
            await self._finish(keys=keys, args=args)
        except OUTAGE_ERRORS as exc:
            # The answer is already decided; an uncounted run, an unreleased lease or lock, an
            # answer not stored (they expire, or are run again) must not turn it into an error.
            self._outage.failed(exc, by="usage")

    async def forget(self, tenant: Tenant) -> None:
        """Delete a deleted tenant's usage and counters, so its id starts from zero if reused.

        Found by SCAN rather than computed: the windows of every limit the tenant ever had
        (a PATCH changes the key names) go too. An admin operation, rare, so the scan is fine.
        """
        patterns = [
            redis_keys.usage_hash(tenant.id, "*"),
            redis_keys.quota_counter(tenant.id, "*"),
            # <strategy>/<tenant>/<amount>/<n>/<unit>
            redis_keys.rate_limit_window(f"*/{tenant.id}/*"),
        ]
        if self._outage.active:
            raise RedisUnavailable("deleting the tenant's usage")
        try:
            names: list[bytes | str] = [redis_keys.concurrency_leases(tenant.id)]
            for pattern in patterns:
                names += [name async for name in self._redis.scan_iter(match=pattern, count=1000)]
            await self._redis.unlink(*names)
        except OUTAGE_ERRORS as exc:
            self._outage.failed(exc, by="usage")
            raise RedisUnavailable("deleting the tenant's usage") from None

    async def usage(self, tenant_id: str, days: int = 7) -> list[dict[str, object]]:
        """The contract's per-day usage, today first, zeros for days with nothing counted."""
        dates = usage_days(time.time(), days)
        pipe = self._redis.pipeline(transaction=False)
        for day in dates:
            pipe.hgetall(redis_keys.usage_hash(tenant_id, day))
        if self._outage.active:
            raise RedisUnavailable("usage")
        try:
            async with asyncio.timeout(self._deadline_s):
                hashes: list[dict[bytes | str, bytes | str]] = await pipe.execute()
        except OUTAGE_ERRORS as exc:
            self._outage.failed(exc, by="usage")
            raise RedisUnavailable("usage") from None
        return [
            usage_row(
                day,
                {
                    (k.decode() if isinstance(k, bytes) else k): float(v)
                    for k, v in counters.items()
                },
            )
            for day, counters in zip(dates, hashes, strict=True)
        ]
