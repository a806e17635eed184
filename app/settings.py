"""The gateway's settings: environment variables prefixed GATEWAY_, or an optional .env file.

Everything is validated when the process starts, so a typo fails the boot, not the first request.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Literal

from pydantic import AnyHttpUrl, AnyUrl, Field, RedisDsn, SecretStr, UrlConstraints, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app.bootstrap import parse_runtimes
from app.protocol.schemas import LIMIT_FIELDS
from app.tenancy.models import check_rate_limit

__all__ = ["RedisSentinelSettings", "Settings", "sentinel_address"]

NonNegative = Annotated[int, Field(ge=0)]
Positive = Annotated[int, Field(gt=0)]
# `dns+http://NAME:PORT`: every address NAME resolves to is an upstream (app.upstream.discovery).
DnsHttpUrl = Annotated[AnyUrl, UrlConstraints(allowed_schemes=["dns+http"], host_required=True)]
_LOCAL_ENGINE: list[AnyHttpUrl | AnyUrl] = [AnyHttpUrl("http://127.0.0.1:2000")]


def _split_commas(value: object) -> object:
    """Accept `a,b,c` from the environment as well as a real list (tests, .env)."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def sentinel_address(entry: str) -> tuple[str, int]:
    """`host:port` (or `[v6]:port`) of one Redis Sentinel; ValueError otherwise."""
    host, sep, port = entry.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{entry!r} is not host:port (e.g. sentinel-0:26379)")
    return host, int(port)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="GATEWAY_", env_file=".env", extra="ignore", frozen=True
    )

    # Upstreams and stores.
    piston_urls: Annotated[list[AnyHttpUrl | DnsHttpUrl], NoDecode] = Field(
        default_factory=lambda: _LOCAL_ENGINE.copy(), min_length=1
    )
    redis_url: RedisDsn | None = None
    admin_key: SecretStr | None = None

    # Policy.
    allowed_languages: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["*"])
    max_body_bytes: Positive = 65_536  # below Piston's own 100 KB body limit
    max_files: Positive = 32
    # Global maximums for the per-request limits (ms, bytes; -1 = no cap beyond Piston's own).
    max_compile_timeout: int = Field(default=10_000, ge=-1)
    max_run_timeout: int = Field(default=3_000, ge=-1)
    max_compile_cpu_time: int = Field(default=10_000, ge=-1)
    max_run_cpu_time: int = Field(default=3_000, ge=-1)
    max_compile_memory_limit: int = Field(default=-1, ge=-1)
    max_run_memory_limit: int = Field(default=-1, ge=-1)

    # Rate limits, concurrency, quotas.
    default_rate_limit: str = "60/minute"
    rate_limit_strategy: Literal["fixed-window", "moving-window"] = "fixed-window"
    rate_limit_fail_open: bool = False
    auth_failure_rate_limit: str = "20/minute"
    trusted_proxies: Annotated[list[ipaddress.IPv4Network | ipaddress.IPv6Network], NoDecode] = (
        Field(default_factory=list)
    )
    max_concurrency: Positive = 64
    max_queue: NonNegative = 256
    queue_timeout_ms: NonNegative = 10_000

    # Result cache.
    cache_ttl_seconds: NonNegative = 3_600
    cache_scope: Literal["tenant", "global"] = "tenant"

    # Upstream behaviour.
    upstream_grace_ms: NonNegative = 2_000
    upstream_connect_timeout_ms: Positive = 2_000
    key_cache_seconds: Positive = 30

    # HTTP surface.
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Connections (uvicorn, app/server.py): idle keep-alive, the request head, the whole body.
    keepalive_seconds: float = Field(default=5, gt=0, allow_inf_nan=False)
    header_timeout_seconds: float = Field(default=10, gt=0, allow_inf_nan=False)
    body_timeout_seconds: float = Field(default=30, gt=0, allow_inf_nan=False)
    max_connections: Positive = 4096

    _split = field_validator(
        "piston_urls", "allowed_languages", "cors_origins", "trusted_proxies", mode="before"
    )(_split_commas)

    @field_validator("default_rate_limit", "auth_failure_rate_limit")
    @classmethod
    def _valid_rate_limit(cls, value: str) -> str:
        # The tenants' own rule (a limit that admits something and fits), checked at start.
        check_rate_limit(value)
        return value

    @field_validator("allowed_languages")
    @classmethod
    def _languages_lowercase(cls, value: list[str]) -> list[str]:
        return [item.lower() for item in value] or ["*"]

    @property
    def global_caps(self) -> dict[str, int]:
        """The global maximum of each per-request limit, by Piston field name."""
        return {name: getattr(self, f"max_{name}") for name in LIMIT_FIELDS}

    # Upstream pool: health checks and DNS discovery. A probe every `health_check_seconds`,
    # bounded at 2 s: at most 3 s keeps "unhealthy within 5 s" (interval + 2 s) true.
    health_check_seconds: float = Field(default=1.0, gt=0, le=3.0)
    discovery_seconds: float = Field(default=10.0, gt=0)

    # batch runs
    max_batch_cases: Positive = 50

    # Piston-compatible API (WS /api/v2/connect): the client's messages read but not yet sent
    # up (stdin the job has not taken) per socket; past it the socket is closed with 1009.
    ws_max_pending_stdin_bytes: Positive = 1_048_576

    # Production path (issue 14): `piston-gateway bootstrap` and Redis through Sentinel.
    # The runtimes `bootstrap` installs on every upstream when --runtimes is not given.
    bootstrap_runtimes: str = "python=3.10.0,scala=3.0.0"
    # Redis Sentinel, for operators who run their own highly available Redis: `host:port,...` of
    # the sentinels. When set, the gateway asks them for the current master of
    # `redis_sentinel_master`; GATEWAY_REDIS_URL still gives the database, the master's password
    # and TLS (rediss://), and its host and port are not used.
    redis_sentinels: Annotated[list[str], NoDecode] = Field(default_factory=list)
    redis_sentinel_master: str = "mymaster"
    redis_sentinel_password: SecretStr | None = None  # the sentinels' own `requirepass`, if any

    _split_sentinels = field_validator("redis_sentinels", mode="before")(_split_commas)

    @field_validator("bootstrap_runtimes")
    @classmethod
    def _valid_runtimes(cls, value: str) -> str:
        parse_runtimes(value)  # ValueError names the bad entry
        return value

    @field_validator("redis_sentinels")
    @classmethod
    def _valid_sentinels(cls, value: list[str]) -> list[str]:
        for entry in value:
            sentinel_address(entry)
        return value

    # Tenancy (keys, the gate and Redis outages): how long a key this process verified keeps
    # working while Redis is unreachable.
    key_cache_outage_seconds: NonNegative = 300


class RedisSentinelSettings(BaseSettings):
    """Only the Sentinel fields of Settings, from the same environment: open_redis reads them when
    its caller passes none, without validating (and failing on) every other setting again."""

    model_config = SettingsConfigDict(env_prefix="GATEWAY_", env_file=".env", extra="ignore")

    redis_sentinels: Annotated[list[str], NoDecode] = Field(default_factory=list)
    redis_sentinel_master: str = "mymaster"
    redis_sentinel_password: SecretStr | None = None

    _split_sentinels = field_validator("redis_sentinels", mode="before")(_split_commas)
