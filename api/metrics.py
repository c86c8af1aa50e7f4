"""`GET /metrics` of the API process: requests by route and status with their latency
(prometheus-fastapi-instrumentator's `http_requests_total` and `http_request_duration_seconds`), what was accepted,
and the queue as Postgres and Redis see it, read at scrape time. Every name and its alert: docs/OPERATIONS.md.

One scrape target per API process: with `LETTERPRESS_API__WORKERS` above 1 a scrape reaches one uvicorn process of
the pod, so run one process a pod and scale pods (deploy/). The queue gauges are the same from every API process.
"""
from __future__ import annotations

import logging
import threading

from fastapi import FastAPI
from prometheus_client import REGISTRY, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from prometheus_fastapi_instrumentator import Instrumentator
from sqlalchemy.exc import SQLAlchemyError

from common.broker import QUEUES, WEBHOOK_QUEUE, queue_depth
from common.db import session_scope
from common.fleet import queue_snapshot
from common.settings import Settings

log = logging.getLogger(__name__)

JOBS_ACCEPTED = Counter("letterpress_api_jobs_accepted_total", "Jobs created by POST /v1/jobs (replays not counted)")
JOBS_FROM_CACHE = Counter("letterpress_api_jobs_answered_from_cache_total",
                          "Jobs POST /v1/jobs answered at once from the result cache (common/cache_answers.py)")
BATCH_ITEMS_ACCEPTED = Counter("letterpress_api_batch_items_accepted_total", "Items of batches created")


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


def install(app: FastAPI, settings: Settings) -> None:
    """Instrument the routes and serve /metrics. The collectors live in the process's one registry, so a second
    app in the same process (tests) reuses them."""
    global _collector
    Instrumentator(excluded_handlers=["/metrics"]).instrument(app).expose(app, include_in_schema=False)
    with _registered:
        if _collector is None:
            _collector = QueueCollector(settings)
            REGISTRY.register(_collector)
