"""One attempt at one job: claim, generate with a heartbeat, store the PNGs, record the result.

Every database write after the claim is fenced by the attempt's lease token (common.jobs). Images are written
to storage before the job is marked succeeded, at deterministic keys, so a re-run overwrites the same bytes.

The GPU never waits for the finishing work: once a job's images exist, PNG encoding, the storage writes and the
completing write run on a finisher thread while the task returns and the next job starts generating (at most one
job finishes at a time; the next hand-off waits for it). The heartbeat keeps the lease until the job is complete.
Returning early means Celery acks the message (acks_late) before the images are stored; that is safe because
Postgres, not the message, is the record: if the process dies while finishing, the job is still `running` under
a lease nobody renews, and maintenance requeues it once the lease expires (counting the attempt, as for any
crash), the re-run writing the same bytes to the same keys. A worker that shuts down waits for the finisher
(`wait_for_finishing`, from the Celery shutdown hook).
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.exc import SQLAlchemyError

from common import jobs as job_states
from common.db import session_scope
from common.errors import LeaseLost, StorageError
from common.job_request import image_seeds
from common.png import encode_png, recipe, sha256_hex
from common.queue import enqueue_generate
from common.settings import Settings
from common.storage import Storage, image_key
from worker.drain import Drain
from worker.monitor import AttemptMonitor

log = logging.getLogger(__name__)


@dataclass
class AttemptContext:
    settings: Settings
    runner: object  # worker.runner.PipelineRunner (duck-typed so tests can pass another runner)
    storage: Storage
    drain: Drain
    worker_id: str
    overlap_finish: bool = True  # store and complete on the finisher thread while the next job generates


def spec_from_params(params: dict):
    from worker.generation import GenerationSpec

    return GenerationSpec(prompt_text=params["prompt_text"], width=params["width"], height=params["height"],
                          steps=params["steps"], mu=params["mu"], std=params["std"],
                          guidance_schedule=tuple(params["guidance_schedule"]), seeds=tuple(image_seeds(params)))


def requeue(job_id: uuid.UUID, queue: str) -> None:
    """Hand a job that went back to `queued` to the broker now; if that fails, maintenance will."""
    try:
        enqueue_generate(job_id, queue)
        with session_scope() as session:
            job_states.mark_enqueued(session, [job_id])
    except Exception as exc:  # noqa: BLE001
        log.warning("job %s: re-enqueue failed (%s); maintenance will retry", job_id, exc)


def run_attempt(job_id: uuid.UUID, ctx: AttemptContext) -> str:
    """Returns what happened: skipped | succeeded | failed | queued | canceled | lease_lost."""
    wcfg = ctx.settings.worker
    with session_scope() as session:
        claim = job_states.claim(session, job_id=job_id, worker_id=ctx.worker_id, ttl_s=wcfg.lease_ttl_s)
    if claim is None:
        log.info("job %s: not claimable (finished, canceled or leased elsewhere): duplicate delivery ignored", job_id)
        return "skipped"
    monitor = AttemptMonitor(job_id=job_id, token=claim.token, ttl_s=wcfg.lease_ttl_s,
                             heartbeat_s=wcfg.heartbeat_s, progress_interval_s=wcfg.progress_min_interval_s)
    monitor.start()
    t0 = time.perf_counter()
    outcome = "failed"
    try:
        outcome = _generate_and_record(claim, ctx, monitor, t0)
        return outcome
    finally:
        if outcome != "finishing":  # the finisher stops the heartbeat once the job is complete
            monitor.stop()


def _generate_and_record(claim: job_states.Claim, ctx: AttemptContext, monitor: AttemptMonitor, t0: float) -> str:
    from worker.generation import GenerationInterrupted

    params = claim.params

    def should_stop() -> bool:
        return monitor.lease_lost.is_set() or monitor.cancel_requested.is_set() or ctx.drain.expired()

    try:
        images = ctx.runner.run(spec_from_params(params), on_step=monitor.report, should_stop=should_stop)
        t_gen = time.perf_counter()
    except LeaseLost:
        log.warning("job %s: lease lost; another attempt owns it, nothing recorded", claim.job_id)
        return "lease_lost"
    except GenerationInterrupted:
        return _after_interrupt(claim, ctx, monitor)
    except (StorageError, SQLAlchemyError) as exc:
        return _record_failure(claim, ctx, exc, retryable=True)
    except Exception as exc:  # noqa: BLE001 - the generation itself raised: fail the job, keep serving
        log.exception("job %s: generation failed", claim.job_id)
        return _record_failure(claim, ctx, exc, retryable=False)

    def finish() -> str:
        try:
            outcome = _finish(claim, ctx, monitor, images, t0, t_gen)
        finally:
            monitor.stop()
        # Celery logged this task as returning 'finishing'; this line says how the attempt really ended.
        log.info("job %s finished: %r", claim.job_id, outcome)
        return outcome

    if ctx.overlap_finish:
        FINISHER.submit(finish, name=f"finish-{claim.job_id}")
        return "finishing"
    return _finish(claim, ctx, monitor, images, t0, t_gen)


def _finish(claim: job_states.Claim, ctx: AttemptContext, monitor: AttemptMonitor, images: list, t0: float,
            t_gen: float) -> str:
    """Encode and store the images, then mark the job succeeded (fenced); failures are recorded like the
    generation's own."""
    params = claim.params
    try:
        stored = [_store(claim, ctx, index, seed, image)
                  for index, (seed, image) in enumerate(zip(image_seeds(params), images))]
        monitor.stop()
        timings = {"generate_s": round(t_gen - t0, 3), "store_s": round(time.perf_counter() - t_gen, 3),
                   "worker": ctx.worker_id, "attempt": claim.attempt}
        with session_scope() as session:
            job_states.complete(session, job_id=claim.job_id, token=claim.token, images=stored, timings=timings)
        return "succeeded"
    except LeaseLost:
        log.warning("job %s: lease lost; another attempt owns it, nothing recorded", claim.job_id)
        return "lease_lost"
    except (StorageError, SQLAlchemyError) as exc:
        # infrastructure trouble: the attempt counts, the job goes back to the queue while attempts remain
        return _record_failure(claim, ctx, exc, retryable=True)
    except Exception as exc:  # noqa: BLE001 - encoding failed: fail the job, keep serving
        log.exception("job %s: storing the images failed", claim.job_id)
        return _record_failure(claim, ctx, exc, retryable=False)


