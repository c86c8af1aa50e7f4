"""The job state machine and its SQL: one home for every status transition.

    queued -> running -> succeeded | failed | canceled
    running -> queued            (preempted: free; lease expired / crash: counts as an attempt)
    queued  -> canceled          (at once)      running -> canceled (the worker stops at the next step)

Every write made by a running attempt carries `WHERE lease_token = :mine` (the fencing token). A write that
matches no row raises LeaseLost: another attempt owns the job, and this one must stop without touching
anything. Functions take a session and keyword arguments; the caller commits (at the request or task edge).

Terminal transitions of a job with a webhook_url also write its event (job.succeeded / job.failed /
job.canceled) to the webhook outbox in the same transaction (common/webhooks/outbox.py).
"""
from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import and_, cast, func, or_, select, update
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, joinedload

from common.db import get_owned
from common.errors import Conflict, LeaseLost
from common.models import Job, JobImage, JobStatus
from common.presets import steps_run
from common.webhooks import outbox

S = JobStatus


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def request_hash(params: dict[str, Any], metadata: dict | None, webhook_url: str | None) -> str:
    """Hash of what the caller asked for, to tell an idempotent replay from a conflicting reuse of a key.
    `params["seed"]` is excluded when the server picked it."""
    body = {"params": {k: v for k, v in params.items() if k != "seed" or not params.get("seed_generated")},
            "metadata": metadata, "webhook_url": webhook_url}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def new_job_values(*, params: dict[str, Any], queue: str = "interactive", idempotency_key: str | None = None,
                   metadata: dict | None = None, webhook_url: str | None = None,
                   max_attempts: int = 3) -> dict[str, Any]:
    """The attributes of a job as submitted (all but its tenant and id): the one definition of a new job, for
    create_job here and the API's one-statement insert (api/job_store.py)."""
    return dict(queue=queue, status=S.QUEUED, params=params, request_hash=request_hash(params, metadata, webhook_url),
                idempotency_key=idempotency_key, metadata_=metadata, webhook_url=webhook_url, attempts=0,
                max_attempts=max_attempts, preemptions=0, cancel_requested=False, progress_step=0,
                progress_total=steps_run(params))


def create_job(session: Session, *, tenant_id: uuid.UUID, params: dict[str, Any], queue: str = "interactive",
               idempotency_key: str | None = None, metadata: dict | None = None, webhook_url: str | None = None,
               max_attempts: int = 3) -> tuple[Job, bool]:
    """Insert a queued job. Returns (job, created). The same Idempotency-Key with the same request returns the
    existing job (created=False); with another request it raises Conflict. Concurrent creates with one key make
    one job: the loser of the unique-constraint race answers like a replay."""
    values = new_job_values(params=params, queue=queue, idempotency_key=idempotency_key, metadata=metadata,
                            webhook_url=webhook_url, max_attempts=max_attempts)
    if idempotency_key is not None:
        existing = _replay(session, tenant_id=tenant_id, idempotency_key=idempotency_key,
                           digest=values["request_hash"])
        if existing is not None:
            return existing, False
    job = Job(tenant_id=tenant_id, **values, images=[])  # a new job has no images: no query to find out
    if idempotency_key is None:
        session.add(job)
        session.flush()
        return job, True
    try:
        with session.begin_nested():  # a savepoint: losing the race rolls back the insert only
            session.add(job)
            session.flush()
    except IntegrityError:
        existing = _replay(session, tenant_id=tenant_id, idempotency_key=idempotency_key,
                           digest=values["request_hash"])
        if existing is None:
            raise
        return existing, False
    return job, True


def _replay(session: Session, *, tenant_id: uuid.UUID, idempotency_key: str, digest: str) -> Job | None:
    existing = session.scalar(select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == idempotency_key))
    if existing is not None and existing.request_hash != digest:
        raise Conflict("Idempotency-Key was already used with a different request", field="Idempotency-Key")
    return existing


