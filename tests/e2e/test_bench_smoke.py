"""The benchmark harness on a tiny load, so that `make bench` cannot rot unnoticed.

Only what is exact is asserted (single-flight's execution count, the shape of the results, the
Redis round trips a cache hit and a miss cost); speed is measured by `make bench`, never
asserted here.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT


@pytest.mark.skipif(
    shutil.which("wrk") is None, reason="wrk is not installed (apt-get install wrk)"
)
def test_bench_harness_runs(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads(out.read_text())
    assert set(results) >= {
        "floor",
        "cache_hit",
        "pass_through",
        "single_flight",
        "real_execution",
        "memory",
        "redis_round_trips_per_hit",
        "redis_round_trips_per_miss",
    }
    assert results["single_flight"]["upstream_executions"] == 1
    assert results["cache_hit"]["errors"] == 0
    assert results["cache_hit"]["requests"] > 0
    # One script per hit; the background pings of the key-cache listener add a little.
    assert results["redis_round_trips_per_hit"] < 1.5
    assert "Redis round trips per cache hit" in done.stdout
    # Counted only while the client waited: the admit script and the landing script.
    assert results["redis_round_trips_per_miss"] <= 2
    assert "Redis round trips per miss before the answer" in done.stdout
