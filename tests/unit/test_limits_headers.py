"""Pure pieces of app.limits: client_address, limit parsing, the rate-limit headers."""

from __future__ import annotations

import ipaddress

import pytest

from app.limits import client_address
from app.limits.gate import PolicyState, rate_limit_headers, windows_for

PROXIES = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8")]


@pytest.mark.parametrize(
    ("peer", "forwarded", "expected"),
    [
        # Untrusted peer: its header is ignored, whatever it says.
        ("203.0.113.5", "1.2.3.4", "203.0.113.5"),
        ("203.0.113.5", None, "203.0.113.5"),
        # Trusted peer: the right-most address that is not a trusted proxy.
        ("10.0.0.1", "198.51.100.7", "198.51.100.7"),
        ("10.0.0.1", "6.6.6.6, 198.51.100.7, 10.0.0.2", "198.51.100.7"),
        ("10.0.0.1", "198.51.100.7,10.1.1.1", "198.51.100.7"),
        # A forged left-most entry is never used.
        ("10.0.0.1", "127.0.0.1, 198.51.100.7", "198.51.100.7"),
        # Trusted peer without the header: the peer.
        ("10.0.0.1", None, "10.0.0.1"),
        ("10.0.0.1", "", "10.0.0.1"),
        # Every hop trusted: the farthest one.
        ("10.0.0.1", "10.0.0.3, 10.0.0.2", "10.0.0.3"),
        # Garbage where a proxy's entry should be: no further than the last verified hop.
        ("10.0.0.1", "198.51.100.7, not-an-ip", "10.0.0.1"),
        ("10.0.0.1", "garbage, 198.51.100.7", "198.51.100.7"),
        # Ports and brackets as some proxies write them; IPv6.
        ("10.0.0.1", "198.51.100.7:4711", "198.51.100.7"),
        ("10.0.0.1", "[2001:db8::1]:443", "2001:db8::1"),
        ("fd00::1", "2001:db8::1", "2001:db8::1"),
        # An IPv4 peer on a dual-stack socket.
        ("::ffff:10.0.0.1", "198.51.100.7", "198.51.100.7"),
        # No peer at all (a test client, a unix socket).
        (None, "198.51.100.7", "unknown"),
    ],
)
def test_client_address(peer: str | None, forwarded: str | None, expected: str) -> None:
    assert client_address(peer, forwarded, PROXIES) == expected


def test_client_address_without_trusted_proxies() -> None:
    assert client_address("10.0.0.1", "198.51.100.7", []) == "10.0.0.1"


def test_windows_names_and_keys() -> None:
    [single] = windows_for("60/minute", "fixed-window")
    assert (single.name, single.amount, single.seconds) == ("default", 60, 60)
    assert single.key("acme") == "fixed-window/acme/60/1/minute"
    assert single.describe() == "60 per 1 minute"
    several = windows_for("10/second;500/hour;100/5 minutes", "moving-window")
    assert [w.name for w in several] == ["1second", "1hour", "5minute"]
    assert [w.seconds for w in several] == [1, 3600, 300]
    assert several[0].key("acme") == "moving-window/acme/10/1/second"
    twice = windows_for("10/minute;20/minute", "fixed-window")
    assert [w.name for w in twice] == ["1minute", "1minute-2"]


def test_headers_report_the_policy_closest_to_exhaustion() -> None:
    now = 1_000.0
    states = [
        PolicyState("1second", 10, 1, remaining=9, reset=now + 1),
        PolicyState("1hour", 500, 3600, remaining=3, reset=now + 1800.2),
    ]
    assert rate_limit_headers(states, now) == {
        "X-RateLimit-Limit": "500",
        "X-RateLimit-Remaining": "3",
        "X-RateLimit-Reset": "2801",
        "RateLimit-Policy": '"1second";q=10;w=1, "1hour";q=500;w=3600',
        "RateLimit": '"1hour";r=3;t=1801',
    }


def test_headers_on_a_tie_report_the_later_reset() -> None:
    states = [
        PolicyState("1second", 1, 1, remaining=0, reset=11.0),
        PolicyState("1minute", 5, 60, remaining=0, reset=50.0),
    ]
    headers = rate_limit_headers(states, 10.0)
    assert headers["RateLimit"] == '"1minute";r=0;t=40'
    assert rate_limit_headers([], 10.0) == {}