def get_job(session: Session, job_id: uuid.UUID | str, *, tenant_id: uuid.UUID | None = None) -> Job:
    """A job by id; another tenant's job is NotFound (no existence leak)."""
    return get_owned(session, Job, job_id, tenant_id=tenant_id, noun="job",
                     options=(joinedload(Job.images),))  # one query, not the relationship's second SELECT


def lock_in_id_order(session: Session, *where, skip_locked: bool = False) -> list[uuid.UUID]:
    """Row-lock the matching jobs in id order. Every multi-row writer locks this way first, so two of them (a batch
    cancel and the feeder, say) can never deadlock each other. `skip_locked` passes over rows someone else holds
    (for work that can wait for its next pass)."""
    return list(session.scalars(select(Job.id).where(*where).order_by(Job.id)
                                .with_for_update(skip_locked=skip_locked)))


def mark_enqueued(session: Session, job_ids: list[uuid.UUID]) -> None:
    if len(job_ids) > 1:  # one row needs no ordering: the UPDATE's own row lock is the only lock taken
        lock_in_id_order(session, Job.id.in_(job_ids))
    session.execute(update(Job.__table__).where(Job.id.in_(job_ids)).values(enqueued_at=func.now()))


@dataclass(frozen=True)
class Claim:
    job_id: uuid.UUID
    token: uuid.UUID
    attempt: int
    tenant_id: uuid.UUID
    params: dict[str, Any]
    queue: str = "interactive"
    waited_s: float = 0.0  # from the job's creation to this claim


def claim(session: Session, *, job_id: uuid.UUID, worker_id: str, ttl_s: float) -> Claim | None:
    """Take the job for one attempt if it is queued, or running under an expired lease with attempts left.
    Returns None when someone else holds it or it is finished: a duplicate delivery is a no-op."""
    token = uuid.uuid4()
    row = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.cancel_requested.is_(False), Job.attempts < Job.max_attempts,
               or_(Job.status == S.QUEUED, and_(Job.status == S.RUNNING, Job.lease_expires_at < func.now())))
        .values(status=S.RUNNING, lease_token=token, lease_expires_at=func.now() + timedelta(seconds=ttl_s),
                attempts=Job.attempts + 1, worker_id=worker_id, progress_step=0,
                started_at=func.coalesce(Job.started_at, func.now()))
        .returning(Job.attempts, Job.tenant_id, Job.params, Job.queue,
                   func.extract("epoch", func.now() - Job.created_at).label("waited_s"))
    ).one_or_none()
    if row is None:
        return None
    return Claim(job_id=job_id, token=token, attempt=row.attempts, tenant_id=row.tenant_id, params=row.params,
                 queue=row.queue, waited_s=float(row.waited_s))


def queued_candidates(session: Session, *, queue: str, exclude: uuid.UUID, limit: int) -> list[tuple[uuid.UUID, dict]]:
    """The oldest claimable queued jobs of `queue` already handed to the broker: what a worker may take along
    into a batch (worker.co_batching). Their own deliveries later find them claimed, a no-op. Reads at most `limit`
    rows off the (status, queue, created_at) index, so a deep queue costs nothing."""
    rows = session.execute(
        select(Job.id, Job.params)
        .where(Job.status == S.QUEUED, Job.queue == queue, Job.enqueued_at.is_not(None),
               Job.cancel_requested.is_(False), Job.attempts < Job.max_attempts, Job.id != exclude)
        .order_by(Job.created_at)
        .limit(limit)
    ).all()
    return [(r.id, r.params) for r in rows]


def _fenced(job_id: uuid.UUID, token: uuid.UUID):
    return update(Job).where(Job.id == job_id, Job.lease_token == token, Job.status == S.RUNNING)


