"""The state machine's SQL on a real Postgres: claim, fencing, heartbeat, completion, failure, preemption,
expired leases and the dead letter."""
from __future__ import annotations

import uuid

import pytest
from sqlalchemy import text

from common import job_states as js
from common.db import session_scope
from common.errors import Conflict, LeaseLost

PARAMS = {"prompt": "p", "prompt_text": "p", "preset": "V4_TURBO_12", "width": 256, "height": 256, "steps": 12,
          "mu": 0.5, "std": 1.75, "guidance_schedule": [7.0] * 11 + [3.0], "seed": 1, "seed_generated": False,
          "num_images": 1}


@pytest.fixture
def job_id(stack_env, tenant):
    with session_scope() as s:
        job, _ = js.create_job(s, tenant_id=tenant.id, params=PARAMS, queue="test-none", max_attempts=2)
        return job.id


def expire_lease(job_id):
    with session_scope() as s:
        s.execute(text("UPDATE jobs SET lease_expires_at = now() - interval '1 second' WHERE id = :id"),
                  {"id": job_id})


def claim(job_id, ttl=30):
    with session_scope() as s:
        return js.claim(s, job_id=job_id, worker_id="w", ttl_s=ttl)


def test_second_claim_is_a_noop_while_leased(job_id):
    first = claim(job_id)
    assert first is not None and first.attempt == 1
    assert claim(job_id) is None  # duplicate delivery


def test_fencing_stale_attempt_can_change_nothing(job_id):
    stale = claim(job_id)
    expire_lease(job_id)
    fresh = claim(job_id)
    assert fresh is not None and fresh.token != stale.token and fresh.attempt == 2
    with session_scope() as s, pytest.raises(LeaseLost):
        js.heartbeat(s, job_id=job_id, token=stale.token, ttl_s=30, progress_step=5)
    with session_scope() as s, pytest.raises(LeaseLost):
        js.complete(s, job_id=job_id, token=stale.token, images=[])
    with session_scope() as s, pytest.raises(LeaseLost):
        js.fail(s, job_id=job_id, token=stale.token, error={"type": "x"}, retryable=False)
    with session_scope() as s:
        js.heartbeat(s, job_id=job_id, token=fresh.token, ttl_s=30, progress_step=3)
        js.complete(s, job_id=job_id, token=fresh.token, images=[js.StoredImage(0, 1, "k", "0" * 64, 256, 256, 10)])
    with session_scope() as s:
        job = js.get_job(s, job_id)
        assert job.status == "succeeded" and job.lease_token is None and len(job.images) == 1


def test_retryable_failure_requeues_until_attempts_exhausted(job_id):
    for attempt, expected in ((1, "queued"), (2, "failed")):
        c = claim(job_id)
        assert c.attempt == attempt
        with session_scope() as s:
            assert js.fail(s, job_id=job_id, token=c.token, error={"type": "storage_error"},
                           retryable=True) == expected
    with session_scope() as s:
        error = js.get_job(s, job_id).error
    assert error["type"] == "attempts_exhausted" and error["last_error"]["type"] == "storage_error"


def test_a_requeued_failure_starts_over_unsent(job_id):
    c = claim(job_id)
    with session_scope() as s:
        js.mark_enqueued(s, [job_id])
        js.heartbeat(s, job_id=job_id, token=c.token, ttl_s=30, progress_step=2)
        assert js.fail(s, job_id=job_id, token=c.token, error={"type": "x"}, retryable=True) == "queued"
    with session_scope() as s:
        job = js.get_job(s, job_id)
        # no stale progress while it waits; not yet sent, so maintenance resends it if the re-send fails
        assert (job.progress_step, job.enqueued_at) == (0, None)


def test_preemption_is_free(job_id):
    for _ in range(3):  # more preemptions than max_attempts
        c = claim(job_id)
        with session_scope() as s:
            js.release_preempted(s, job_id=job_id, token=c.token)
    with session_scope() as s:
        job = js.get_job(s, job_id)
        assert (job.status, job.attempts, job.preemptions) == ("queued", 0, 3)


