"""The webhook outbox: events written in the transaction of the state change they report, and the SQL of their
delivery (claim an attempt, record it, schedule the next, disable an endpoint, redeliver, find due events).

    record_event(session, ...)      in the caller's transaction (common/job_states.py, common/batches.py)
       └─ after COMMIT: the event id is sent to the `webhooks` queue (an `after_commit` hook, so every caller,
          the GPU worker included, only pays for one Redis send; nothing is sent when the transaction rolls back)
    worker/webhook_delivery.py (`webhooks.deliver`, a separate worker process):
       claim_attempt -> sign + POST (common.webhooks.client.deliver) -> record_attempt (log row + next state)
    enqueue_due(settings)           the due-events pass (maintenance + the webhooks worker): pending events whose
                                    time came, and sends the broker lost

Event statuses: pending -> delivered | failed (schedule exhausted, or the SSRF guard refused the target) |
disabled (the endpoint answered 410 Gone, or had already). A redelivery is one extra attempt with the same
`webhook-id`, in any status; a success makes the event `delivered`.

Why long retries wait in Postgres and not in Redis: a Celery countdown/ETA task sits in the worker's memory
(prefetched, unacked) until it is due, and with the Redis transport is re-delivered once its visibility timeout
passes; a receiver outage with thousands of events would park them all in one process for hours. So a retry
shorter than one maintenance period is sent with a countdown (exact timing for the 5 s step), and a longer one
only sets `next_attempt_at`: the due-events pass, run every maintenance period, sends it when it is due (at
most one period late on a delay of minutes to hours).
"""
from __future__ import annotations

import json
import logging
import secrets as _secrets
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from pydantic_core import to_jsonable_python
from sqlalchemy import Text, and_, delete, exists, func, or_, select, type_coerce, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from common import secrets_at_rest
from common.batch_counts import request_counts
from common.broker import WEBHOOK_QUEUE, enqueue_webhook, queue_empty
from common.db import after_commit, session_scope
from common.models import (
    Batch,
    Job,
    WebhookDelivery,
    WebhookDisabledEndpoint,
    WebhookEvent,
    WebhookEventStatus,
    WebhookSecret,
)
from common.representation import batch_representation, job_representation
from common.settings import Settings, WebhookSettings, get_settings
from common.usage import batch_usage
from common.storage import shared_storage
from common.webhooks.client import DeliveryResult
from common.webhooks.schedule import Outcome, classify, next_attempt_delay
from common.webhooks.signing import generate_secret

log = logging.getLogger(__name__)
E = WebhookEventStatus

JOB_EVENTS = ("job.succeeded", "job.failed", "job.canceled")
BATCH_EVENTS = ("batch.completed", "batch.failed", "batch.cancelled")
EVENT_TYPES = JOB_EVENTS + BATCH_EVENTS
DEFAULT_ROTATION_WINDOW_S = 24 * 3600
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


# ------------------------------------------------------------------------------------------------ helpers

def new_event_id() -> str:
    """`msg_` + a ULID (48-bit milliseconds + 80 random bits, Crockford base32): unique, sortable by time."""
    value = (int(time.time() * 1000) << 80) | _secrets.randbits(80)
    return "msg_" + "".join(_CROCKFORD[(value >> (5 * i)) & 31] for i in reversed(range(26)))


def to_json(value: Any) -> Any:
    """Plain JSON values, serialized as the API serializes responses (pydantic: datetimes as ISO 8601 `...Z`)."""
    return to_jsonable_python(value)


def body_of(event_type: str, created_at: datetime, payload: dict[str, Any]) -> bytes:
    """The request body: `{"type", "timestamp", "data"}` with `data` the object as GET returns it. Built from the
    stored row, so every attempt and redelivery of an event sends the same bytes."""
    return json.dumps({"type": event_type, "timestamp": to_json(created_at), "data": payload},
                      separators=(",", ":"), ensure_ascii=False).encode()


def job_payload(job: Job) -> dict[str, Any]:
    """The job as `GET /v1/jobs/{id}` returns it (common.representation). URLs are built from the API's public
    URL (LETTERPRESS_API_URL); image URLs are presigned now (or the API's image route for local storage)."""
    settings = get_settings()
    storage = shared_storage(settings.storage)
    self_url = f"{settings.public_api_url}/v1/jobs/{job.id}"
    return to_json(job_representation(
        job, self_url=self_url, queue_position=None, eta_s=None,
        image_url=lambda i: storage.presigned_url(i.key) or f"{self_url}/images/{i.index}"))