def heartbeat(session: Session, *, job_id: uuid.UUID, token: uuid.UUID, ttl_s: float,
              progress_step: int | None = None, progress_total: int | None = None) -> bool:
    """Renew the lease (and record progress). Returns whether cancellation was requested.
    Raises LeaseLost when the token no longer owns the job."""
    values: dict[str, Any] = {"lease_expires_at": func.now() + timedelta(seconds=ttl_s)}
    if progress_step is not None:
        values["progress_step"] = progress_step
    if progress_total is not None:
        values["progress_total"] = progress_total
    row = session.execute(_fenced(job_id, token).values(**values).returning(Job.cancel_requested)).one_or_none()
    if row is None:
        raise LeaseLost(f"job {job_id}: lease lost")
    return bool(row.cancel_requested)


def patch_params(session: Session, *, job_id: uuid.UUID, token: uuid.UUID, patch: dict[str, Any]) -> None:
    """Merge `patch` into the running job's params (what the worker decided for it before generating, e.g. its
    magic prompt's caption), fenced by the lease. Raises LeaseLost when the token no longer owns the job."""
    row = session.execute(_fenced(job_id, token).values(params=Job.params.op("||")(
        cast(patch, JSONB))).returning(Job.id)).one_or_none()
    if row is None:
        raise LeaseLost(f"job {job_id}: lease lost")


_MAGIC_PENDING = (Job.status == S.QUEUED, func.jsonb_typeof(Job.params["magic_prompt"]) == "string")


def waiting_magic_prompts(session: Session, *, limit: int,
                          exclude: list[uuid.UUID]) -> list[tuple[uuid.UUID, uuid.UUID, dict]]:
    """Queued jobs whose magic prompt is not answered yet, oldest first (ix_jobs_magic_pending): (id, tenant,
    params)."""
    query = select(Job.id, Job.tenant_id, Job.params).where(*_MAGIC_PENDING)
    if exclude:
        query = query.where(Job.id.not_in(exclude))
    return [(r.id, r.tenant_id, r.params) for r in session.execute(query.order_by(Job.created_at).limit(limit))]


def answer_waiting_magic_prompt(session: Session, *, job_id: uuid.UUID, patch: dict[str, Any]) -> bool:
    """Store a queued job's magic prompt answer ahead of its run (see patch_params), only while it is still queued
    and unanswered: a job claimed meanwhile answers its own. Returns whether it was stored."""
    return session.execute(update(Job).where(Job.id == job_id, *_MAGIC_PENDING).values(
        params=Job.params.op("||")(cast(patch, JSONB)))).rowcount == 1


@dataclass(frozen=True)
class StoredImage:
    index: int
    seed: int
    key: str
    sha256: str
    width: int
    height: int
    size_bytes: int


def complete(session: Session, *, job_id: uuid.UUID, token: uuid.UUID, images: list[StoredImage],
             timings: dict[str, float] | None = None) -> None:
    """running -> succeeded, with its images, in one transaction. Only after the images are stored."""
    row = session.execute(
        _fenced(job_id, token)
        .values(status=S.SUCCEEDED, finished_at=func.now(), lease_token=None, lease_expires_at=None,
                progress_step=Job.progress_total, error=None, timings=timings)
        .returning(Job.id, Job.webhook_url)
    ).one_or_none()
    if row is None:
        raise LeaseLost(f"job {job_id}: lease lost before completion")
    session.query(JobImage).filter(JobImage.job_id == job_id).delete()
    session.add_all(JobImage(job_id=job_id, **vars(img)) for img in images)
    if row.webhook_url:
        outbox.record_job_event(session, job_id=job_id, type="job.succeeded")


