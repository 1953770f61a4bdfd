"""Prometheus metrics, computed from the job records when scraped.

Workers are separate processes, so counters kept in memory here would miss their work. The
records are the truth: jobs by state (a GROUP BY on the state index) and stage durations (an
aggregate over succeeded jobs' stage seconds) come from the database at scrape time; those and
the broker's queue depth are cached for a few seconds, so frequent scrapes cost one query
each per interval and never a Redis round trip per scrape.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from prometheus_client import Counter as PromCounter
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from jobs.lifecycle import STAGE_WEIGHTS
from jobs.queue import JobQueue
from jobs.records import RecordStore
from schemas.jobs import JobState

STAGE_BUCKETS = (0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0)


@dataclass(frozen=True)
class _Snapshot:
    taken: float
    by_state: dict[JobState, int]
    stages: dict[str, tuple[list[int], int, float]]
    depth: int | None


class JobsCollector(Collector):
    """Jobs by state, stage-duration histograms and queue depth, from records and broker."""

    def __init__(self, records: RecordStore, queue: JobQueue, ttl: float = 5.0) -> None:
        self._records = records
        self._queue = queue
        self._ttl = ttl
        self._lock = threading.Lock()
        self._cached: _Snapshot | None = None

    def _snapshot(self) -> _Snapshot:
        with self._lock:
            cached = self._cached
            if cached is None or time.monotonic() - cached.taken > self._ttl:
                cached = _Snapshot(
                    taken=time.monotonic(),
                    by_state=self._records.count_by_state(),
                    stages=self._records.stage_histogram(STAGE_BUCKETS),
                    depth=self._queue.depth(),
                )
                self._cached = cached
            return cached

    def describe(self) -> Iterator[Metric]:
        """Names only, for registration: no query and no broker call when the app is built."""
        yield GaugeMetricFamily("fineprune_jobs", "Jobs by state.", labels=["state"])
        yield HistogramMetricFamily(
            "fineprune_stage_duration_seconds", "Seconds per engine stage.", labels=["stage"]
        )
        yield GaugeMetricFamily("fineprune_queue_depth", "Jobs waiting in the broker's queues.")

    def collect(self) -> Iterator[Metric]:
        snapshot = self._snapshot()
        jobs = GaugeMetricFamily("fineprune_jobs", "Jobs by state.", labels=["state"])
        for state in JobState:
            jobs.add_metric([state.value], snapshot.by_state.get(state, 0))
        yield jobs

        stages = HistogramMetricFamily(
            "fineprune_stage_duration_seconds",
            "Seconds per engine stage, from the reports of succeeded jobs.",
            labels=["stage"],
        )
        for stage in STAGE_WEIGHTS:
            below, count, total = snapshot.stages.get(stage, ([0] * len(STAGE_BUCKETS), 0, 0.0))
            buckets = [(str(b), n) for b, n in zip(STAGE_BUCKETS, below, strict=True)]
            buckets.append(("+Inf", count))
            stages.add_metric([stage], buckets, sum_value=total)
        yield stages

        if snapshot.depth is not None:
            yield GaugeMetricFamily(
                "fineprune_queue_depth",
                "Jobs waiting in the broker's queues.",
                value=snapshot.depth,
            )


def build_registry(records: RecordStore, queue: JobQueue) -> tuple[CollectorRegistry, PromCounter]:
    """A registry per app (not the global one), so several apps can live in one process."""
    registry = CollectorRegistry()
    registry.register(JobsCollector(records, queue))
    requests = PromCounter(
        "fineprune_http_requests",
        "HTTP requests by route template and status.",
        ["method", "route", "status"],
        registry=registry,
    )
    return registry, requests
