"""`GET /metrics` of the API process: requests by route and status with their latency (`http_requests_total`,
`http_request_duration_seconds`: `RequestMetrics`), how late its event loop runs (`watch_event_loop_lag`), what
was accepted, and the queue as Postgres and Redis see it, read at scrape time. Every name and its alert:
docs/OPERATIONS.md.

`RequestMetrics` is a pure-ASGI layer that reads the route template the router matched (`scope["route"]`, set by
Starlette/FastAPI while routing) after the call: prometheus-fastapi-instrumentator, used before, matched every
request against the routes a second time and built a Request, a Response and five metrics around it, which cost
a noticeable share of a poll's CPU (docs/PERFORMANCE.md, "Front door: what a request costs"). Same names and labels
as before (handler = the route template, "none" when no route matched; status = its class, `2xx`...), so the
dashboards and alerts read them unchanged.

Several uvicorn processes (`LETTERPRESS_API__WORKERS` above 1, started by `letterpress api` or `make up`) keep their
counters and histograms in prometheus_client's multiprocess files (`PROMETHEUS_MULTIPROC_DIR`, set and emptied by
common.devstack.stack.api_env), and a scrape of any of them sums all of them. Without that variable (one process)
the process's own registry is served. In Kubernetes, one process a pod scales with pods (deploy/). The queue gauges
are read at scrape time, the same from every process.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time

from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy.exc import SQLAlchemyError
from starlette.requests import Request
from starlette.responses import Response

from api.asgi import Receive, Scope, Send, StatusWatch
from common.broker import QUEUES, WEBHOOK_QUEUE, queue_depth
from common.db import session_scope
from common.fleet import queue_snapshot
from common.settings import Settings

log = logging.getLogger(__name__)

JOBS_ACCEPTED = Counter("letterpress_api_jobs_accepted_total", "Jobs created by POST /v1/jobs (replays not counted)")
JOBS_FROM_CACHE = Counter("letterpress_api_jobs_answered_from_cache_total",
                          "Jobs POST /v1/jobs answered at once from the result cache (common/cache_answers.py)")
BATCH_ITEMS_ACCEPTED = Counter("letterpress_api_batch_items_accepted_total", "Items of batches created")
REQUESTS = Counter("http_requests_total", "Requests by route template, method and status class",
                   ["handler", "method", "status"])
LATENCY = Histogram("http_request_duration_seconds", "Seconds from a request's arrival to its answer's end",
                    ["handler", "method"],
                    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0))
NOT_INSTRUMENTED = ("/metrics",)
EVENT_LOOP_LAG = Histogram("letterpress_api_event_loop_lag_seconds",
                           "How late a timer of an API process's event loop fired: how long anything ready, a request "
                           "among them, waited for the loop",
                           buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))
LAG_INTERVAL_S = 0.25


async def watch_event_loop_lag(interval_s: float = LAG_INTERVAL_S) -> None:
    """Observe EVENT_LOOP_LAG every `interval_s` until cancelled (the app's lifespan runs it). A process whose
    loop is saturated or blocked shows here before its requests time out, and it tells a slow API process from
    a slow database or network: a request's latency with little lag was spent outside the loop."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + interval_s
        await asyncio.sleep(interval_s)
        EVENT_LOOP_LAG.observe(max(0.0, loop.time() - due))


class RequestMetrics:
    """Counts each request and times it, by the route template it matched."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in NOT_INSTRUMENTED:
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        watch = StatusWatch(send)
        try:
            await self.app(scope, receive, watch)
        finally:  # an exception escaping here was answered 500 by Starlette's outer error layer
            route = scope.get("route")
            handler = getattr(route, "path", None) or "none"
            method = scope["method"]
            REQUESTS.labels(handler, method, f"{str(watch.status or 500)[0]}xx").inc()
            LATENCY.labels(handler, method).observe(time.perf_counter() - started)


# name -> (help, labels) of every gauge QueueCollector reports: those read from Postgres, then the rest
POSTGRES_GAUGES = {
    "letterpress_queue_jobs_waiting": ("Jobs queued in Postgres (batch items the feeder has not sent included)",
                                       ["queue"]),
    "letterpress_queue_oldest_waiting_seconds": ("Age of the oldest queued job", ["queue"]),
    "letterpress_queue_jobs_running": ("Jobs running now", ["queue"]),
    "letterpress_batch_items_remaining": ("Items of an active batch not finished yet", ["batch"]),
    "letterpress_webhook_events_pending": ("Webhook events waiting for delivery", []),
    "letterpress_webhook_endpoints_disabled": ("Webhook endpoints disabled after answering 410 Gone", []),
}
QUEUE_GAUGES = {
    **POSTGRES_GAUGES,
    "letterpress_queue_broker_messages": ("Messages waiting in the broker's list (a message in a worker's hand is "
                                          "not counted)", ["queue"]),
    "letterpress_queue_scrape_error": ("1 when this scrape could not read the source", ["source"]),
}


def _gauges() -> dict[str, GaugeMetricFamily]:
    return {name: GaugeMetricFamily(name, doc, labels=labels) for name, (doc, labels) in QUEUE_GAUGES.items()}


class QueueCollector(Collector):
    """The queue at scrape time: a few grouped counts on Postgres indexes and an LLEN per Redis list. A database
    or Redis that cannot be read leaves its gauges out of that scrape (and `letterpress_queue_scrape_error` says
    which), so an alert on absent data fires instead of a false zero."""

    def __init__(self, settings: Settings):
        self.settings = settings

    def describe(self):
        """The names, without reading anything (the registry asks at registration)."""
        return list(_gauges().values())

    def collect(self):
        gauges = _gauges()
        errors = gauges["letterpress_queue_scrape_error"]
        try:
            self._read_postgres(gauges)
            yield from (gauges[name] for name in POSTGRES_GAUGES)
            errors.add_metric(["postgres"], 0)
        except SQLAlchemyError as exc:
            log.warning("metrics: the queue could not be read from Postgres: %s", exc)
            errors.add_metric(["postgres"], 1)
        broker = gauges["letterpress_queue_broker_messages"]
        redis_ok = True
        for queue in (*QUEUES, WEBHOOK_QUEUE):
            depth = queue_depth(self.settings.redis.url, queue)
            if depth is None:  # Redis down: one timeout per scrape, not one per list
                redis_ok = False
                break
            broker.add_metric([queue], depth)
        if redis_ok:
            yield broker
        errors.add_metric(["redis"], 0 if redis_ok else 1)
        yield errors

    @staticmethod
    def _read_postgres(gauges: dict[str, GaugeMetricFamily]) -> None:
        with session_scope() as session:
            snapshot = queue_snapshot(session)
        for queue, counts in snapshot.queues.items():
            gauges["letterpress_queue_jobs_waiting"].add_metric([queue], counts.waiting)
            gauges["letterpress_queue_oldest_waiting_seconds"].add_metric([queue], counts.oldest_waiting_s)
            gauges["letterpress_queue_jobs_running"].add_metric([queue], counts.running)
        for batch in snapshot.batches:
            gauges["letterpress_batch_items_remaining"].add_metric([str(batch.id)], batch.remaining)
        gauges["letterpress_webhook_events_pending"].add_metric([], snapshot.webhook_events_pending)
        gauges["letterpress_webhook_endpoints_disabled"].add_metric([], snapshot.webhook_endpoints_disabled)


_registered = threading.Lock()
_collector: QueueCollector | None = None


def _scrape_registry() -> CollectorRegistry:
    """What a scrape reads: every API process's counters and histograms (from the multiprocess files) and the queue,
    when several processes serve; else this process's registry (the queue collector is registered in it)."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return REGISTRY
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    if _collector is not None:
        registry.register(_collector)
    return registry


def install(app: FastAPI, settings: Settings) -> None:
    """Instrument the routes and serve /metrics. The collectors live in the process's one registry, so a second
    app in the same process (tests) reuses them."""
    global _collector

    @app.get("/metrics", include_in_schema=False)
    def metrics(_request: Request) -> Response:  # sync: the queue collector reads Postgres (on the threadpool)
        return Response(generate_latest(_scrape_registry()), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(RequestMetrics)
    with _registered:
        if _collector is None:
            _collector = QueueCollector(settings)
            REGISTRY.register(_collector)
