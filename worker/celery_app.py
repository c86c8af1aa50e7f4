"""The Celery worker process: `celery -A worker.celery_app worker --pool solo` (one process per GPU).

At start it loads the pipeline once (warm) and starts the maintenance thread and, when configured, the spot-notice
watcher. The `jobs.generate` task runs one attempt; its payload is the job id only.
"""
from __future__ import annotations

import logging
import os
import socket
import uuid

from celery import signals

from common.broker import GENERATE_TASK, get_celery
from common.settings import get_settings
from common.storage import shared_storage
from worker.attempt import AttemptContext, run_attempt, wait_for_finishing
from worker import metrics
from worker.co_batching import CoBatchingPolicy
from worker.drain import Drain, SpotNoticeWatcher
from worker.maintenance import start_maintenance
from worker.pipeline.runner import PipelineRunner
from worker.presence import Presence

log = logging.getLogger(__name__)
app = get_celery()
_ctx: AttemptContext | None = None
_presence: Presence | None = None


def context() -> AttemptContext:
    global _ctx
    if _ctx is None:
        settings = get_settings()
        gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "cpu")
        _ctx = AttemptContext(settings=settings, runner=PipelineRunner(settings), storage=shared_storage(settings.storage),
                              drain=Drain(settings.worker.drain_grace_s),
                              worker_id=f"{socket.gethostname()}:{os.getpid()}:gpu{gpu}",
                              batching=CoBatchingPolicy.from_settings(settings.worker.batching))
    return _ctx


@signals.worker_init.connect
def _warm_up(**_) -> None:
    global _presence
    ctx = context()
    metrics.serve(ctx.settings.worker.metrics_port)  # before the load: a scrape sees a worker warming up
    metrics.DRAINING.set_function(lambda: float(ctx.drain.draining))
    _presence = Presence(ctx, ctx.settings.redis.url, ctx.settings.worker.heartbeat_s)  # `letterpress status`
    _presence.start()
    ctx.runner.load()
    metrics.WARMUP.set(ctx.runner.load_s)
    metrics.watch_gpu()
    metrics.READY.set(1)
    _presence.ready = True
    _presence.beat()
    start_maintenance(ctx.settings)
    if ctx.settings.worker.spot_notice_url:
        SpotNoticeWatcher(ctx.settings.worker.spot_notice_url, ctx.drain, ctx.settings.worker.spot_poll_s).start()


@signals.worker_shutting_down.connect
def _start_drain(sig=None, how=None, **_) -> None:
    context().drain.start(f"{sig} ({how} shutdown)")


@signals.worker_shutdown.connect
def _wait_for_finishing(**_) -> None:
    """The last job's images may still be storing on the finisher thread (worker.attempt): let it complete."""
    if not wait_for_finishing(timeout=120):
        log.warning("the last job was still being stored at shutdown; its lease will expire and it will re-run")
    if _presence is not None:
        _presence.stop()


@app.task(name=GENERATE_TASK)
def generate_job(job_id: str) -> str:
    return run_attempt(uuid.UUID(job_id), context())
