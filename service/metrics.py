"""Prometheus metrics, computed from the job records when scraped.

Workers are separate processes, so counters kept in memory here would miss their work. The
records are the truth: jobs by state and stage durations (from each succeeded job's report
timings) are derived from them at scrape time, cached for a few seconds.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client import Counter as PromCounter
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from jobs.lifecycle import STAGE_WEIGHTS
from jobs.queue import JobQueue
from jobs.records import FileRecordStore, JobRecord
from schemas.jobs import JobState

STAGE_BUCKETS = (0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0)


class JobsCollector(Collector):
    """Jobs by state, stage-duration histograms and queue depth, from records and broker."""

    def __init__(self, records: FileRecordStore, queue: JobQueue, ttl: float = 5.0) -> None:
        self._records = records
        self._queue = queue
        self._ttl = ttl
        self._lock = threading.Lock()
        self._cached: tuple[float, list[JobRecord]] = (0.0, [])

    def _snapshot(self) -> list[JobRecord]:
        with self._lock:
            taken, records = self._cached
            if time.monotonic() - taken > self._ttl:
                records = list(self._records.iter_all())
                self._cached = (time.monotonic(), records)
            return records

    def collect(self) -> Iterator[Metric]:
        records = self._snapshot()
        by_state = Counter(r.state for r in records)
        jobs = GaugeMetricFamily("fineprune_jobs", "Jobs by state.", labels=["state"])
        for state in JobState:
            jobs.add_metric([state.value], by_state.get(state, 0))
        yield jobs

        stages = HistogramMetricFamily(
            "fineprune_stage_duration_seconds",
            "Seconds per engine stage, from the reports of succeeded jobs.",
            labels=["stage"],
        )
        for stage in STAGE_WEIGHTS:
            values = [
                r.timings[stage]
                for r in records
                if r.state == JobState.succeeded and stage in r.timings
            ]
            buckets = [(str(b), sum(v <= b for v in values)) for b in STAGE_BUCKETS]
            buckets.append(("+Inf", len(values)))
            stages.add_metric([stage], buckets, sum_value=sum(values))
        yield stages

        depth = self._queue.depth()
        if depth is not None:
            yield GaugeMetricFamily(
                "fineprune_queue_depth", "Jobs waiting in the broker's queues.", value=depth
            )


def build_registry(
    records: FileRecordStore, queue: JobQueue
) -> tuple[CollectorRegistry, PromCounter]:
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
