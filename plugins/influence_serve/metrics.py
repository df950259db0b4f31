"""The server's Prometheus metrics, served at ``GET /metrics`` (names as vLLM's, under ``influence_``).

Each app has its own registry, so several servers in one process (tests, Ray replicas) never share
counters. Queue depth, busy slots and loaded models are read from the engines at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from influence_core.batching import BatchEngine, Job

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Latency buckets in seconds: decode steps are milliseconds on a GPU and tens of them on a CPU;
# a first token behind a long prompt or a queue can take many seconds.
INTER_TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
FIRST_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)


class EngineGauges(Collector):
    """Queue depth and busy slots of every loaded model's engine, at scrape time."""

    def __init__(self, engines: Callable[[], dict[str, BatchEngine]]) -> None:
        self.engines = engines

    def collect(self) -> Iterator[GaugeMetricFamily]:
        queued = GaugeMetricFamily("influence_queue_depth", "Requests waiting for a cache slot", labels=["model"])
        busy = GaugeMetricFamily("influence_active_slots", "Cache slots decoding or prefilling", labels=["model"])
        engines = self.engines()
        for name, engine in engines.items():
            queued.add_metric([name], engine.queued)
            busy.add_metric([name], engine.busy_slots)
        yield queued
        yield busy
        yield GaugeMetricFamily("influence_loaded_models", "Models loaded now", value=len(engines))


class ServerMetrics:
    def __init__(self, engines: Callable[[], dict[str, BatchEngine]]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("influence_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=self.registry)
        self.prompt_tokens = Counter("influence_prompt_tokens", "Prompt tokens of finished requests", ["model"],
                                     registry=self.registry)
        self.cached_tokens = Counter("influence_prompt_cached_tokens",
                                     "Prompt tokens reused from the prefix cache", ["model"], registry=self.registry)
        self.generation_tokens = Counter("influence_generation_tokens", "Tokens generated", ["model"],
                                         registry=self.registry)
        self.first_token = Histogram("influence_time_to_first_token_seconds",
                                     "From a request's arrival to its first token", ["model"],
                                     buckets=FIRST_TOKEN_BUCKETS, registry=self.registry)
        self.inter_token = Histogram("influence_inter_token_latency_seconds", "Between a stream's tokens",
                                     ["model"], buckets=INTER_TOKEN_BUCKETS, registry=self.registry)
        self.registry.register(EngineGauges(engines))

    def token_observer(self, model: str) -> Callable[[Job, float | None], None]:
        """What an engine calls after each token it picks (see `BatchEngine`)."""
        first_token, inter_token = self.first_token.labels(model), self.inter_token.labels(model)
        generated = self.generation_tokens.labels(model)

        def observe(job: Job, gap: float | None) -> None:
            generated.inc()
            if gap is None:
                generation = job.generation
                first_token.observe(generation.first_token_at - generation.requested_at)
            else:
                inter_token.observe(gap)

        return observe

    def count_prompt(self, model: str, prompt_tokens: int, cached_tokens: int) -> None:
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.cached_tokens.labels(model).inc(cached_tokens)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