def fail(session: Session, *, job_id: uuid.UUID, token: uuid.UUID, error: dict[str, Any], retryable: bool) -> str:
    """End an attempt with an error. A retryable error returns the job to `queued` while attempts remain;
    otherwise, or when they are exhausted, it ends `failed`. Returns the new status."""
    job = session.execute(select(Job.attempts, Job.max_attempts, Job.webhook_url).where(
        Job.id == job_id, Job.lease_token == token, Job.status == S.RUNNING)).one_or_none()
    if job is None:
        raise LeaseLost(f"job {job_id}: lease lost before recording failure")
    if retryable and job.attempts < job.max_attempts:
        # back in line from step 0 and not yet sent (the caller dispatches it; if that send fails, maintenance
        # sees `enqueued_at IS NULL` at its next pass)
        status, values = S.QUEUED, {"error": error, "progress_step": 0, "enqueued_at": None}
    else:
        if retryable:
            error = {"type": "attempts_exhausted", "message": f"gave up after {job.attempts} attempts",
                     "last_error": error}
        status, values = S.FAILED, {"error": error, "finished_at": func.now()}
    session.execute(_fenced(job_id, token).values(status=status, lease_token=None, lease_expires_at=None, **values))
    if status == S.FAILED and job.webhook_url:
        outbox.record_job_event(session, job_id=job_id, type="job.failed")
    return status


def release_preempted(session: Session, *, job_id: uuid.UUID, token: uuid.UUID) -> None:
    """running -> queued after a spot notice or SIGTERM: the attempt is given back (preemptions are free)."""
    row = session.execute(
        _fenced(job_id, token)
        .values(status=S.QUEUED, lease_token=None, lease_expires_at=None, attempts=Job.attempts - 1,
                preemptions=Job.preemptions + 1, progress_step=0, enqueued_at=None)
        .returning(Job.id)
    ).one_or_none()
    if row is None:
        raise LeaseLost(f"job {job_id}: lease lost before release")


def finish_canceled(session: Session, *, job_id: uuid.UUID, token: uuid.UUID) -> None:
    """running -> canceled once the worker has stopped generating for a cancel request."""
    row = session.execute(_fenced(job_id, token).values(status=S.CANCELED, finished_at=func.now(), lease_token=None,
                                                        lease_expires_at=None)
                          .returning(Job.webhook_url)).one_or_none()
    if row is not None and row.webhook_url:
        outbox.record_job_event(session, job_id=job_id, type="job.canceled")


def cancel(session: Session, *, job: Job) -> Job:
    """queued -> canceled at once; running -> cancel requested (the worker stops at the next step boundary);
    finished -> Conflict."""
    if job.status in S.TERMINAL:
        raise Conflict(f"job {job.id} is already {job.status}", field="status")
    result = session.execute(update(Job).where(Job.id == job.id, Job.status == S.QUEUED)
                             .values(status=S.CANCELED, finished_at=func.now(), cancel_requested=True))
    if result.rowcount == 0:  # running (or just claimed): the attempt sees the flag at its next heartbeat
        session.execute(update(Job).where(Job.id == job.id, Job.status == S.RUNNING).values(cancel_requested=True))
    elif job.webhook_url:
        outbox.record_job_event(session, job_id=job.id, type="job.canceled")
    session.refresh(job)
    return job


