"""The GC probe under `serve --workers N` (Prometheus multiprocess mode): a collection that starts
while prometheus_client holds its process-wide lock must not wait on that lock.

It did: the gc callback observed the pause itself, and creating a labelled value (a new tenant,
a new route and status) allocates inside the lock, so a collection could begin there and the
callback block the worker's event loop for good. Run in a child process with a deadline, since
the failure is a hang.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from tests.support import ROOT

_CHILD = textwrap.dedent(
    """
    import os, random, sys
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = sys.argv[1]
    from app.metrics import Metrics
    metrics = Metrics()
    metrics.watch_gc()
    random.seed(7)
    kept = []
    for n in range(30_000):
        # The process's other work: container objects kept alive a while, so collections come.
        kept.append([[] for _ in range(random.randint(0, 50))])
        if len(kept) > 200:
            kept.clear()
        metrics.tenant_executed(f"tenant-{n}")  # a new labelled value: made inside the lock
        if n % 100 == 0:
            metrics.count_request("/api/v2/execute", 200)  # records the pauses noted so far
    metrics.record_gc()
    total = sum(
        sample.value
        for family in metrics.registry.collect()
        if family.name == "pgw_gc_pause_seconds"
        for sample in family.samples
        if sample.name.endswith("_count")
    )
    print(int(total))
    """
)


def test_collections_inside_prometheus_lock_do_not_hang_the_worker(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) > 100  # the pauses were recorded, not just dropped