def _countdown_limit_s() -> float:
    """Retries due sooner than this go with a Celery countdown; later ones wait for the due-events pass."""
    return float(get_settings().worker.maintenance_period_s)


class _SendsAfterCommit:
    """The event ids a transaction hands to the broker once it commits (common.db.after_commit): one Redis send
    each, nothing when it rolls back."""

    def __init__(self) -> None:
        self.pending: list[tuple[str, float]] = []

    def __call__(self) -> None:
        send_now(self.pending)


def _send_after_commit(session: Session, event_id: str, countdown: float = 0.0) -> None:
    after_commit(session, "webhook-sends", _SendsAfterCommit).pending.append((event_id, countdown))


# ---------------------------------------------------------------------------------------------- recording

def record_event(session: Session, *, tenant_id: uuid.UUID, type: str, payload: dict[str, Any],
                 job_id: uuid.UUID | None = None, batch_id: uuid.UUID | None = None,
                 webhook_url: str | None = None) -> WebhookEvent | None:
    """Write one event in the caller's transaction; its id goes to the delivery queue once that commits.
    Nothing is recorded without a `webhook_url`. An endpoint the tenant's receiver disabled (410) gets the event
    recorded as `disabled` and not sent. Returns the event (None without a URL)."""
    if not webhook_url:
        return None
    if type not in EVENT_TYPES:
        raise ValueError(f"unknown webhook event type {type!r}")
    cfg = get_settings().webhooks
    disabled = session.get(WebhookDisabledEndpoint, (tenant_id, webhook_url))
    event = WebhookEvent(id=new_event_id(), tenant_id=tenant_id, type=type, payload=to_json(payload), job_id=job_id,
                         batch_id=batch_id, url=webhook_url, attempts=0, scheduled_attempts=0)
    if disabled is not None:
        event.status, event.last_error = E.DISABLED, f"endpoint disabled: {disabled.reason}"
    else:
        delay = next_attempt_delay(1, cfg.retry_schedule_s or [0], cfg.jitter) or 0.0
        event.status = E.PENDING
        event.next_attempt_at = func.now() + timedelta(seconds=delay)
        if delay < _countdown_limit_s():
            event.enqueued_at = func.now()
            _send_after_commit(session, event.id, delay)
    session.add(event)
    session.flush()
    return event


def record_job_event(session: Session, *, job_id: uuid.UUID, type: str) -> WebhookEvent | None:
    """The job's event, when it has a webhook_url: called by common/job_states.py after a terminal transition, in
    its transaction. The payload is the job as it is after the transition."""
    session.flush()
    job = session.get(Job, job_id, populate_existing=True)
    if job is None or not job.webhook_url:
        return None
    return record_event(session, tenant_id=job.tenant_id, type=type, payload=job_payload(job), job_id=job.id,
                        batch_id=job.batch_id, webhook_url=job.webhook_url)


BATCH_EVENT_OF_STATUS = {"completed": "batch.completed", "failed": "batch.failed", "cancelled": "batch.cancelled"}


def record_batch_event(session: Session, *, batch_id: uuid.UUID, status: str) -> WebhookEvent | None:
    """The batch's event for its final `status` (completed | failed | cancelled), when it has a webhook_url:
    called by common/batches.py (finish_finalizing) in the transaction that sets that status."""
    session.flush()
    batch = session.get(Batch, batch_id, populate_existing=True)
    if batch is None or not batch.webhook_url:
        return None
    settings = get_settings()
    payload = batch_representation(batch, request_counts(session, [batch.id])[batch.id],
                                   batch_usage(session, [batch.id], settings.pricing)[batch.id],
                                   self_url=f"{settings.public_api_url}/v1/batches/{batch.id}")
    return record_event(session, tenant_id=batch.tenant_id, type=BATCH_EVENT_OF_STATUS[status],
                        payload=to_json(payload), batch_id=batch.id, webhook_url=batch.webhook_url)


def send_now(pending: list[tuple[str, float]]) -> int:
    """Hand event ids to the broker. When Redis is down, the rest are marked not enqueued so the due-events
    pass sends them later (and if Postgres is down too, that pass still finds them once the broker is back
    and its queue is empty). Never raises. Returns how many were sent."""
    for n, (event_id, countdown) in enumerate(pending):
        try:
            enqueue_webhook(event_id, countdown=countdown)
        except Exception as exc:  # noqa: BLE001 - any broker failure: Postgres still holds the event
            log.warning("webhook event %s: enqueue failed (%s); the due-events pass will send it", event_id, exc)
            _mark_not_enqueued([eid for eid, _ in pending[n:]])
            return n
    return len(pending)


