"""The broker: the Celery app shared by the API (which only sends) and the workers (which define the tasks),
the task and queue names, the sends, and the one probe of a queue's depth.

Payloads carry ids only; the task name is explicit so the API never imports worker code. Delivery settings
aim at at-least-once (docs/RELIABILITY.md): late acks, reject on worker loss, prefetch 1.
"""
from __future__ import annotations

import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache

import redis as redis_lib
from celery import Celery
from kombu import Queue

from common.settings import Settings, get_settings

GENERATE_TASK = "jobs.generate"
INTERACTIVE_QUEUE = "interactive"  # POST /v1/jobs: sent at submit (the normal-priority lane)
# POST /v1/jobs with a priority: one list per lane, highest first (common.fair_share.PRIORITIES)
INTERACTIVE_QUEUES = {"high": "interactive-high", "normal": INTERACTIVE_QUEUE, "low": "interactive-low"}
BATCH_QUEUE = "batch"  # JSONL batch items: sent by the feeder (worker/feeder.py), a bounded window at a time
# Every list a GPU worker takes jobs from, in the order it serves them: strictly (kombu's `priority` queue order),
# so a message waits for every message of the lists before its own, and batch work only for interactive work.
QUEUES = (*INTERACTIVE_QUEUES.values(), BATCH_QUEUE)
# Webhook deliveries: their own queue, consumed only by `letterpress webhooks-worker` (never a GPU worker). It is
# left out of task_queues on purpose, so a worker started without -Q never consumes it.
WEBHOOK_TASK = "webhooks.deliver"
WEBHOOK_QUEUE = "webhooks"


def make_celery(settings: Settings) -> Celery:
    app = Celery("letterpress", broker=settings.redis.url)
    app.conf.update(
        task_acks_late=True,                 # ack after the task ran: a worker lost mid-job gets it redelivered
        task_reject_on_worker_lost=True,     # ...including when the worker process is killed
        worker_prefetch_multiplier=1,        # one job in hand per process: nothing stranded behind a long job
        worker_cancel_long_running_tasks_on_connection_loss=True,
        broker_transport_options={
            "visibility_timeout": settings.redis.visibility_timeout_s,
            # a publish to a dead Redis fails at once (not after ~6 s of retries): the API answers and
            # maintenance re-enqueues what Postgres holds
            "max_retries": 0,
            # serve the lists in QUEUES order, not in turn: priority lanes, interactive before batch
            "queue_order_strategy": "priority",
        },
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # reconnect forever after a Redis restart
        task_queues=[Queue(q) for q in QUEUES],
        task_default_queue=INTERACTIVE_QUEUE,
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
    with generate_sender() as send:
        send(job_id, queue)


@contextmanager
def generate_sender() -> Iterator[Callable[[uuid.UUID, str], None]]:
    """`enqueue_generate` over one producer taken from the pool for a run of sends (the API's send queue,
    api/send_queue.py), instead of one taken and given back per message. The run's messages go to Redis in one
    pipeline when the block ends (kombu's `Producer.batch`), not one round trip each: a failed flush raises there,
    so a caller marks nothing of the run as sent (a message that did go out is sent again by maintenance, and a
    second delivery is a no-op at claim)."""
    app = get_celery()
    with app.producer_or_acquire() as producer, producer.batch():
        # Two of Celery's per-message costs it lets a caller skip, together half of a send's CPU: the args' safe
        # repr (given here: one id) and the queue's re-declaration (kombu copies and binds the Queue per message;
        # the message goes to the anonymous exchange, straight onto the queue's list, declared or not).
        yield lambda job_id, queue: app.send_task(GENERATE_TASK, args=[str(job_id)], queue=queue, retry=False,
                                                  producer=producer, declare=[], argsrepr=f"['{job_id}']",
                                                  kwargsrepr="{}")


def enqueue_webhook(event_id: str, countdown: float | None = None) -> None:
    """Send a webhook event id to the delivery worker (after the event row committed). Raises when Redis is
    unreachable: the due-events pass (common.webhooks.outbox.enqueue_due) finds the event in Postgres later."""
    get_celery().send_task(WEBHOOK_TASK, args=[event_id], queue=WEBHOOK_QUEUE, countdown=countdown or None,
                           retry=False)


@lru_cache(maxsize=4)
def _redis(url: str) -> redis_lib.Redis:
    return redis_lib.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)


def queue_depth(redis_url: str, queue: str) -> int | None:
    """Messages waiting in a Celery queue (the length of its Redis list; a message in a worker's hand is not
    counted); None when Redis cannot be asked."""
    try:
        return int(_redis(redis_url).llen(queue))
    except redis_lib.RedisError:
        return None


def interactive_depth(redis_url: str) -> int | None:
    """Messages waiting in all interactive lanes; None when Redis cannot be asked."""
    depths = [queue_depth(redis_url, queue) for queue in INTERACTIVE_QUEUES.values()]
    return None if None in depths else sum(depths)


def interactive_queue(priority: str) -> str:
    """The broker list of a job sent with POST /v1/jobs at `priority`."""
    return INTERACTIVE_QUEUES[priority]


def priority_of(queue: str) -> str | None:
    """The lane of an interactive list; None for the batch list (a batch item's lane is its batch's)."""
    return next((p for p, q in INTERACTIVE_QUEUES.items() if q == queue), None)


def queue_empty(redis_url: str, queue: str) -> bool | None:
    """Whether a Celery queue is empty; None when Redis cannot be asked."""
    depth = queue_depth(redis_url, queue)
    return None if depth is None else depth == 0


def webhooks_worker_argv(concurrency: int = 8, name: str = "webhooks") -> list[str]:
    """The webhook delivery worker: Celery on the `webhooks` queue with a thread pool (deliveries wait on the
    network, not the CPU), no model, no GPU."""
    return [sys.executable, "-m", "celery", "-A", "worker.webhook_delivery", "worker", "--pool", "threads",
            "--concurrency", str(concurrency), "-Q", WEBHOOK_QUEUE, "-n", f"{name}@%h", "--loglevel", "INFO",
            "--without-gossip", "--without-mingle"]