def recover_expired_leases(session: Session) -> tuple[list[tuple[uuid.UUID, str]], list[uuid.UUID]]:
    """Maintenance: running jobs whose lease expired (worker gone) go back to `queued` when attempts remain,
    or end `failed` (attempts_exhausted). Returns ([(requeued id, queue)], [dead-lettered ids])."""
    # Rows another session holds are left for the next pass: the holder may be a worker frozen mid-heartbeat,
    # which would otherwise stall every recovery until it wakes (or Postgres ends its idle transaction).
    expired = lock_in_id_order(session, Job.status == S.RUNNING, Job.lease_expires_at < func.now(),
                               skip_locked=True)
    if not expired:
        return [], []
    mine = Job.id.in_(expired)
    requeued = session.execute(
        update(Job)
        .where(mine, Job.attempts < Job.max_attempts, Job.cancel_requested.is_(False))
        .values(status=S.QUEUED, lease_token=None, lease_expires_at=None, enqueued_at=None,
                error={"type": "lease_expired", "message": "the worker stopped renewing its lease"})
        .returning(Job.id, Job.queue)
    ).all()
    canceled = session.execute(
        update(Job)
        .where(mine, Job.status == S.RUNNING, Job.cancel_requested.is_(True))
        .values(status=S.CANCELED, lease_token=None, lease_expires_at=None, finished_at=func.now())
        .returning(Job.id, Job.webhook_url)
    ).all()
    dead = session.execute(
        update(Job)
        .where(mine, Job.status == S.RUNNING, Job.attempts >= Job.max_attempts)
        .values(status=S.FAILED, lease_token=None, lease_expires_at=None, finished_at=func.now(),
                error=func.jsonb_build_object("type", "attempts_exhausted", "message",
                                              "the job's worker was lost on every attempt",
                                              "last_error", func.coalesce(Job.error, func.jsonb_build_object())))
        .returning(Job.id, Job.webhook_url)
    ).all()
    for rows, event_type in ((dead, "job.failed"), (canceled, "job.canceled")):
        for r in rows:
            if r.webhook_url:
                outbox.record_job_event(session, job_id=r.id, type=event_type)
    return [(r.id, r.queue) for r in requeued], [r.id for r in dead] + [r.id for r in canceled]


def lost_enqueues(session: Session, *, queue: str, stale_after_s: float | None,
                  limit: int = 1000) -> list[uuid.UUID]:
    """Queued jobs of `queue` whose message may be lost: never enqueued (Redis was down at submit), and, when
    `stale_after_s` is given (the caller saw the broker queue empty), enqueued longer ago than that (Redis
    restarted or flushed). Re-enqueueing is safe: a duplicate delivery is a no-op at claim."""
    lost = Job.enqueued_at.is_(None)
    if stale_after_s is not None:
        lost = or_(lost, Job.enqueued_at < func.now() - timedelta(seconds=stale_after_s))
    # Items of a batch are never enqueued here: a batch's unfed items have enqueued_at NULL by design, and
    # worker/feeder.py alone hands them to the broker, a bounded number at a time (it also re-feeds stale ones).
    return list(session.scalars(
        select(Job.id).where(Job.status == S.QUEUED, Job.queue == queue, Job.batch_id.is_(None), lost)
        .order_by(Job.created_at).limit(limit)
    ))


def cancel_queued_where(session: Session, *where) -> int:
    """Bulk `queued -> canceled` at once for the jobs matching `where` (a batch cancel). Running jobs are left to
    finish. Returns how many were canceled."""
    lock_in_id_order(session, Job.status == S.QUEUED, *where)
    with_webhook = list(session.scalars(select(Job.id).where(Job.status == S.QUEUED, Job.webhook_url.is_not(None),
                                                             *where)))
    n = session.execute(update(Job).where(Job.status == S.QUEUED, *where)
                        .values(status=S.CANCELED, finished_at=func.now(), cancel_requested=True)
                        .execution_options(synchronize_session=False)).rowcount
    for job_id in with_webhook:
        outbox.record_job_event(session, job_id=job_id, type="job.canceled")
    return n


def requeue_finished_where(session: Session, *where, statuses: tuple[str, ...] = (S.FAILED, S.CANCELED)) -> int:
    """Bulk `failed | canceled -> queued` for a re-run (batch resume or retry): a fresh attempt budget, no error,
    not yet enqueued (the batch feeder hands them to the broker). Succeeded jobs are never re-run. Returns how
    many went back to the queue."""
    assert set(statuses) <= {S.FAILED, S.CANCELED}, "only failed or canceled jobs can be re-run"
    lock_in_id_order(session, Job.status.in_(statuses), *where)
    return session.execute(update(Job).where(Job.status.in_(statuses), *where)
                           .values(status=S.QUEUED, attempts=0, error=None, cancel_requested=False,
                                   finished_at=None, started_at=None, enqueued_at=None, progress_step=0,
                                   lease_token=None, lease_expires_at=None, worker_id=None)
                           .execution_options(synchronize_session=False)).rowcount