def _mark_not_enqueued(event_ids: list[str]) -> None:
    try:
        with session_scope() as session:
            session.execute(update(WebhookEvent).where(WebhookEvent.id.in_(event_ids))
                            .values(enqueued_at=None).execution_options(synchronize_session=False))
    except Exception as exc:  # noqa: BLE001
        log.warning("could not mark %d webhook events as not enqueued: %s", len(event_ids), exc)


# ------------------------------------------------------------------------------------------------ secrets

def get_secret(session: Session, *, tenant_id: uuid.UUID, for_update: bool = False) -> WebhookSecret:
    """The tenant's signing secret, created on first use (race-safe: ON CONFLICT DO NOTHING)."""
    row = session.get(WebhookSecret, tenant_id, with_for_update=for_update or None)
    if row is None:
        session.execute(insert(WebhookSecret).values(tenant_id=tenant_id, secret=generate_secret())
                        .on_conflict_do_nothing(index_elements=["tenant_id"]))
        row = session.get(WebhookSecret, tenant_id, populate_existing=True, with_for_update=for_update or None)
    return row


def _previous_active(row: WebhookSecret, now: datetime | None = None) -> bool:
    return bool(row.previous_secret and row.previous_expires_at
                and row.previous_expires_at > (now or datetime.now(timezone.utc)))


def signing_secrets(session: Session, *, tenant_id: uuid.UUID) -> list[str]:
    """The secrets to sign with: the current one, and the previous one during its rotation window."""
    row = get_secret(session, tenant_id=tenant_id)
    return [row.secret, row.previous_secret] if _previous_active(row) else [row.secret]


def rotate_secret(session: Session, *, tenant_id: uuid.UUID,
                  previous_valid_for_s: float = DEFAULT_ROTATION_WINDOW_S) -> WebhookSecret:
    """A new current secret; the old one keeps signing (a second signature) for `previous_valid_for_s`."""
    row = get_secret(session, tenant_id=tenant_id, for_update=True)
    now = datetime.now(timezone.utc)
    if previous_valid_for_s > 0:
        row.previous_secret, row.previous_expires_at = row.secret, now + timedelta(seconds=previous_valid_for_s)
    else:
        row.previous_secret, row.previous_expires_at = None, None
    row.secret, row.rotated_at = generate_secret(), now
    session.flush()
    return row


def reencrypt_secrets(session: Session) -> int:
    """Rewrite every stored signing secret not yet under the current LETTERPRESS_SECRET_KEY (or still plaintext)
    under it; the caller commits. Returns how many rows were rewritten (common/secrets_at_rest.py)."""
    stored = session.execute(select(WebhookSecret.tenant_id, type_coerce(WebhookSecret.secret, Text),
                                    type_coerce(WebhookSecret.previous_secret, Text))).all()
    stale = [tenant_id for tenant_id, secret, previous in stored
             if not secrets_at_rest.is_current(secret) or (previous is not None
                                                          and not secrets_at_rest.is_current(previous))]
    for tenant_id in stale:
        row = session.get(WebhookSecret, tenant_id, with_for_update=True, populate_existing=True)
        session.execute(update(WebhookSecret).where(WebhookSecret.tenant_id == tenant_id)
                        .values(secret=row.secret, previous_secret=row.previous_secret))
    return len(stale)


def secret_info(row: WebhookSecret) -> dict[str, Any]:
    return {"object": "webhook_secret", "secret": row.secret, "created_at": row.created_at,
            "rotated_at": row.rotated_at,
            "previous_secret_expires_at": row.previous_expires_at if _previous_active(row) else None}


# ---------------------------------------------------------------------------------------------- attempts

@dataclass(frozen=True)
class Attempt:
    """One claimed HTTP attempt of an event."""
    event_id: str
    tenant_id: uuid.UUID
    url: str
    body: bytes
    trigger: str  # "scheduled" (the retry schedule) | "redeliver" (asked for through the API)
    attempt: int  # the event's attempt number, all triggers counted (numbers the delivery log)
    scheduled_attempt: int  # the position in the retry schedule (fences the scheduled attempt's outcome)


_ATTEMPT_COLS = (WebhookEvent.id, WebhookEvent.tenant_id, WebhookEvent.url, WebhookEvent.type,
                 WebhookEvent.created_at, WebhookEvent.payload, WebhookEvent.attempts,
                 WebhookEvent.scheduled_attempts)


