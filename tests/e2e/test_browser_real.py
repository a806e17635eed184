"""A real browser, for the one thing only a browser shows: headless Chromium (Debian's `chromium`,
driven by Playwright, no browser download) loads a page from an allowed origin on loopback, which
calls the gateway (another origin) with fetch() and a browser key and reads the output and the
exposed X-Cache; the same page from an origin the key does not allow is blocked by CORS."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.e2e.conftest import E2E_ADMIN_KEY
from tests.support import LOG_SCAN, RedisServer, Service, start_gateway

CHROMIUM = "/usr/bin/chromium"
ADMIN = {"Authorization": f"Bearer {E2E_ADMIN_KEY}"}
PAGE = """<!doctype html>
<html><body><pre id="out"></pre>
<script>
async function run(gateway, key) {
  try {
    const response = await fetch(gateway + "/api/v2/execute", {
      method: "POST",
      headers: {"Authorization": "Bearer " + key, "Content-Type": "application/json"},
      body: JSON.stringify({language: "python", version: "*",
                            files: [{content: "print(6 * 7)"}]}),
    });
    const body = await response.json();
    return {status: response.status, stdout: body.run && body.run.stdout,
            xcache: response.headers.get("X-Cache")};
  } catch (error) {
    return {error: String(error)};
  }
}
</script></body></html>
"""


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """The same page served from two origins on loopback: (allowed, not allowed)."""
    root: Path = tmp_path_factory.mktemp("page")
    (root / "index.html").write_text(PAGE)
    servers = [
        ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(root)))
        for _ in range(2)
    ]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield tuple(f"http://127.0.0.1:{s.server_address[1]}" for s in servers)  # type: ignore[misc]
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def gateway(redis_server: RedisServer, engine: Service) -> Iterator[Service]:
    redis.Redis.from_url(redis_server.url).flushall()
    service = start_gateway(
        redis_url=redis_server.url, piston_url=engine.url, admin_key=E2E_ADMIN_KEY
    )
    yield service
    service.stop()


def _browser_key(gateway: Service, origin: str) -> str:
    created = httpx.post(f"{gateway.url}/admin/tenants", json={"id": "page"}, headers=ADMIN)
    assert created.status_code == 201, created.text
    minted = httpx.post(
        f"{gateway.url}/admin/tenants/page/keys",
        json={"allowed_origins": [origin]},
        headers=ADMIN,
    )
    assert minted.status_code == 201, minted.text
    key = str(minted.json()["key"])
    LOG_SCAN.secret(key)
    return key


def test_a_page_calls_the_gateway_with_a_browser_key(
    gateway: Service, pages: tuple[str, str]
) -> None:
    from playwright.sync_api import sync_playwright

    # Not a skip: scripts/setup-system.sh installs it for `make test`.
    assert shutil.which(CHROMIUM), "Debian's chromium is missing: run scripts/setup-system.sh"
    allowed, other = pages
    key = _browser_key(gateway, allowed)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--no-proxy-server",
            ],
        )
        try:
            page = browser.new_page()
            page.goto(f"{allowed}/index.html")
            first = page.evaluate("([g, k]) => run(g, k)", [gateway.url, key])
            assert first == {"status": 200, "stdout": "42\n", "xcache": "MISS"}
            again = page.evaluate("([g, k]) => run(g, k)", [gateway.url, key])
            assert again == {"status": 200, "stdout": "42\n", "xcache": "HIT"}

            page.goto(f"{other}/index.html")
            blocked = page.evaluate("([g, k]) => run(g, k)", [gateway.url, key])
            # fetch() rejects with a TypeError when CORS blocks it: the page learns nothing.
            assert set(blocked) == {"error"}
            assert "TypeError" in blocked["error"]
        finally:
            browser.close()
