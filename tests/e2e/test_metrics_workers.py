"""`serve --workers 2`: one scrape of /metrics reports the sum over both workers (Prometheus
multiprocess mode), whichever worker answers it; the directory `serve` made is gone after."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import httpx
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from tests.support import Service, start_gateway

REQUESTS = 300
HEALTHZ = re.compile(r'^pgw_requests_total\{route="/healthz",status="200"\} (\S+)$', re.M)


def workers_of(service: Service, count: int) -> list[int]:
    assert service.proc is not None
    parent = service.proc.pid
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        workers = [
            int(pid)
            for pid in children
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
        ]
        if len(workers) == count:
            return workers
        time.sleep(0.1)
    raise AssertionError(f"not {count} workers under {parent}")


def multiproc_dir(pid: int) -> Path:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    for entry in environ:
        if entry.startswith(b"PROMETHEUS_MULTIPROC_DIR="):
            return Path(entry.split(b"=", 1)[1].decode())
    raise AssertionError(f"worker {pid} has no PROMETHEUS_MULTIPROC_DIR")


def healthz_count_of(text: str) -> float:
    found = HEALTHZ.search(text)
    return float(found.group(1)) if found else 0.0


def served_by(directory: Path, pid: int) -> float:
    """/healthz answers counted in one worker's own files only."""
    with tempfile.TemporaryDirectory() as alone:
        for path in directory.glob(f"*_{pid}.db"):
            shutil.copy(path, alone)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=alone)  # type: ignore[no-untyped-call]  # untyped
        return healthz_count_of(generate_latest(registry).decode())


async def traffic(url: str) -> None:
    """Many short connections at once, so that the kernel hands them to both workers."""
    limits = httpx.Limits(max_keepalive_connections=0, max_connections=30)
    async with httpx.AsyncClient(limits=limits, timeout=10) as client:
        answers = await asyncio.gather(*(client.get(f"{url}/healthz") for _ in range(REQUESTS)))
    assert {answer.status_code for answer in answers} == {200}


def test_one_scrape_sums_both_workers(engine: Service) -> None:
    service = start_gateway(redis_url=None, piston_url=engine.url, workers=2)
    try:
        workers = workers_of(service, 2)
        asyncio.run(traffic(service.url))
        # Every scrape, whichever worker answers it (new connections), shows all the traffic.
        scraped = set()
        for _ in range(10):
            with httpx.Client(timeout=10) as client:
                text = client.get(f"{service.url}/metrics").text
            scraped.add(healthz_count_of(text))
            # A live gauge is summed over the workers, not shown per pid.
            assert re.search(r"^pgw_executions_in_flight 0\.0$", text, re.M), text
            assert "pid=" not in text
        assert len(scraped) == 1, scraped
        total = scraped.pop()
        assert total >= REQUESTS
        # And it is the sum of what each worker served, both having served some.
        directory = multiproc_dir(workers[0])
        assert multiproc_dir(workers[1]) == directory
        per_worker = {pid: served_by(directory, pid) for pid in workers}
        assert all(count > 0 for count in per_worker.values()), per_worker
        assert sum(per_worker.values()) == total
    finally:
        service.stop()
    deadline = time.monotonic() + 10
    while directory.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not directory.exists(), "serve left its metrics directory behind"


def test_one_worker_keeps_its_own_registry(engine: Service) -> None:
    service = start_gateway(redis_url=None, piston_url=engine.url, workers=1)
    try:
        assert service.proc is not None
        environ = Path(f"/proc/{service.proc.pid}/environ").read_bytes()
        assert b"PROMETHEUS_MULTIPROC_DIR=" not in environ
        httpx.get(f"{service.url}/healthz", timeout=5)
        text = httpx.get(f"{service.url}/metrics", timeout=5).text
        assert healthz_count_of(text) >= 1
        assert "pgw_executions_in_flight 0.0" in text
    finally:
        service.stop()
    assert not os.environ.get("PROMETHEUS_MULTIPROC_DIR")
