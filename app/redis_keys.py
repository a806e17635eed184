"""Every Redis key the gateway writes, in one place: one prefix per concern.

Secrets never appear in a key: API keys are found by the SHA-256 of the key string.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "BROWSER_KEYS",
    "CACHE",
    "CHANNEL_INVALIDATE",
    "CONCURRENCY",
    "FLIGHT",
    "KEY",
    "KEY_BY_ID",
    "QUOTA",
    "RATE_LIMIT",
    "TENANT",
    "TENANT_INDEX",
    "TENANT_KEYS",
    "USAGE",
]

ROOT: Final = "pgw:"
TENANT: Final = ROOT + "tenant:"  # pgw:tenant:<id> -> tenant JSON
TENANT_INDEX: Final = ROOT + "tenants"  # set of tenant ids
TENANT_KEYS: Final = ROOT + "tenant-keys:"  # pgw:tenant-keys:<tenant> -> set of key ids
KEY: Final = ROOT + "key:"  # pgw:key:<sha256 of the key> -> key JSON (never the key)
KEY_BY_ID: Final = ROOT + "keyid:"  # pgw:keyid:<key id> -> sha256 of the key
RATE_LIMIT: Final = ROOT + "rl:"  # pgw:rl:<tenant>/<limit>... -> window counters
QUOTA: Final = ROOT + "quota:"  # pgw:quota:<tenant>:<YYYY-MM-DD> -> executions that day
CONCURRENCY: Final = ROOT + "conc:"  # pgw:conc:<tenant> -> zset of leases scored by expiry
USAGE: Final = ROOT + "usage:"  # pgw:usage:<tenant>:<YYYY-MM-DD> -> hash of counters
CACHE: Final = ROOT + "cache:"  # pgw:cache:<sha256 of the effective request> -> answer bytes
FLIGHT: Final = ROOT + "flight:"  # pgw:flight:<cache digest> -> single-flight lock
CHANNEL_INVALIDATE: Final = ROOT + "invalidate"  # pub/sub: key and tenant changes
# Browser keys: pgw:browser-keys -> hash of <sha256 of the key> -> {"origins", "expires_at"}
BROWSER_KEYS: Final = ROOT + "browser-keys"
