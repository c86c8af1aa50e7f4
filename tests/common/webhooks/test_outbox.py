"""The webhook outbox on a real Postgres: events written in the transaction of each terminal transition (and
only then), the claim/record cycle of attempts with its fencing, the retry schedule and Retry-After, 410,
the due-events pass, secrets and rotation. No HTTP here (tests/worker/test_webhooks_e2e.py has the receiver)."""
from __future__ import annotations

import uuid
from datetime import datetime, timezone

import pytest
from sqlalchemy import select, text
from standardwebhooks import Webhook

from common import job_states as js
from common.db import after_commit, session_scope
from common.models import WebhookDelivery, WebhookEvent
from common.settings import WebhookSettings
from common.webhooks import outbox
from common.webhooks.client import DeliveryResult
from common.webhooks.signing import build_headers

PARAMS = {"prompt": "p", "prompt_text": "p", "preset": "V4_TURBO_12", "width": 256, "height": 256, "steps": 12,
          "mu": 0.5, "std": 1.75, "guidance_schedule": [7.0] * 11 + [3.0], "seed": 1, "seed_generated": False,
          "num_images": 1}
URL = "http://127.0.0.1:9/hook"  # discard port: nothing listens, in case a delivery worker picks one up
CFG = WebhookSettings(retry_schedule_s=[0, 0.5, 300], jitter=0.0, allow_loopback=True)


def new_job(tenant, *, webhook_url: str | None = URL, max_attempts: int = 2):
    with session_scope() as s:
        job, _ = js.create_job(s, tenant_id=tenant.id, params=PARAMS, queue="test-none", max_attempts=max_attempts,
                               webhook_url=webhook_url)
        return job.id


def claim(job_id):
    with session_scope() as s:
        return js.claim(s, job_id=job_id, worker_id="w", ttl_s=30)


def events(job_id) -> list[WebhookEvent]:
    with session_scope() as s:
        return list(s.scalars(select(WebhookEvent).where(WebhookEvent.job_id == job_id)
                              .order_by(WebhookEvent.created_at)))


def test_each_terminal_transition_writes_its_event(stack_env, tenant):
    succeeded = new_job(tenant)
    c = claim(succeeded)
    with session_scope() as s:
        js.complete(s, job_id=succeeded, token=c.token, images=[js.StoredImage(0, 1, "images/k/0.png", "0" * 64,
                                                                                256, 256, 10)],
                    timings={"generate_s": 1.0})
    [ev] = events(succeeded)
    assert ev.type == "job.succeeded" and ev.status == "pending" and ev.url == URL and ev.id.startswith("msg_")
    data = ev.payload
    assert data["id"] == str(succeeded) and data["object"] == "job" and data["status"] == "succeeded"
    assert data["images"][0]["key"] == "images/k/0.png" and data["images"][0]["url"]
    assert data["urls"]["self"].endswith(f"/v1/jobs/{succeeded}") and data["finished_at"].endswith("Z")
    assert data["progress"] == {"step": 12, "total": 12, "fraction": 1.0}

    failed = new_job(tenant)
    c = claim(failed)
    with session_scope() as s:
        js.fail(s, job_id=failed, token=c.token, error={"type": "generation_error"}, retryable=False)
    [ev] = events(failed)
    assert ev.type == "job.failed" and ev.payload["error"]["type"] == "generation_error"

    canceled_queued = new_job(tenant)
    with session_scope() as s:
        js.cancel(s, job=js.get_job(s, canceled_queued))
    assert [e.type for e in events(canceled_queued)] == ["job.canceled"]

    canceled_running = new_job(tenant)
    c = claim(canceled_running)
    with session_scope() as s:
        js.cancel(s, job=js.get_job(s, canceled_running))  # running: only flagged, no event yet
    assert events(canceled_running) == []
    with session_scope() as s:
        js.finish_canceled(s, job_id=canceled_running, token=c.token)
    assert [e.payload["status"] for e in events(canceled_running)] == ["canceled"]


def test_dead_letter_and_bulk_cancel_write_events(stack_env, tenant):
    dead = new_job(tenant, max_attempts=1)
    claim(dead)
    with session_scope() as s:
        s.execute(text("UPDATE jobs SET lease_expires_at = now() - interval '1 second' WHERE id = :id"), {"id": dead})
    with session_scope() as s:
        js.recover_expired_leases(s)
    [ev] = events(dead)
    assert ev.type == "job.failed" and ev.payload["error"]["type"] == "attempts_exhausted"

    bulk = [new_job(tenant), new_job(tenant, webhook_url=None)]
    with session_scope() as s:
        from common.models import Job
        assert js.cancel_queued_where(s, Job.id.in_(bulk)) == 2
    assert [e.type for e in events(bulk[0])] == ["job.canceled"] and events(bulk[1]) == []