def _attempt(row, trigger: str) -> Attempt:
    return Attempt(event_id=row.id, tenant_id=row.tenant_id, url=row.url, trigger=trigger,
                   body=body_of(row.type, row.created_at, row.payload), attempt=row.attempts,
                   scheduled_attempt=row.scheduled_attempts)


def claim_attempt(session: Session, *, event_id: str, lease_s: float) -> Attempt | None:
    """Take the event's next attempt: a requested redelivery first, else the scheduled attempt when it is due
    and no other attempt holds it (`locked_until`: the lease of an attempt in flight; a delivery worker that
    dies mid-attempt loses it after `lease_s` and the event is tried again). None when there is nothing to do:
    a duplicate message, an event already delivered, not yet due, or in flight elsewhere."""
    W = WebhookEvent
    row = session.execute(
        update(W).where(W.id == event_id, W.redeliver_requested_at.is_not(None))
        .values(redeliver_requested_at=None, attempts=W.attempts + 1)
        .returning(*_ATTEMPT_COLS)).one_or_none()
    if row is not None:
        return _attempt(row, "redeliver")
    endpoint_disabled = exists().where(WebhookDisabledEndpoint.tenant_id == W.tenant_id,
                                       WebhookDisabledEndpoint.url == W.url)
    due = and_(W.id == event_id, W.status == E.PENDING, W.next_attempt_at <= func.now(),
               or_(W.locked_until.is_(None), W.locked_until < func.now()))
    row = session.execute(
        update(W).where(due, ~endpoint_disabled)
        .values(attempts=W.attempts + 1, scheduled_attempts=W.scheduled_attempts + 1, enqueued_at=None,
                locked_until=func.now() + timedelta(seconds=lease_s))
        .returning(*_ATTEMPT_COLS)).one_or_none()
    if row is None:
        # disabled by another event's 410 after this one was recorded: not sent
        session.execute(update(W).where(due, endpoint_disabled).values(
            status=E.DISABLED, next_attempt_at=None, enqueued_at=None, last_error="endpoint disabled")
            .execution_options(synchronize_session=False))
        return None
    return _attempt(row, "scheduled")


def not_yet_due_s(session: Session, *, event_id: str) -> float | None:
    """Seconds until a pending, unclaimed event is due (a countdown message that arrived early, e.g. clock
    skew between hosts); None otherwise."""
    W = WebhookEvent
    wait = session.scalar(select(func.extract("epoch", W.next_attempt_at - func.now())).where(
        W.id == event_id, W.status == E.PENDING, W.next_attempt_at > func.now(),
        or_(W.locked_until.is_(None), W.locked_until < func.now())))
    return float(wait) if wait is not None else None


def record_attempt(session: Session, *, attempt: Attempt, result: DeliveryResult,
                   settings: WebhookSettings) -> Outcome:
    """Log the attempt and move the event on: delivered on 2xx; endpoint disabled on 410; failed when the guard
    refused the target or the schedule ran out; otherwise the next attempt is scheduled (`Retry-After` can
    only push it later). A scheduled attempt's outcome is fenced by its schedule position, so a stale attempt
    (its lease expired and another took over) only adds its log row."""
    W = WebhookEvent
    outcome = classify(result)
    session.add(WebhookDelivery(event_id=attempt.event_id, tenant_id=attempt.tenant_id, attempt=attempt.attempt,
                                trigger=attempt.trigger, url=attempt.url, ip=result.ip,
                                status_code=result.status_code, error=result.error, duration_ms=result.duration_ms,
                                response_excerpt=result.response_excerpt or None, outcome=outcome))
    this = update(W).where(W.id == attempt.event_id)
    if attempt.trigger == "scheduled":
        this = this.where(W.status == E.PENDING, W.scheduled_attempts == attempt.scheduled_attempt)
    done = {"next_attempt_at": None, "locked_until": None, "enqueued_at": None}
    if outcome == "success":
        session.execute(this.values(status=E.DELIVERED, delivered_at=func.now(), last_error=None, **done))
    elif outcome == "disable":
        session.execute(this.where(W.status != E.DELIVERED).values(status=E.DISABLED, last_error=result.error,
                                                                   **done))
        disable_endpoint(session, tenant_id=attempt.tenant_id, url=attempt.url, event_id=attempt.event_id,
                         reason=f"HTTP 410 Gone answered to {attempt.event_id}")
    elif outcome == "refused":
        session.execute(this.where(W.status != E.DELIVERED).values(status=E.FAILED, last_error=result.error,
                                                                   **done))
    elif attempt.trigger == "redeliver":
        session.execute(this.values(last_error=result.error))  # one attempt; the event keeps its status
    else:
        delay = next_attempt_delay(attempt.scheduled_attempt + 1, settings.retry_schedule_s, settings.jitter,
                                   retry_after_s=result.retry_after_s)
        if delay is None:
            session.execute(this.values(status=E.FAILED, last_error=f"gave up after {attempt.scheduled_attempt} "
                                                                    f"attempts; last: {result.error}", **done))
        else:
            by_countdown = delay < _countdown_limit_s()
            matched = session.execute(this.values(
                next_attempt_at=func.now() + timedelta(seconds=delay), locked_until=None, last_error=result.error,
                enqueued_at=func.now() if by_countdown else None).returning(W.id)).one_or_none()
            if matched is not None and by_countdown:
                _send_after_commit(session, attempt.event_id, delay)
    session.flush()
    return outcome


