"""What both gates share: the Admission, the Gate protocol, limit parsing, headers and messages.

Policy names in `RateLimit-Policy` (draft-ietf-httpapi-ratelimit-headers-10):
- a tenant limit of one window is `"default"` (`"default";q=60;w=60`);
- several windows are named by their length, `"1second"`, `"1hour"`, `"5minute"`;
- a tenant's daily quota is listed too, as `"daily"` (`"daily";q=1000;w=86400`);
- a key's `client_rate_limit` (counted per client address) is `"client"` for one window, else
  `"client-1second"`, `"client-1hour"`..., listed after the tenant's.
`RateLimit`, `X-RateLimit-Limit`, `-Remaining` and `-Reset` describe the one policy closest to
exhaustion (fewest remaining; on a tie the one that resets last), so a client that reads only
those never overruns any of them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Final, Literal, Protocol

from limits import RateLimitItem, parse_many

from app.errors import TooManyRequests
from app.metrics import Metrics
from app.tenancy.models import Tenant

__all__ = [
    "DEFAULT_LEASE_TTL_MS",
    "USAGE_FIELDS",
    "USAGE_TTL_SECONDS",
    "Admission",
    "ClientLimit",
    "Counted",
    "Gate",
    "PolicyState",
    "Refusal",
    "Strategy",
    "Window",
    "counted_windows",
    "day_end",
    "lease_ids",
    "policy_header",
    "rate_limit_headers",
    "refusal",
    "refuse",
    "utc_day",
    "windows_for",
]

Strategy = Literal["fixed-window", "moving-window"]

# A lease outlives its request by this much unless the caller says otherwise; the caller should
# pass the request's own deadline, so a dead replica's slot comes back soon after.
DEFAULT_LEASE_TTL_MS: Final = 60_000
# The contract keeps usage 31 days; one more so the 31st day is whole whatever the hour.
USAGE_TTL_SECONDS: Final = 32 * 86_400
USAGE_FIELDS: Final = (
    "executions",
    "cache_hits",
    "rate_limited",
    "errors",
    "cpu_time_ms",
    "wall_time_ms",
)
MAX_USAGE_DAYS: Final = 31
_DAY_SECONDS: Final = 86_400


@dataclass(slots=True)
class Admission:
    """What admit() decided, and what finish() needs to close the request."""

    headers: dict[str, str]  # the rate-limit headers for the answer
    cached: bytes | None  # the cache entry, when a cache key was given and present
    lease: str | None  # the concurrency lease to release, if one was taken
    tenant_id: str
    day: str  # the UTC day the request was counted on (YYYY-MM-DD)
    # True when Redis was unreachable and the gate failed open: nothing was counted, so
    # finish() has nothing to add to and does not wait on Redis a second time.
    degraded: bool = False
    # What the request did, added up while it runs for finish() to count (app.pipeline.admit).
    error: bool = False
    cpu_time_ms: float = 0.0
    wall_time_ms: float = 0.0
    cache_hits: int = 0  # a batch's cases answered from the cache
    # A batch may hold several leases: `lease` and then `f"{lease}:{n}"` for n in 2..leases.
    leases: int = 1
    # The single-flight lock (app.cache.flight) the admit claimed on a miss, owned by `token`
    # (the admission's own: its lease id too). While set, finish() also releases it if still
    # ours and publishes `wake_up` (b"w", "look in the cache", unless the flight shares an
    # answer), after storing `store` (key, body, TTL in s): a miss's landing and its usage in
    # the one script call. Cleared once a flight leads with the lock (the flight releases it).
    flight_lock: str | None = None
    token: str = ""
    store: tuple[str, bytes, int] | None = None
    wake_up: bytes = b"w"
    finished: bool = False  # finish() was called: whoever comes first does it, once

    def lease_ids(self) -> list[str]:
        return lease_ids(self.lease, self.leases) if self.lease is not None else []


def lease_ids(lease: str, count: int) -> list[str]:
    """The names of `count` leases taken together: the first, then `lease:2`, `lease:3`, ..."""
    return [lease, *(f"{lease}:{n}" for n in range(2, count + 1))]


@dataclass(frozen=True, slots=True)
class ClientLimit:
    """A key's `client_rate_limit`, and who it counts (the key and the client's address)."""

    limit: str
    identity: str


class Gate(Protocol):
    """Per-tenant limits, quota, concurrency leases and usage; admit() also reads the cache."""

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
        """`cost` executions at once (a batch), all or none; one cache read.

        With `flight` (a single-flight lock), a miss admitted also claims that lock for
        `flight_lease_ms` in the same step (`Admission.flight_lock` says whether it did).

        A tenant with a `max_concurrency` gets one lease, or for `leases` > 1 (a batch that
        would run cases side by side) as many as are free up to that, at least one
        (`Admission.leases`): so every execution in flight holds one of the tenant's leases.

        With `client`, that client's windows are counted too, in the same step: admitted only
        when the tenant's and the client's windows all allow it.
        """
        ...

    async def finish(
        self,
        admission: Admission,
        *,
        error: bool,
        cpu_time_ms: float,
        wall_time_ms: float,
        cache_hits: int = 0,
    ) -> None: ...

    async def usage(self, tenant_id: str, days: int = 7) -> list[dict[str, object]]: ...

    async def forget(self, tenant: Tenant) -> None:
        """Drop a deleted tenant's usage and its rate-limit, quota and concurrency counters."""
        ...


