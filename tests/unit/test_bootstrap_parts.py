"""The pure parts of `bootstrap`: the --runtimes syntax and `dns+http://` expansion."""

from __future__ import annotations

import pytest

from app.bootstrap import Runtime, expand_upstreams, parse_runtimes


def test_runtimes_parse_in_order_without_duplicates() -> None:
    assert parse_runtimes(" python=3.10.0, Scala=3.0.0 ,python=3.10.0") == [
        Runtime("python", "3.10.0"),
        Runtime("scala", "3.0.0"),
    ]


@pytest.mark.parametrize("text", ["", "python", "python=", "=1", "a=1=2", " , "])
def test_bad_runtimes_name_the_expected_form(text: str) -> None:
    with pytest.raises(ValueError, match=r"python=3\.10\.0"):
        parse_runtimes(text)


def test_plain_urls_stay_and_dns_names_become_one_url_per_address() -> None:
    def resolve(host: str, port: int) -> list[str]:
        assert (host, port) == ("piston-headless.ns.svc.cluster.local", 2000)
        return ["10.0.0.7", "10.0.0.8", "fd00::9"]

    urls = ["http://piston-a:2000/", "dns+http://piston-headless.ns.svc.cluster.local:2000"]
    assert expand_upstreams(urls, resolve) == [
        "http://piston-a:2000",
        "http://10.0.0.7:2000",
        "http://10.0.0.8:2000",
        "http://[fd00::9]:2000",
    ]


def test_localhost_resolves_for_real() -> None:
    expanded = expand_upstreams(["dns+http://localhost:2000"])
    assert "http://127.0.0.1:2000" in expanded
