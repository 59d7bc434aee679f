"""Prometheus metrics of one server process (``GET /metrics``), on a registry of its own.

With ``--workers N`` every worker process has its own registry: a scrape reaches one worker and
sees that worker's counts (Prometheus sums them across scrape targets; see the README).
"""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["ServingMetrics", "route_template"]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_ROUTES = [
    (re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?/infer$"), "/v2/models/{name}/infer"),
    (re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?/ready$"), "/v2/models/{name}/ready"),
    (re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?$"), "/v2/models/{name}"),
]
_STATIC = {"/", "/v1/predict", "/v1/metadata", "/metrics", "/v2", "/v2/health/live", "/v2/health/ready", "/docs"}


def route_template(path: str) -> str:
    """The route a path belongs to (a bounded label set: model names and unknown paths never become labels)."""
    if path in _STATIC:
        return path
    for pattern, template in _ROUTES:
        if pattern.match(path):
            return template
    return "other"


class ServingMetrics:
    """Request counts by route and status, latencies (total, queue, compute), batch sizes, queue depth, abstentions."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "freetickets_requests", "HTTP requests answered, by route and status", ["route", "status"],
            registry=self.registry,
        )  # fmt: skip
        self.latency = Histogram(
            "freetickets_request_latency_seconds", "Time from request to response, by route", ["route"],
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.queue_latency = Histogram(
            "freetickets_queue_latency_seconds", "Time a request waited for its batch", buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )  # fmt: skip
        self.compute_latency = Histogram(
            "freetickets_compute_latency_seconds", "Time of each engine call (one batch)", buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )  # fmt: skip
        self.batch_size = Histogram(
            "freetickets_batch_size", "Images per engine call", buckets=_BATCH_BUCKETS, registry=self.registry
        )
        self.queue_depth = Gauge("freetickets_queue_depth", "Images waiting for a batch", registry=self.registry)
        self.admitted = Gauge(
            "freetickets_admitted_images", "Images admitted and not answered yet (what --max-queue bounds)",
            registry=self.registry,
        )  # fmt: skip
        self.images = Counter("freetickets_images", "Images answered", registry=self.registry)
        self.abstentions = Counter(
            "freetickets_abstentions", "Images the model abstained on (selective prediction)", registry=self.registry
        )

    def observe_batch(self, size: int, compute_s: float) -> None:
        self.batch_size.observe(size)
        self.compute_latency.observe(compute_s)
        self.images.inc(size)

    def render(self) -> bytes:
        return generate_latest(self.registry)