@dataclass(frozen=True, slots=True)
class Window:
    """One rate-limit window of a tenant's limit string, as the gates count it."""

    item: RateLimitItem  # the limits library's item, namespaced by strategy (see windows_for)
    name: str  # the policy name in RateLimit-Policy
    # Who it counts beyond the tenant: () for the tenant's own windows, ("client", identity)
    # for a key's per-client windows.
    identity: tuple[str, ...] = ()

    @property
    def amount(self) -> int:
        return self.item.amount

    @property
    def seconds(self) -> int:
        return self.item.get_expiry()

    def key(self, tenant_id: str) -> str:
        # The limits library's own key shape, e.g. "fixed-window/acme/60/1/minute"; the strategy
        # as namespace keeps a string counter and a moving-window zset from ever sharing a key.
        # A client's: "fixed-window/acme/client/<key id>/<address>/10/1/minute".
        return self.item.key_for(tenant_id, *self.identity)

    def describe(self) -> str:
        if self.identity:
            return f"{self.item!r} for each client address using this key"
        return repr(self.item)  # "60 per 1 minute"


@lru_cache(maxsize=1024)
def windows_for(limit: str, strategy: Strategy, label: str = "default") -> tuple[Window, ...]:
    """Parse a limit string once (tenants share a handful of strings) into named windows.

    One window is named `label`; several are named by their length, each after `label-` unless
    the label is the tenant's "default".
    """
    items = parse_many(limit)
    if len(items) == 1:
        names = [label]
    else:
        names = []
        prefix = "" if label == "default" else f"{label}-"
        for item in items:
            base = f"{prefix}{item.multiples}{item.GRANULARITY.name}"
            name, n = base, 2
            while name in names:  # "10/minute;100/minute" is odd but legal
                name, n = f"{base}-{n}", n + 1
            names.append(name)
    return tuple(
        Window(type(item)(item.amount, item.multiples, namespace=strategy), name)
        for item, name in zip(items, names, strict=True)
    )


def counted_windows(
    tenant_limit: str, client: ClientLimit | None, strategy: Strategy
) -> tuple[Window, ...]:
    """The tenant's windows, then (with `client`) that client's, as one request counts them."""
    windows = windows_for(tenant_limit, strategy)
    if client is None:
        return windows
    ours = windows_for(client.limit, strategy, "client")
    return (*windows, *(replace(w, identity=("client", client.identity)) for w in ours))


@dataclass(frozen=True, slots=True)
class PolicyState:
    """One policy's state after (or, when refused, instead of) this request."""

    name: str
    quota: int
    window_seconds: int
    remaining: int
    reset: float  # epoch seconds


def policy_header(states: Sequence[PolicyState]) -> str:
    """`RateLimit-Policy`: every policy, as it stands whatever the counts (so it can be built
    once per tenant)."""
    return ", ".join(f'"{s.name}";q={s.quota};w={s.window_seconds}' for s in states)


def _closeness(state: PolicyState) -> tuple[int, float]:
    return state.remaining, -state.reset


def rate_limit_headers(
    states: Sequence[PolicyState], now: float, *, policy: str | None = None
) -> dict[str, str]:
    """The rate-limit headers of an answer; `policy`: `policy_header(states)`, if known."""
    if not states:
        return {}
    closest = states[0] if len(states) == 1 else min(states, key=_closeness)
    remaining = max(0, closest.remaining)
    # Never more than the window: the in-process storage rounds its expiry up a second.
    seconds_left = max(0, min(closest.window_seconds, math.ceil(closest.reset - now)))
    return {
        "X-RateLimit-Limit": str(closest.quota),
        "X-RateLimit-Remaining": str(remaining),
        "X-RateLimit-Reset": str(math.ceil(closest.reset)),
        "RateLimit-Policy": policy if policy is not None else policy_header(states),
        "RateLimit": f'"{closest.name}";r={remaining};t={seconds_left}',
    }


