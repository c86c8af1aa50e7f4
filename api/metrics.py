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
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from common.broker import QUEUES, WEBHOOK_QUEUE, queue_depth
from common.db import session_scope
from common.models import Batch, BatchStatus, Job, JobStatus, WebhookDisabledEndpoint, WebhookEvent, WebhookEventStatus
from common.settings import Settings

log = logging.getLogger(__name__)

JOBS_ACCEPTED = Counter("letterpress_api_jobs_accepted_total", "Jobs created by POST /v1/jobs (replays not counted)")
BATCH_ITEMS_ACCEPTED = Counter("letterpress_api_batch_items_accepted_total", "Items of batches created")


class QueueCollector(Collector):
    """The queue at scrape time: a few grouped counts on Postgres indexes and an LLEN per Redis list. A database
    or Redis that cannot be read leaves its gauges out of that scrape (and `letterpress_queue_scrape_error` says
    which), so an alert on absent data fires instead of a false zero."""

    def __init__(self, settings: Settings):
        self.settings = settings

    def describe(self):
        """The names, without reading anything (the registry asks at registration)."""
        families = {"letterpress_queue_scrape_error": ["source"], "letterpress_queue_broker_messages": ["queue"],
                    "letterpress_queue_jobs_waiting": ["queue"], "letterpress_queue_oldest_waiting_seconds": ["queue"],
                    "letterpress_queue_jobs_running": ["queue"], "letterpress_batch_items_remaining": ["batch"],
                    "letterpress_webhook_events_pending": None, "letterpress_webhook_endpoints_disabled": None}
        return [GaugeMetricFamily(name, name, labels=labels) for name, labels in families.items()]

    def collect(self):
        errors = GaugeMetricFamily("letterpress_queue_scrape_error",
                                   "1 when this scrape could not read the source", labels=["source"])
        try:
            yield from self._postgres()
            errors.add_metric(["postgres"], 0)
        except SQLAlchemyError as exc:
            log.warning("metrics: the queue could not be read from Postgres: %s", exc)
            errors.add_metric(["postgres"], 1)
        broker = GaugeMetricFamily("letterpress_queue_broker_messages",
                                   "Messages waiting in the broker's list (a message in a worker's hand is not "
                                   "counted)", labels=["queue"])
        redis_ok = True
        for queue in (*QUEUES, WEBHOOK_QUEUE):
            depth = queue_depth(self.settings.redis.url, queue)
            if depth is None:
                redis_ok = False
                break
            broker.add_metric([queue], depth)
        if redis_ok:
            yield broker
        errors.add_metric(["redis"], 0 if redis_ok else 1)
        yield errors

    def _postgres(self):
        waiting = GaugeMetricFamily("letterpress_queue_jobs_waiting",
                                    "Jobs queued in Postgres (batch items the feeder has not sent included)",
                                    labels=["queue"])
        oldest = GaugeMetricFamily("letterpress_queue_oldest_waiting_seconds",
                                   "Age of the oldest queued job", labels=["queue"])
        running = GaugeMetricFamily("letterpress_queue_jobs_running", "Jobs running now", labels=["queue"])
        remaining = GaugeMetricFamily("letterpress_batch_items_remaining",
                                      "Items of an active batch not finished yet", labels=["batch"])
        pending = GaugeMetricFamily("letterpress_webhook_events_pending", "Webhook events waiting for delivery")
        disabled = GaugeMetricFamily("letterpress_webhook_endpoints_disabled",
                                     "Webhook endpoints disabled after answering 410 Gone")
        with session_scope() as session:
            rows = session.execute(
                select(Job.status, Job.queue, func.count(),
                       func.extract("epoch", func.now() - func.min(Job.created_at)))
                .where(Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]))
                .group_by(Job.status, Job.queue)).all()
            batches = session.execute(
                select(Job.batch_id, func.count())
                .join(Batch, Batch.id == Job.batch_id)
                .where(Batch.status == BatchStatus.IN_PROGRESS,
                       Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]))
                .group_by(Job.batch_id)).all()
            events = session.scalar(select(func.count()).select_from(WebhookEvent)
                                    .where(WebhookEvent.status == WebhookEventStatus.PENDING))
            endpoints = session.scalar(select(func.count()).select_from(WebhookDisabledEndpoint))
        seen = {(status, queue): (count, age) for status, queue, count, age in rows}
        for queue in QUEUES:
            count, age = seen.get((JobStatus.QUEUED, queue), (0, 0))
            waiting.add_metric([queue], count)
            oldest.add_metric([queue], float(age or 0))
            running.add_metric([queue], seen.get((JobStatus.RUNNING, queue), (0, 0))[0])
        for batch_id, count in batches:
            remaining.add_metric([str(batch_id)], count)
        pending.add_metric([], events)
        disabled.add_metric([], endpoints)
        yield from (waiting, oldest, running, remaining, pending, disabled)


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