def test_no_event_without_url_on_retryable_failure_or_rollback(stack_env, tenant):
    plain = new_job(tenant, webhook_url=None)
    c = claim(plain)
    with session_scope() as s:
        js.complete(s, job_id=plain, token=c.token, images=[])
    assert events(plain) == []

    retried = new_job(tenant)
    c = claim(retried)
    with session_scope() as s:
        assert js.fail(s, job_id=retried, token=c.token, error={"type": "x"}, retryable=True) == "queued"
    assert events(retried) == []  # back in the queue: not terminal

    rolled_back = new_job(tenant)
    c = claim(rolled_back)
    with pytest.raises(RuntimeError), session_scope() as s:
        js.complete(s, job_id=rolled_back, token=c.token, images=[])
        sends = after_commit(s, "webhook-sends", lambda: None)
        assert [eid for eid, _ in sends.pending]  # an id waits for the commit...
        raise RuntimeError("the task failed after the transition")
    assert events(rolled_back) == []  # ...and the rollback took the event with the state change
    assert "letterpress.after_commit" not in s.info  # ...and nothing is left to send
    with session_scope() as s:
        assert js.get_job(s, rolled_back).status == "running"


def _event(tenant, url=URL) -> str:
    with session_scope() as s:
        return outbox.record_event(s, tenant_id=tenant.id, type="job.succeeded", payload={"id": "x"},
                                   webhook_url=url).id


def _result(status: int | None, *, retry_after: float | None = None, error: str | None = None) -> DeliveryResult:
    return DeliveryResult(status_code=status, error=error if status is None or status >= 300 else None,
                          duration_ms=3, retry_after_s=retry_after, ip="127.0.0.1")


def _attempt(event_id):
    with session_scope() as s:
        return outbox.claim_attempt(s, event_id=event_id, lease_s=30)


def _record(attempt, result):
    with session_scope() as s:
        return outbox.record_attempt(s, attempt=attempt, result=result, settings=CFG)


def _get(event_id) -> WebhookEvent:
    with session_scope() as s:
        return s.get(WebhookEvent, event_id)


def test_attempts_are_claimed_once_and_follow_the_schedule(stack_env, tenant):
    eid = _event(tenant)
    first = _attempt(eid)
    assert first.trigger == "scheduled" and first.attempt == 1 and _attempt(eid) is None  # in flight: no double
    assert _record(first, _result(500, error="HTTP 500")) == "retry"
    ev = _get(eid)
    # 0.5 s is shorter than a maintenance period (1 s in tests): sent at once with a Celery countdown
    assert ev.status == "pending" and ev.last_error == "HTTP 500" and ev.enqueued_at is not None
    assert _attempt(eid) is None  # not due yet
    with session_scope() as s:
        assert 0 < outbox.not_yet_due_s(s, event_id=eid) <= 0.5
        s.execute(text("UPDATE webhook_events SET next_attempt_at = now() WHERE id = :id"), {"id": eid})
    second = _attempt(eid)
    # Retry-After shorter than the schedule's next step (5 min) does not make the retry sooner
    assert _record(second, _result(503, retry_after=100, error="HTTP 503")) == "retry"
    ev = _get(eid)
    wait = (ev.next_attempt_at - datetime.now(timezone.utc)).total_seconds()
    assert 290 < wait <= 300 and ev.enqueued_at is None  # long delay: left to the due-events pass
    with session_scope() as s:
        s.execute(text("UPDATE webhook_events SET next_attempt_at = now() WHERE id = :id"), {"id": eid})
    third = _attempt(eid)
    assert _record(third, _result(None, error="ConnectError: refused")) == "retry"
    ev = _get(eid)
    assert ev.status == "failed" and "gave up after 3 attempts" in ev.last_error and ev.next_attempt_at is None
    with session_scope() as s:
        log = s.scalars(select(WebhookDelivery).where(WebhookDelivery.event_id == eid)
                        .order_by(WebhookDelivery.attempt)).all()
        assert [(d.attempt, d.status_code, d.outcome) for d in log] == [(1, 500, "retry"), (2, 503, "retry"),
                                                                       (3, None, "retry")]


def test_retry_after_beyond_the_schedule_step_is_honoured(stack_env, tenant):
    eid = _event(tenant)
    assert _record(_attempt(eid), _result(429, retry_after=60, error="HTTP 429")) == "retry"
    wait = (_get(eid).next_attempt_at - datetime.now(timezone.utc)).total_seconds()
    assert 55 < wait <= 60  # the schedule said 5 s; the receiver asked for 60