def utc_day(now: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(now))


@lru_cache(maxsize=8)
def day_end(day: str) -> datetime:
    """Midnight UTC after `day`: when its quota resets."""
    return datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=UTC) + timedelta(days=1)


def retry_after(seconds: float) -> str:
    # Retry-After is whole seconds; never 0, or a client would retry in a tight loop.
    return str(max(1, math.ceil(seconds)))


Refusal = Literal["rate_limit", "quota", "concurrency"]


def refusal(
    reason: Refusal,
    *,
    metrics: Metrics | None,
    headers: Mapping[str, str],
    retry_seconds: float,
    limit: str,
    cost: int = 1,
    left: int = 0,
) -> TooManyRequests:
    """The 429 for a refused request; `limit` is the text that names what was reached.

    A request of several executions (`cost`, a batch) is told how many it needs and how many
    the exhausted policy has `left`.
    """
    if metrics is not None:
        metrics.rejected.labels(reason=reason).inc()
    if reason == "rate_limit":
        message = f"rate limit exceeded: {limit}"
    elif reason == "quota":
        message = limit
    else:
        message = f"concurrency limit of {limit} executions in flight reached"
    if cost > 1 and reason != "concurrency":
        message = f"this request needs {cost} executions and {max(0, left)} are left: {message}"
    return TooManyRequests(message, headers={**headers, "Retry-After": retry_after(retry_seconds)})


@dataclass(frozen=True, slots=True)
class Counted:
    """What a gate found for one request, for the refusal both gates write the same way."""

    windows: Sequence[tuple[Window, PolicyState, bool]]  # each window, its state, exhausted
    headers: Mapping[str, str]
    now: float  # the clock the states' resets are on (Redis's, for the Redis gate)
    day: str
    quota: int
    quota_used: int
    cost: int
    max_concurrency: int | None


def refuse(reason: Refusal, counted: Counted, *, metrics: Metrics | None) -> TooManyRequests:
    """The 429 for `reason`, with its Retry-After and the policy it names."""
    if reason == "rate_limit":
        full = [(window, state) for window, state, exhausted in counted.windows if exhausted]
        # Room again only when every exhausted window has some: wait for the last of them.
        window, state = max(full, key=lambda pair: pair[1].reset)
        return refusal(
            reason,
            metrics=metrics,
            headers=counted.headers,
            retry_seconds=state.reset - counted.now,
            limit=window.describe(),
            cost=counted.cost,
            left=min(s.remaining for _, s in full),
        )
    if reason == "quota":
        return refusal(
            reason,
            metrics=metrics,
            headers=counted.headers,
            retry_seconds=day_end(counted.day).timestamp() - counted.now,
            limit=quota_message(counted.quota, counted.day),
            cost=counted.cost,
            left=counted.quota - counted.quota_used,
        )
    # When a slot frees is unknowable (a run ends when it ends): try again in a second.
    return refusal(
        reason,
        metrics=metrics,
        headers=counted.headers,
        retry_seconds=1,
        limit=str(counted.max_concurrency),
    )


def quota_message(quota: int, day: str) -> str:
    resets = day_end(day).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"daily quota of {quota} executions reached; it resets at {resets}"


def quota_state(quota: int, used: int, day: str) -> PolicyState:
    return PolicyState(
        name="daily",
        quota=quota,
        window_seconds=_DAY_SECONDS,
        remaining=max(0, quota - used),
        reset=day_end(day).timestamp(),
    )


def usage_days(now: float, days: int) -> list[str]:
    """The UTC days a usage report covers, today first."""
    if not 1 <= days <= MAX_USAGE_DAYS:
        raise ValueError(f"days must be between 1 and {MAX_USAGE_DAYS}")
    return [utc_day(now - n * _DAY_SECONDS) for n in range(days)]


def usage_row(day: str, counters: Mapping[str, float]) -> dict[str, object]:
    """The contract's shape for one day; whole numbers stay ints in the JSON."""
    row: dict[str, object] = {"date": day}
    for name in USAGE_FIELDS:
        value = float(counters.get(name, 0))
        row[name] = int(value) if value.is_integer() else round(value, 3)
    return row


@dataclass(slots=True)
class UsageCounters:
    """One tenant-day of usage, as the in-process gate keeps it."""

    values: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, amount: float = 1) -> None:
        self.values[name] = self.values.get(name, 0) + amount