class Finisher:
    """One background finishing job at a time; `submit` first waits for the previous one (bounded memory)."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, fn: Callable[[], object], *, name: str) -> None:
        with self._lock:
            self.wait()

            def run() -> None:
                try:
                    fn()
                except Exception:  # noqa: BLE001 - _finish records its own failures; this is the last resort
                    log.exception("%s: finishing failed", name)

            # Not a daemon: an interpreter exiting normally still waits for the job to be stored and completed.
            self._thread = threading.Thread(target=run, name=name, daemon=False)
            self._thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job being finished (if any) is stored and recorded; False on timeout."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            return not thread.is_alive()
        return True


FINISHER = Finisher()


def wait_for_finishing(timeout: float | None = None) -> bool:
    return FINISHER.wait(timeout)


def _store(claim: job_states.Claim, ctx: AttemptContext, index: int, seed: int, image) -> job_states.StoredImage:
    params = claim.params
    data = encode_png(image, recipe(params, seed=seed, model_id=ctx.runner.model_id, revision=ctx.runner.revision))
    key = image_key(ctx.storage.prefix, claim.tenant_id, claim.job_id, index)
    ctx.storage.put(key, data)
    return job_states.StoredImage(index=index, seed=seed, key=key, sha256=sha256_hex(data), width=image.width,
                                  height=image.height, size_bytes=len(data))


def _after_interrupt(claim: job_states.Claim, ctx: AttemptContext, monitor: AttemptMonitor) -> str:
    if monitor.lease_lost.is_set():
        return "lease_lost"
    with session_scope() as session:
        if monitor.cancel_requested.is_set():
            job_states.finish_canceled(session, job_id=claim.job_id, token=claim.token)
            return "canceled"
        job_states.release_preempted(session, job_id=claim.job_id, token=claim.token)
        queue = job_states.get_job(session, claim.job_id).queue
    log.warning("job %s: interrupted by drain, returned to the queue", claim.job_id)
    requeue(claim.job_id, queue)
    return "queued"


def _record_failure(claim: job_states.Claim, ctx: AttemptContext, exc: Exception, *, retryable: bool) -> str:
    error = {"type": "generation_error" if not retryable else "infrastructure_error",
             "message": str(exc)[:2000], "exception": exc.__class__.__name__}
    try:
        with session_scope() as session:
            status = job_states.fail(session, job_id=claim.job_id, token=claim.token, error=error,
                                     retryable=retryable)
            queue = job_states.get_job(session, claim.job_id).queue
    except LeaseLost:
        return "lease_lost"
    if status == "queued":
        requeue(claim.job_id, queue)
    return status