def test_stale_attempt_only_logs(stack_env, tenant):
    eid = _event(tenant)
    stale = _attempt(eid)
    with session_scope() as s:  # its worker died: the lease runs out and another attempt takes over
        s.execute(text("UPDATE webhook_events SET locked_until = now() - interval '1 second' WHERE id = :id"),
                  {"id": eid})
    fresh = _attempt(eid)
    assert fresh.scheduled_attempt == 2
    _record(stale, _result(200))
    assert _get(eid).status == "pending"  # the stale success is logged, the state belongs to the fresh attempt
    _record(fresh, _result(200))
    ev = _get(eid)
    assert ev.status == "delivered" and ev.delivered_at is not None and ev.locked_until is None


def test_410_disables_the_endpoint_and_its_pending_events(stack_env, tenant):
    url = f"http://127.0.0.1:9/gone-{uuid.uuid4().hex[:6]}"
    first, other = _event(tenant, url), _event(tenant, url)
    assert _record(_attempt(first), _result(410, error="HTTP 410")) == "disable"
    assert _get(first).status == "disabled" and _get(other).status == "disabled"
    later = _event(tenant, url)
    assert _get(later).status == "disabled" and _attempt(later) is None  # recorded, never sent
    with session_scope() as s:  # an explicit redelivery re-enables the endpoint and sends the event once
        outbox.request_redelivery(s, event=s.get(WebhookEvent, later))
    again = _attempt(later)
    assert again.trigger == "redeliver" and _record(again, _result(200)) == "success"
    assert _get(later).status == "delivered"
    assert _get(_event(tenant, url)).status == "pending"


def test_due_pass_finds_lost_and_due_events(stack_env, tenant):
    """Each step runs in one transaction with its setup, so a maintenance pass of a worker running beside the
    tests (it skips rows locked here) cannot take the event first."""
    eid = _event(tenant)

    def due(setup: str, *, broker_empty: bool) -> bool:
        with session_scope() as s:
            s.execute(text(f"UPDATE webhook_events SET {setup} WHERE id = :id"), {"id": eid})
            return eid in outbox.due_event_ids(s, requeue_after_s=60, broker_empty=broker_empty)

    assert due("enqueued_at = NULL", broker_empty=False)  # the send after commit was lost (Redis down)
    # sent a while ago: waiting in a busy queue, unless the queue is empty (then Redis lost it)
    assert not due("enqueued_at = now() - interval '2 minutes'", broker_empty=False)
    assert due("enqueued_at = now() - interval '2 minutes'", broker_empty=True)
    assert not due("enqueued_at = now()", broker_empty=True)  # just sent
    # a retry parked in Postgres for later is not due yet; once its time comes it is
    assert not due("enqueued_at = NULL, next_attempt_at = now() + interval '1 hour'", broker_empty=True)
    assert due("enqueued_at = NULL, next_attempt_at = now() - interval '1 second'", broker_empty=False)
    # an attempt in flight holds it until its lease runs out
    assert not due("enqueued_at = NULL, locked_until = now() + interval '30 seconds'", broker_empty=True)
    assert due("enqueued_at = NULL, locked_until = now() - interval '1 second'", broker_empty=False)
    with session_scope() as s:  # a redelivery whose message was lost
        s.execute(text("UPDATE webhook_events SET status = 'delivered', next_attempt_at = NULL, "
                       "redeliver_requested_at = now() - interval '2 minutes' WHERE id = :id"), {"id": eid})
        assert eid in outbox.due_event_ids(s, requeue_after_s=60, broker_empty=True)


def test_secret_created_once_rotation_signs_with_both(stack_env, tenant):
    with session_scope() as s:
        first = outbox.get_secret(s, tenant_id=tenant.id).secret
    with session_scope() as s:
        assert outbox.get_secret(s, tenant_id=tenant.id).secret == first and first.startswith("whsec_")
        assert outbox.signing_secrets(s, tenant_id=tenant.id) == [first]
    with session_scope() as s:
        new = outbox.rotate_secret(s, tenant_id=tenant.id).secret
    with session_scope() as s:
        both = outbox.signing_secrets(s, tenant_id=tenant.id)
    assert both == [new, first]
    body = b'{"type":"job.succeeded"}'
    headers = build_headers("msg_test", body, both)
    for secret in (first, new):  # a receiver holding either secret accepts the call during the window
        assert Webhook(secret).verify(body, headers) == {"type": "job.succeeded"}
    with session_scope() as s:
        s.execute(text("UPDATE webhook_secrets SET previous_expires_at = now() - interval '1 second' "
                       "WHERE tenant_id = :t"), {"t": tenant.id})
    with session_scope() as s:
        assert outbox.signing_secrets(s, tenant_id=tenant.id) == [new]
    with session_scope() as s:
        newest = outbox.rotate_secret(s, tenant_id=tenant.id, previous_valid_for_s=0).secret
        assert outbox.signing_secrets(s, tenant_id=tenant.id) == [newest]
