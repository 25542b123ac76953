"""Prometheus metrics of `peftkit serve`, in the text format GET /metrics returns.

Counters and the latency histogram are updated by the app per request; the gauges and counters kept by
the adapter registry and the engine (queue depth, active rows, loads, evictions, ...) are read from their
stats() when Prometheus scrapes, so they can never drift from the source. Each app has its own
CollectorRegistry, so several servers in one process (tests) do not share or clash over metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

PREFIX = "peftkit"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# (name in stats(), metric name, help, kind): what the registry and engine report
REGISTRY_STATS = [
    ("loaded", "adapters_loaded", "Adapters loaded in the cache now", "gauge"),
    ("bytes", "adapter_bytes", "Bytes of adapter weights loaded now", "gauge"),
    ("loads", "adapter_loads", "Adapter loads from disk (first use, admin load or reload)", "counter"),
    ("evictions", "adapter_evictions", "Adapters evicted from the LRU cache", "counter"),
    ("reloads", "adapter_reloads", "Adapters reloaded because their files changed", "counter"),
    ("load_errors", "adapter_load_errors", "Adapter loads that failed validation or reading", "counter"),
]
ENGINE_STATS = [
    ("queue_depth", "queue_depth", "Requests waiting for a batch row", "gauge"),
    ("active", "active_rows", "Requests decoding in the batch now", "gauge"),
    ("steps", "engine_steps", "Batched forward passes run", "counter"),
    ("batched_rows", "engine_batched_rows", "Rows summed over all forward passes (rows / steps = mean batch)",
     "counter"),
]


class _StatsCollector(Collector):
    """Turns a stats() dict into metric families at scrape time; a key missing from stats() is skipped."""

    def __init__(self, table: list[tuple[str, str, str, str]], stats: Callable[[], dict]) -> None:
        self.table, self.stats = table, stats

    def collect(self) -> Iterator:
        values = self.stats()
        for key, name, doc, kind in self.table:
            if key not in values:
                continue
            family = (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(f"{PREFIX}_{name}", doc)
            family.add_metric([], float(values[key]))
            yield family


class Metrics:
    """The server's metrics. observe() records one finished request; render() is the /metrics body."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry_stats: Callable[[], dict], engine_stats: Callable[[], dict]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(f"{PREFIX}_requests", "HTTP requests to the API, by model, endpoint and status",
                                ["model", "endpoint", "status"], registry=self.registry)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens processed", ["model"],
                                     registry=self.registry)
        self.completion_tokens = Counter(f"{PREFIX}_completion_tokens", "Completion tokens generated", ["model"],
                                         registry=self.registry)
        self.latency = Histogram(f"{PREFIX}_request_duration_seconds", "Time from request to last byte, by endpoint",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_StatsCollector(REGISTRY_STATS, registry_stats))
        self.registry.register(_StatsCollector(ENGINE_STATS, engine_stats))

    def observe(self, model: str, endpoint: str, status: int, seconds: float, prompt_tokens: int = 0,
                completion_tokens: int = 0) -> None:
        self.requests.labels(model=model, endpoint=endpoint, status=str(status)).inc()
        self.latency.labels(endpoint=endpoint).observe(seconds)
        if prompt_tokens:
            self.prompt_tokens.labels(model=model).inc(prompt_tokens)
        if completion_tokens:
            self.completion_tokens.labels(model=model).inc(completion_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
