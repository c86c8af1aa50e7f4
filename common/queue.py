"""The Celery app shared by the API (which only sends) and the workers (which define the tasks).

Payloads carry ids only; the task name is explicit so the API never imports worker code. Delivery settings
aim at at-least-once (docs/RELIABILITY.md): late acks, reject on worker loss, prefetch 1.
"""
from __future__ import annotations

import uuid
from functools import lru_cache

from celery import Celery
from kombu import Queue

from common.settings import Settings, get_settings

GENERATE_TASK = "jobs.generate"
QUEUES = ("interactive", "batch")


def make_celery(settings: Settings) -> Celery:
    app = Celery("letterpress", broker=settings.redis.url)
    app.conf.update(
        task_acks_late=True,                 # ack after the task ran: a worker lost mid-job gets it redelivered
        task_reject_on_worker_lost=True,     # ...including when the worker process is killed
        worker_prefetch_multiplier=1,        # one job in hand per process: nothing stranded behind a long job
        worker_cancel_long_running_tasks_on_connection_loss=True,
        broker_transport_options={"visibility_timeout": settings.redis.visibility_timeout_s},
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # reconnect forever after a Redis restart
        task_queues=[Queue(q) for q in QUEUES],
        task_default_queue="interactive",
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        worker_hijack_root_logger=False,
        broker_pool_limit=4,
    )
    return app


@lru_cache
def get_celery() -> Celery:
    return make_celery(get_settings())


def enqueue_generate(job_id: uuid.UUID, queue: str) -> None:
    """Send after the job row committed. Raises when Redis is unreachable: the caller records the job as not
    yet enqueued, and maintenance re-enqueues it."""
    get_celery().send_task(GENERATE_TASK, args=[str(job_id)], queue=queue, retry=False)