def disable_endpoint(session: Session, *, tenant_id: uuid.UUID, url: str, reason: str,
                     event_id: str | None = None) -> None:
    """Stop sending to `url` for this tenant: mark it disabled and its pending events `disabled`."""
    session.execute(insert(WebhookDisabledEndpoint).values(tenant_id=tenant_id, url=url, reason=reason,
                                                           event_id=event_id)
                    .on_conflict_do_update(index_elements=["tenant_id", "url"],
                                           set_={"reason": reason, "event_id": event_id,
                                                 "disabled_at": func.now()}))
    session.execute(update(WebhookEvent).where(WebhookEvent.tenant_id == tenant_id, WebhookEvent.url == url,
                                               WebhookEvent.status == E.PENDING)
                    .values(status=E.DISABLED, next_attempt_at=None, locked_until=None, enqueued_at=None,
                            last_error=f"endpoint disabled: {reason}")
                    .execution_options(synchronize_session=False))


def enable_endpoint(session: Session, *, tenant_id: uuid.UUID, url: str) -> bool:
    """Send to `url` again (events recorded while it was disabled stay `disabled`; redeliver them)."""
    return session.execute(delete(WebhookDisabledEndpoint).where(WebhookDisabledEndpoint.tenant_id == tenant_id,
                                                                 WebhookDisabledEndpoint.url == url)).rowcount > 0


def request_redelivery(session: Session, *, event: WebhookEvent) -> WebhookEvent:
    """One more attempt of `event` with the same webhook-id, sent after commit. An explicit redelivery
    re-enables a disabled endpoint (a new 410 disables it again)."""
    enable_endpoint(session, tenant_id=event.tenant_id, url=event.url)
    session.execute(update(WebhookEvent).where(WebhookEvent.id == event.id)
                    .values(redeliver_requested_at=func.now()))
    _send_after_commit(session, event.id)
    session.flush()
    session.refresh(event)
    return event


# --------------------------------------------------------------------------------------- due-events pass

def due_event_ids(session: Session, *, requeue_after_s: float, broker_empty: bool | None,
                  limit: int = 500) -> list[str]:
    """Events to send to the broker now, marked enqueued: pending ones whose time came and that no message
    carries (never enqueued, a long delay, a lost send; or, when the broker's queue is empty, sent longer ago
    than `requeue_after_s`: Redis lost it), and redeliveries the broker lost. SKIP LOCKED: passes running at
    once in several processes take disjoint rows."""
    W = WebhookEvent
    stale = W.enqueued_at < func.now() - timedelta(seconds=requeue_after_s)
    lost = or_(W.enqueued_at.is_(None), stale) if broker_empty else W.enqueued_at.is_(None)
    due = and_(W.status == E.PENDING, W.next_attempt_at <= func.now(),
               or_(W.locked_until.is_(None), W.locked_until < func.now()), lost)
    conditions = [due]
    if broker_empty:
        conditions.append(W.redeliver_requested_at < func.now() - timedelta(seconds=requeue_after_s))
    picked = select(W.id).where(or_(*conditions)).order_by(W.next_attempt_at).limit(limit) \
        .with_for_update(skip_locked=True)
    return list(session.scalars(update(W).where(W.id.in_(picked.scalar_subquery())).values(enqueued_at=func.now())
                                .returning(W.id).execution_options(synchronize_session=False)))


def enqueue_due(settings: Settings) -> int:
    """The due-events pass: send due and lost events to the delivery queue. Returns how many were sent."""
    with session_scope() as session:
        ids = due_event_ids(session, requeue_after_s=settings.worker.requeue_after_s,
                            broker_empty=queue_empty(settings.redis.url, WEBHOOK_QUEUE))
    return send_now([(event_id, 0.0) for event_id in ids]) if ids else 0
