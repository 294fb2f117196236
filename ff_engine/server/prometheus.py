"""Prometheus metrics (prometheus-client), one registry per app so several servers can live in one process.

Counts that the service already keeps (active, queued, finished, failed, cancelled; pages per worker) are read
from ``service.stats()`` at scrape time by a custom collector, so they can never drift from the engine.  What
only the server sees (requests refused, frames delivered, latencies) is counted here.
"""

from __future__ import annotations

import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServiceCollector:
    """Stream and page gauges from ``service.stats()``, read at every scrape."""

    def __init__(self, service, frame_rate):
        self.service, self.frame_rate = service, frame_rate

    def collect(self):
        s = self.service.stats()
        yield _gauge("ff_engine_streams_active", "streams generating now", s.get("active", 0))
        yield _gauge("ff_engine_streams_queued", "streams waiting for pages", s.get("queued", 0))
        yield _gauge("ff_engine_streams_parked", "paused streams parked in host memory (no pages held)",
                     s.get("parked_now", 0))
        for state in ("finished", "failed", "cancelled", "rejected"):
            c = CounterMetricFamily(f"ff_engine_streams_{state}", f"streams {state} by the service")
            c.add_metric([], s.get(state, 0))
            yield c
        for name, key in (("parks", "parked"), ("unparks", "unparked"), ("forks", "forked"),
                          ("rollbacks", "rolled_back"), ("steers", "steered")):
            c = CounterMetricFamily(f"ff_engine_{name}", f"interactive controls applied: {key} (service)")
            c.add_metric([], s.get(key, 0))
            yield c
        for q in (50, 99):
            if s.get(f"unpark_p{q}_s") is not None:
                yield _gauge(f"ff_engine_unpark_p{q}_seconds", f"resume of a parked stream, p{q} (recent)",
                             s[f"unpark_p{q}_s"])
        used = GaugeMetricFamily("ff_engine_pages_used", "KV pages in use", labels=["worker"])
        free = GaugeMetricFamily("ff_engine_pages_free", "KV pages free", labels=["worker"])
        reserved = GaugeMetricFamily(
            "ff_engine_pages_reserved", "KV pages reserved by admitted streams", labels=["worker"]
        )
        alive = GaugeMetricFamily("ff_engine_worker_alive", "1 when the worker answers", labels=["worker"])
        for w in s.get("workers", []):
            name = str(w.get("name", "?"))
            used.add_metric([name], w.get("pages_used", 0))
            free.add_metric([name], w.get("pages_total", 0) - w.get("pages_used", 0))
            reserved.add_metric([name], w.get("pages_reserved", 0))
            alive.add_metric([name], 1 if w.get("alive", True) else 0)
        yield from (used, free, reserved, alive)
        yield _gauge("ff_engine_frames_per_second", "video frames delivered per second (last 10 s)", self.frame_rate())


def _gauge(name, doc, value):
    g = GaugeMetricFamily(name, doc)
    g.add_metric([], value)
    return g


class ServerMetrics:
    def __init__(self, service):
        self.registry = CollectorRegistry()
        self.rejected = Counter(
            "ff_engine_requests_rejected", "requests answered 429", ["reason"], registry=self.registry
        )
        self.invalid = Counter(
            "ff_engine_requests_invalid", "requests answered 4xx for bad input", ["status"], registry=self.registry
        )
        self.frames = Counter(
            "ff_engine_frames_generated", "video frames produced (all streams)", registry=self.registry
        )
        self.block_latency = Histogram(
            "ff_engine_block_latency_seconds",
            "time between a stream's blocks",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ttff = Histogram(
            "ff_engine_time_to_first_frame_seconds",
            "submit to first block of a stream",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._recent: deque[tuple[float, int]] = deque()
        self.registry.register(ServiceCollector(service, self.frame_rate))

    def add_frames(self, n: int) -> None:
        self.frames.inc(n)
        now = time.monotonic()
        self._recent.append((now, n))
        self._trim(now)

    def frame_rate(self, window: float = 10.0) -> float:
        now = time.monotonic()
        self._trim(now, window)
        return sum(n for _, n in self._recent) / window

    def _trim(self, now: float, window: float = 10.0) -> None:
        while self._recent and self._recent[0][0] < now - window:
            self._recent.popleft()

    def render(self) -> bytes:
        return generate_latest(self.registry)
