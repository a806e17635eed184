"""Origins of browser keys: the one spelling they are compared in, validation, and the live set."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.tenancy.authenticator import Authenticator
from app.tenancy.models import KeyCreate
from app.tenancy.origins import BrowserKey, OriginIndex, normalize_origin, request_origin
from app.tenancy.store import MemoryTenantStore, browser_key_message


@pytest.mark.parametrize(
    ("written", "normalized"),
    [
        ("https://app.example.com", "https://app.example.com"),
        ("HTTPS://App.Example.COM", "https://app.example.com"),
        ("https://app.example.com:443", "https://app.example.com"),
        ("http://app.example.com:80", "http://app.example.com"),
        ("http://app.example.com:443", "http://app.example.com:443"),
        ("https://app.example.com:80", "https://app.example.com:80"),
        ("http://localhost:5173", "http://localhost:5173"),
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("http://[::1]:3000", "http://[::1]:3000"),
        ("http://[::1]:80", "http://[::1]"),
        ("https://xn--bcher-kva.example", "https://xn--bcher-kva.example"),
    ],
)
def test_normalized(written: str, normalized: str) -> None:
    assert normalize_origin(written) == normalized


@pytest.mark.parametrize(
    "written",
    [
        "app.example.com",
        "https://app.example.com/",
        "https://app.example.com/path",
        "https://app.example.com?x=1",
        "https://user@app.example.com",
        "https://app.example.com:0",
        "https://app.example.com:65536",
        "https://app.example.com:",
        "ftp://app.example.com",
        "file:///etc/passwd",
        "null",
        "*",
        "https://*.example.com",
        "https://app..example.com",
        "https://app.example.com\x00",
        "",
    ],
)
def test_not_an_origin(written: str) -> None:
    with pytest.raises(ValueError, match="not an origin"):
        normalize_origin(written)


def test_request_origin_never_raises() -> None:
    assert request_origin(None) is None
    assert request_origin("null") is None
    assert request_origin("HTTP://Localhost:80") == "http://localhost"


class TestKeyCreate:
    def test_origins_normalized_and_deduplicated(self) -> None:
        body = KeyCreate.model_validate(
            {"allowed_origins": ["https://A.example", "https://a.example:443", "http://a.example"]}
        )
        assert body.allowed_origins == ["https://a.example", "http://a.example"]

    @pytest.mark.parametrize(
        "body",
        [
            {"allowed_origins": []},
            {"allowed_origins": ["https://a.example/"]},
            {"allowed_origins": "https://a.example"},
            {"allowed_origins": [1]},
            {"allowed_origins": [f"https://a{n}.example" for n in range(51)]},
            {"client_rate_limit": "fast"},
            {"client_rate_limit": "0/second"},
            {"client_rate_limit": "1/9999999999999999999 years"},
            {"client_rate_limit": 10},
        ],
    )
    def test_refused(self, body: dict[str, object]) -> None:
        with pytest.raises(ValidationError):
            KeyCreate.model_validate(body)

    def test_ordinary_key_has_neither(self) -> None:
        body = KeyCreate.model_validate({})
        assert body.allowed_origins is None
        assert body.client_rate_limit is None


class TestOriginIndex:
    def test_add_remove_and_shared_origins(self) -> None:
        index = OriginIndex()
        index.add("k1", BrowserKey(frozenset({"https://a.example", "https://b.example"}), None))
        index.add("k2", BrowserKey(frozenset({"https://a.example"}), None))
        assert index.allows("https://a.example")
        index.remove("k1")
        assert index.allows("https://a.example")  # k2 still lists it
        assert not index.allows("https://b.example")
        index.remove("k2")
        assert not index.allows("https://a.example")
        index.remove("k2")  # twice is fine
        assert len(index) == 0

    def test_expired_key_stops_counting_at_its_expiry(self) -> None:
        index = OriginIndex()
        index.add("k", BrowserKey(frozenset({"https://a.example"}), expires_at=1000.0))
        assert index.allows("https://a.example", now=999.9)
        assert not index.allows("https://a.example", now=1000.0)

    def test_replace(self) -> None:
        index = OriginIndex()
        index.add("old", BrowserKey(frozenset({"https://old.example"}), None))
        index.replace({"new": BrowserKey(frozenset({"https://new.example"}), None)})
        assert not index.allows("https://old.example")
        assert index.allows("https://new.example")


class TestMessages:
    def _authenticator(self) -> Authenticator:
        # A Redis-less store: the messages are fed by hand, as the listener would.
        authenticator = Authenticator(MemoryTenantStore(), admin_key=None, redis=None)
        authenticator.origins = OriginIndex()
        return authenticator

    def test_mint_adds_and_key_message_removes(self) -> None:
        authenticator = self._authenticator()
        entry = BrowserKey(frozenset({"https://a.example"}), None)
        authenticator.invalidate(browser_key_message("d" * 64, entry))
        assert authenticator.origins.allows("https://a.example")
        authenticator.invalidate("key:" + "d" * 64)
        assert not authenticator.origins.allows("https://a.example")

    @pytest.mark.parametrize("payload", ["", "{", '{"digest": "x"}', '{"origins": ["a"]}', "[]"])
    def test_unreadable_message_is_ignored(self, payload: str) -> None:
        authenticator = self._authenticator()
        authenticator.invalidate("browser-key:" + payload)
        assert len(authenticator.origins) == 0
