"""`GET /metrics` (`selar serve --metrics`): the server's state in Prometheus' text format,
through prometheus_client (one registry per app, so several apps in one process never
share counters).

Counted as requests end (a scheduler listener, in the scheduler's thread): prompt and
generated tokens, soft steps by method, time to first token and the time between tokens.
Read at each scrape (a collector): queue depth, busy slots, KV cells, model loads.
Requests by HTTP status come from an ASGI middleware, labelled by route (a fixed set, so
a client cannot grow the series without bound).
"""
from __future__ import annotations

import time
import weakref
from typing import Any

from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from selar_local.model_pool import ModelPool, ServedModel

_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/models", "/health", "/metrics",
           "/tokenize", "/detokenize", "/api/chat", "/api/generate", "/api/tags", "/api/ps", "/api/show",
           "/api/version", "/api/pull")
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class ServerMetrics:
    """The metrics of one app over one model pool."""

    def __init__(self, pool: ModelPool):
        self.pool = pool
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("selar_http_requests", "HTTP requests answered, by route and status",
                                ("route", "status"), registry=r)
        self.prompt_tokens = Counter("selar_prompt_tokens", "Prompt tokens of finished requests", ("model",),
                                     registry=r)
        self.generated_tokens = Counter("selar_generated_tokens", "Tokens generated", ("model",), registry=r)
        self.soft_steps = Counter("selar_soft_steps", "Soft (and latent) input steps, by decoding method",
                                  ("model", "method"), registry=r)
        self.finished = Counter("selar_sequences_finished", "Sequences ended, by how", ("model", "outcome"),
                                registry=r)
        self.ttft = Histogram("selar_time_to_first_token_seconds", "From submission to the first generated token",
                              ("model",), buckets=_TTFT_BUCKETS, registry=r)
        self.token_latency = Histogram("selar_inter_token_seconds", "Time between a sequence's generated tokens",
                                       ("model",), buckets=_TOKEN_BUCKETS, registry=r)
        r.register(_PoolCollector(pool))
        self._last_token: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        for model in pool.loaded():
            self.watch(model)
        pool.on_load.append(self.watch)

    def watch(self, model: ServedModel) -> None:
        """Count the requests of a (newly) loaded model."""
        model_id = model.id

        def listener(handle, kind: str, payload: Any) -> None:
            now = time.monotonic()
            if kind == "event":
                last = self._last_token.get(handle)
                if last is None:
                    self.ttft.labels(model_id).observe(now - handle.submitted_at)
                else:
                    self.token_latency.labels(model_id).observe(now - last)
                self._last_token[handle] = now
            elif kind == "done":
                self.prompt_tokens.labels(model_id).inc(payload.prompt_tokens)
                self.generated_tokens.labels(model_id).inc(payload.completion_tokens)
                self.soft_steps.labels(model_id, handle.params.method).inc(payload.soft_steps)
                self.finished.labels(model_id, payload.finish_reason).inc()
            else:
                self.finished.labels(model_id, "cancelled" if handle.cancelled else "error").inc()

        model.selar.scheduler.listeners.append(listener)

    def exposition(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


class _PoolCollector:
    """Gauges and counters read from the pool and its schedulers at scrape time."""

    def __init__(self, pool: ModelPool):
        self.pool = pool

    def describe(self):
        return []  # no fixed series: the models come and go

    def collect(self):
        loaded = GaugeMetricFamily("selar_model_loaded", "1 if the model is in memory", labels=("model",))
        loads = CounterMetricFamily("selar_model_loads", "Times the model was loaded", labels=("model",))
        load_time = CounterMetricFamily("selar_model_load_seconds", "Time spent loading the model", labels=("model",))
        gauges = {name: GaugeMetricFamily(f"selar_{name}", text, labels=("model",)) for name, text in (
            ("slots_total", "Parallel sequences the model's context decodes"),
            ("slots_busy", "Sequences decoding or prefilling now"),
            ("queue_depth", "Requests waiting for a slot"),
            ("kv_cells_in_use", "KV cells held by live sequences"),
            ("kv_cells_cached", "KV cells free slots keep as prompt cache"))}
        waiting = GaugeMetricFamily("selar_model_load_waiters", "Requests waiting for a model to load")
        waiting.add_metric((), self.pool.health()["loading_waiters"])
        for model in list(self.pool.models.values()):
            selar = model.selar
            loaded.add_metric((model.id,), 1 if selar is not None else 0)
            loads.add_metric((model.id,), model.loads)
            load_time.add_metric((model.id,), model.load_seconds_total)
            if selar is None:
                continue
            stats = selar.scheduler.stats()
            for name, value in (("slots_total", stats.slots_total), ("slots_busy", stats.slots_busy),
                                ("queue_depth", stats.queued), ("kv_cells_in_use", stats.kv_cells_in_use),
                                ("kv_cells_cached", stats.kv_cells_cached)):
                gauges[name].add_metric((model.id,), value)
        yield from (loaded, loads, load_time, waiting, *gauges.values())


class _CountRequests:
    """ASGI middleware: every HTTP answer counted by route and status."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        route = path if path in _ROUTES else ("/v1/models/{id}" if path.startswith("/v1/models/") else "other")
        status = {"code": 500}

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.requests.labels(route, str(status["code"])).inc()


def add_metrics(app: FastAPI, pool: ModelPool) -> ServerMetrics:
    """GET /metrics, and the middleware counting requests (added after the API key's, it
    wraps it: refused requests are counted too)."""
    metrics = ServerMetrics(pool)

    @app.get("/metrics")
    async def scrape():
        return metrics.exposition()

    app.add_middleware(_CountRequests, metrics=metrics)
    return metrics