def test_expired_lease_requeues_then_dead_letters(job_id):
    claim(job_id)
    expire_lease(job_id)
    with session_scope() as s:
        requeued, dead = js.recover_expired_leases(s)
    assert (job_id, "test-none") in requeued and job_id not in dead
    claim(job_id)  # attempt 2 of 2
    expire_lease(job_id)
    with session_scope() as s:
        requeued, dead = js.recover_expired_leases(s)
    assert job_id in dead
    with session_scope() as s:
        job = js.get_job(s, job_id)
        assert job.status == "failed" and job.error["type"] == "attempts_exhausted"
        assert job.error["last_error"]["type"] == "lease_expired"
    assert claim(job_id) is None


def test_recovery_passes_over_a_row_another_session_holds(job_id, tenant):
    """A worker frozen mid-heartbeat holds its job's row lock: recovery must not wait for it (the rest of the
    expired leases are recovered now, that one on a later pass once the lock is gone)."""
    with session_scope() as s:
        other, _ = js.create_job(s, tenant_id=tenant.id, params=PARAMS, queue="test-none", max_attempts=2)
    for jid in (job_id, other.id):
        claim(jid)
        expire_lease(jid)
    with session_scope() as holder:
        holder.execute(text("SELECT 1 FROM jobs WHERE id = :id FOR UPDATE"), {"id": job_id})
        with session_scope() as s:
            s.execute(text("SET LOCAL lock_timeout = '5s'"))  # waiting would fail the test, not hang it
            requeued, _ = js.recover_expired_leases(s)
        assert [jid for jid, _ in requeued if jid in (job_id, other.id)] == [other.id]
    with session_scope() as s:
        requeued, _ = js.recover_expired_leases(s)
    assert (job_id, "test-none") in requeued


def test_sessions_end_idle_transactions(stack_env):
    """Every engine session carries the idle-in-transaction timeout (a frozen process cannot hold locks forever)."""
    from common.settings import get_settings

    with session_scope() as s:
        shown = s.execute(text("SHOW idle_in_transaction_session_timeout")).scalar()
    expected_s = get_settings().database.idle_in_transaction_timeout_s
    assert shown == f"{int(expected_s)}s", shown


def test_cancel_queued_running_finished(job_id, tenant):
    with session_scope() as s:
        other, _ = js.create_job(s, tenant_id=tenant.id, params=PARAMS, queue="test-none")
        assert js.cancel(s, job=js.get_job(s, other.id)).status == "canceled"
    c = claim(job_id)
    with session_scope() as s:
        job = js.cancel(s, job=js.get_job(s, job_id))
        assert job.status == "running" and job.cancel_requested
    with session_scope() as s:
        assert js.heartbeat(s, job_id=job_id, token=c.token, ttl_s=30) is True
        js.finish_canceled(s, job_id=job_id, token=c.token)
    with session_scope() as s, pytest.raises(Conflict):
        js.cancel(s, job=js.get_job(s, job_id))


def test_lost_enqueues_never_enqueued_and_stale(job_id):
    with session_scope() as s:
        assert job_id in js.lost_enqueues(s, queue="test-none", stale_after_s=None)
        js.mark_enqueued(s, [job_id])
    with session_scope() as s:
        assert job_id not in js.lost_enqueues(s, queue="test-none", stale_after_s=None)
        assert job_id not in js.lost_enqueues(s, queue="test-none", stale_after_s=60)
        s.execute(text("UPDATE jobs SET enqueued_at = now() - interval '2 minutes' WHERE id = :id"), {"id": job_id})
    with session_scope() as s:
        assert job_id in js.lost_enqueues(s, queue="test-none", stale_after_s=60)


def test_unknown_job_is_not_found(stack_env):
    from common.errors import NotFound

    with session_scope() as s, pytest.raises(NotFound):
        js.get_job(s, uuid.uuid4())
