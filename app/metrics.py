"""The gateway's Prometheus families (prefix `pgw_`), on a registry of the app's own.

A registry per app (not the global default) lets tests build several apps in one process.

Under `serve --workers N`, `serve` sets PROMETHEUS_MULTIPROC_DIR for the workers: prometheus_client
then keeps every value in a file per worker, and a scrape of any worker reads all their files, so
it reports the sum over the workers (Prometheus multiprocess mode).
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess
from prometheus_client.metrics_core import Metric

__all__ = ["MULTIPROC_DIR_VARIABLE", "Metrics"]

MULTIPROC_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


class _MultiProcessRegistry(CollectorRegistry):
    """Families register here as on any registry (their values go to this worker's files), and
    a scrape reads the files of every worker, this one's included, instead of this process's."""

    def __init__(self, path: str) -> None:
        super().__init__(auto_describe=True)
        self._files = multiprocess.MultiProcessCollector(None, path=path)  # type: ignore[no-untyped-call]

    def collect(self) -> Iterable[Metric]:
        metrics: Iterable[Metric] = self._files.collect()  # type: ignore[no-untyped-call]
        return metrics


_DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# A young collection takes tens of microseconds; a full one over a large heap, tens of ms.
_GC_BUCKETS = (0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)


class Metrics:
    def __init__(self) -> None:
        # Set by `serve` before the workers start (prometheus_client reads it when imported).
        self._multiproc_dir = os.environ.get(MULTIPROC_DIR_VARIABLE)
        self.registry = (
            _MultiProcessRegistry(self._multiproc_dir)
            if self._multiproc_dir
            else CollectorRegistry(auto_describe=True)
        )
        self.requests = Counter(
            "pgw_requests_total",
            "HTTP requests answered",
            ["route", "status"],
            registry=self.registry,
        )
        self.execute_duration = Histogram(
            "pgw_execute_duration_seconds",
            "Time to answer an execute, cache hits included",
            ["language"],
            buckets=_DURATION_BUCKETS,
            registry=self.registry,
        )
        self.cache = Counter(
            "pgw_cache_total", "Result cache outcomes", ["outcome"], registry=self.registry
        )
        self.rejected = Counter(
            "pgw_rejected_total",
            "Requests refused by a limit",
            ["reason"],
            registry=self.registry,
        )
        self.upstream_errors = Counter(
            "pgw_upstream_errors_total",
            "Failed upstream calls",
            ["upstream", "kind"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "pgw_executions_in_flight",
            "Executions sent upstream and not yet answered",
            registry=self.registry,
            multiprocess_mode="livesum",  # the sum over the workers alive now
        )
        self.tenant_executions = Counter(
            "pgw_tenant_executions_total",
            "Executions answered, per tenant",
            ["tenant"],
            registry=self.registry,
        )
        # Touch the label sets a dashboard expects, so they read 0 rather than missing; the
        # children are kept, as labels() costs a lookup with locking on every request.
        for reason in ("rate_limit", "concurrency", "quota", "overload"):
            self.rejected.labels(reason=reason)
        self.cache_outcomes = {
            outcome.upper(): self.cache.labels(outcome=outcome)
            for outcome in ("hit", "miss", "bypass")
        }
        self._request_counters: dict[tuple[str, int], Counter] = {}
        self._tenant_counters: dict[str, Counter] = {}
        self._durations: dict[str, Histogram] = {}
        self.gc_pauses = Histogram(
            "pgw_gc_pause_seconds",
            "Pauses of the garbage collector, per generation (2: a full collection)",
            ["generation"],
            buckets=_GC_BUCKETS,
            registry=self.registry,
        )
        self._gc_children = [self.gc_pauses.labels(generation=str(g)) for g in range(3)]
        self._gc_started = 0.0
        self._gc_pending: list[tuple[int, float]] = []

    def watch_gc(self) -> None:
        """Time every collection of this process into `pgw_gc_pause_seconds` (until close())."""
        if self._on_gc not in gc.callbacks:
            gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        # Only noted here, recorded by the next request or scrape (`record_gc`): a collection
        # can start inside prometheus_client while it holds its multiprocess lock (creating a
        # labelled value allocates), and observing from here would wait on that lock forever.
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            self._gc_pending.append((info["generation"], time.perf_counter() - self._gc_started))

    def record_gc(self) -> None:
        """Record the pauses noted since the last call (cheap when there are none)."""
        if not self._gc_pending:
            return
        pending, self._gc_pending = self._gc_pending, []
        for generation, seconds in pending:
            self._gc_children[generation].observe(seconds)

    def tenant_executed(self, tenant_id: str, count: int = 1) -> None:
        child = self._tenant_counters.get(tenant_id)
        if child is None:
            if len(self._tenant_counters) > 10_000:  # tenants come and go: don't hold them all
                self._tenant_counters.clear()
            child = self._tenant_counters[tenant_id] = self.tenant_executions.labels(
                tenant=tenant_id
            )
        child.inc(count)

    def execute_answered(self, language: str, seconds: float) -> None:
        child = self._durations.get(language)
        if child is None:
            child = self._durations[language] = self.execute_duration.labels(language=language)
        child.observe(seconds)

    def close(self) -> None:
        """At a worker's shutdown: its live gauges stop counting in the others' scrapes."""
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
        if self._multiproc_dir:
            multiprocess.mark_process_dead(os.getpid(), self._multiproc_dir)  # type: ignore[no-untyped-call]

    def count_request(self, route: str, status: int) -> None:
        self.record_gc()
        child = self._request_counters.get((route, status))
        if child is None:
            child = self._request_counters[(route, status)] = self.requests.labels(
                route=route, status=str(status)
            )
        child.inc()
