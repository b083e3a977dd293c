"""Prometheus metrics of one app: its own registry, so several apps (tests) never share counters.

Request count and latency are measured by an ASGI middleware around the whole response (a stream counts
until its last event); time to first token and generated tokens are recorded by the generation code; queue
length and batch size are read from `engine.stats()` when `/metrics` is scraped.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Paths that get their own label; anything else (404s, typos) is "other", so labels stay bounded.
TRACKED_ROUTES = frozenset(
    {
        "/",
        "/generate",
        "/generate_stream",
        "/v1/completions",
        "/v1/chat/completions",
        "/tokenize",
        "/health",
        "/info",
    }
)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, engine: Any) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "gorgon_requests",
            "HTTP requests by route and status code",
            ["route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "gorgon_request_duration_seconds",
            "Time from request to last byte of the response",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ttft = Histogram(
            "gorgon_time_to_first_token_seconds",
            "Time from request to first generated token",
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.generated_tokens = Counter(
            "gorgon_generated_tokens", "Tokens generated for answered requests", registry=self.registry
        )
        self.queue_size = Gauge(
            "gorgon_queue_size", "Requests waiting to be scheduled", registry=self.registry
        )
        self.batch_size = Gauge(
            "gorgon_batch_current_size", "Sequences in the last step", registry=self.registry
        )
        # Read at scrape time: the engine's thread owns these numbers.
        self.queue_size.set_function(lambda: engine.stats().queue_length)
        self.batch_size.set_function(lambda: engine.stats().batch_size)

        self.registry.register(_SpeculationCollector(engine))
        self.registry.register(_AdapterCollector(engine))

    def first_token(self, started: float) -> None:
        self.ttft.observe(time.perf_counter() - started)

    def finished(self, generated_tokens: int) -> None:
        self.generated_tokens.inc(generated_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts every HTTP request by route and status, and times it to the end of its body."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == "/metrics":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in TRACKED_ROUTES else "other"
        status = 500  # what the server answers if the app dies before starting a response

        async def send_and_watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        started = time.perf_counter()
        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            self.metrics.requests.labels(route=route, status=str(status)).inc()
            self.metrics.latency.labels(route=route).observe(time.perf_counter() - started)


class _SpeculationCollector:
    """Speculation figures, read from the engine at scrape time (absent when the engine does not speculate)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def describe(self) -> list:
        return []

    def collect(self):
        stats_of = getattr(self.engine, "speculation_stats", None)
        stats = stats_of() if stats_of else None
        if stats is None:
            return
        yield GaugeMetricFamily(
            "gorgon_speculation_tokens_per_step",
            "Mean tokens emitted per verified sequence-step (accepted drafts + 1)",
            value=stats.mean_tokens_per_step,
        )
        heads = GaugeMetricFamily(
            "gorgon_speculation_head_acceptance",
            "Share of verified sequence-steps that accepted a draft at this depth (head)",
            labels=["head"],
        )
        for k, rate in enumerate(stats.head_acceptance()):
            heads.add_metric([str(k)], rate)
        yield heads
        steps = CounterMetricFamily(
            "gorgon_speculation_steps", "Decode steps with and without drafts", labels=["speculation"]
        )
        steps.add_metric(["on"], stats.steps_on)
        steps.add_metric(["off"], stats.steps_off)
        yield steps


class _AdapterCollector:
    """The per-request adapter cache, read at scrape time (absent when the engine has none)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def describe(self) -> list:
        return []

    def collect(self):
        cache = getattr(self.engine, "adapters", None)
        if cache is None:
            return
        yield GaugeMetricFamily("gorgon_adapters_loaded", "Adapters in the cache", value=len(cache))
        yield GaugeMetricFamily(
            "gorgon_adapter_memory_bytes", "Bytes of the cached adapters' weights", value=cache.nbytes
        )
        yield CounterMetricFamily("gorgon_adapter_loads", "Adapter loads (hits excluded)", value=cache.loads)
        yield CounterMetricFamily(
            "gorgon_adapter_evictions", "Adapters dropped from the cache", value=cache.evictions
        )
