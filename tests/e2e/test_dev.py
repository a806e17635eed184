"""`piston-gateway dev` (what `make run` starts): engine + gateway + a printed key that works."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import httpx

from tests.support import ROOT, cli, free_port, wait_for_port


def test_dev_prints_a_key_that_runs_code(tmp_path: Path) -> None:
    port, engine_port = free_port(), free_port()
    log = (tmp_path / "dev.log").open("w+")
    proc = subprocess.Popen(
        cli("dev", "--port", str(port), "--engine-port", str(engine_port)),
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(port, timeout=60, proc=proc)
        deadline = time.monotonic() + 30
        key = None
        while key is None and time.monotonic() < deadline:
            log.seek(0)
            found = re.search(r"Bearer (pgw_[A-Za-z0-9_-]+)", log.read())
            key = found.group(1) if found else None
            time.sleep(0.1)
        assert key, "dev printed no key"
        answer = httpx.post(
            f"http://127.0.0.1:{port}/api/v2/execute",
            headers={"Authorization": f"Bearer {key}"},
            json={"language": "python", "version": "*", "files": [{"content": "print(6 * 7)"}]},
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["run"]["stdout"] == "42\n"
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).json()
        assert ready["upstreams"][0]["url"] == f"http://127.0.0.1:{engine_port}"
        # dev serves with the same connection bounds as `serve`: a 100 KiB head is refused.
        huge = httpx.get(
            f"http://127.0.0.1:{port}/healthz", headers={"X-Big": "a" * 100_000}, timeout=10
        )
        assert huge.status_code == 431, huge.text
        assert "message" in huge.json()
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    # The engine `dev` started goes with it (nothing may outlive `make run`).
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{engine_port}/api/v2/runtimes", timeout=1)
        except httpx.HTTPError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the engine outlived piston-gateway dev")
    log.seek(0)
    json_lines = [line for line in log.read().splitlines() if line.startswith("{")]
    assert json_lines  # the gateway logged its requests...
    assert not [line for line in json_lines if key in line]  # ...and never the key itself
