"""worker.maintenance.maintenance_pass in-process, on a database and a Redis db of its own (maintenance is global
across tenants by design, so it runs where no other test's jobs can be seen): expired leases are requeued or
dead-lettered, lost enqueues are sent again, and the Celery messages it sends really land in the Redis lists."""
from __future__ import annotations

import base64
import json
import uuid

import pytest
import redis
from sqlalchemy import text

from common import job_states
from common.broker import GENERATE_TASK, get_celery
from common.models import Batch
from tests.support import scratch_settings
from worker.maintenance import ADVISORY_LOCK_ID, maintenance_pass

PARAMS = {"prompt": "p", "prompt_text": "p", "preset": "V4_TURBO_12", "width": 256, "height": 256, "steps": 2,
          "mu": 0.5, "std": 1.75, "guidance_schedule": [7.0, 3.0], "seed": 1, "seed_generated": False,
          "num_images": 1}


@pytest.fixture(scope="module")
def iso(services, stack_env):
    """Point this process (only) at a fresh database and Redis db; restore afterwards. The broker's Celery app is
    cached per process (common.broker.get_celery), so it is dropped on the way in and out."""
    get_celery.cache_clear()
    try:
        with scratch_settings(services, stack_env, "lp_maint", redis_db=9) as settings:
            yield settings
    finally:
        get_celery.cache_clear()


@pytest.fixture
def env(iso):
    """A clean slate per test: no jobs, an empty broker."""
    from common.auth import get_or_create_tenant
    from common.db import session_scope

    with session_scope() as session:
        session.execute(text("TRUNCATE batches, jobs, tenants CASCADE"))
        tenant_id = get_or_create_tenant(session, f"t-{uuid.uuid4().hex[:6]}").id
    r = redis.Redis.from_url(iso.redis.url)
    r.flushdb()
    return iso, r, tenant_id


def sql(statement: str, **params):
    from common.db import session_scope

    with session_scope() as session:
        return session.execute(text(statement), params)


def new_job(tenant_id, *, queue="interactive", max_attempts=3, webhook_url=None, enqueued=True, batch_id=None):
    from common.db import session_scope

    with session_scope() as s:
        job, _ = job_states.create_job(s, tenant_id=tenant_id, params=PARAMS, queue=queue,
                                       max_attempts=max_attempts, webhook_url=webhook_url)
        if batch_id is not None:
            job.batch_id = batch_id
        if enqueued:
            job_states.mark_enqueued(s, [job.id])
        return job.id


def running_job(tenant_id, *, expired=True, **kw):
    """A job claimed by a worker that then vanished: its lease ran out a second ago (or is still live)."""
    from common.db import session_scope

    job_id = new_job(tenant_id, **kw)
    with session_scope() as s:
        job_states.claim(s, job_id=job_id, worker_id="gone", ttl_s=60)
    if expired:
        sql("UPDATE jobs SET lease_expires_at = now() - interval '1 second' WHERE id=:id", id=job_id)
    return job_id


def job(job_id):
    from common.db import session_scope

    with session_scope() as s:
        return job_states.get_job(s, job_id)


def messages(r, queue) -> list[dict]:
    """The Celery messages waiting in a queue's Redis list, in delivery order (kombu pushes on the left and a
    worker pops on the right): task name and args."""
    out = []
    for raw in reversed(r.lrange(queue, 0, -1)):
        message = json.loads(raw)
        args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        out.append({"task": message["headers"]["task"], "args": args})
    return out


# ----------------------------------------------------------------------------------------- expired leases

def test_an_expired_lease_is_requeued_and_sent_again(env):
    settings, r, tenant_id = env
    job_id = running_job(tenant_id)
    counts = maintenance_pass(settings)
    assert (counts["requeued"], counts["dead"], counts["reenqueued"]) == (1, 0, 1)
    j = job(job_id)
    assert j.status == "queued" and j.lease_token is None and j.lease_expires_at is None
    assert j.attempts == 1  # the lost attempt counts
    assert j.error["type"] == "lease_expired"
    assert j.enqueued_at is not None
    assert messages(r, "interactive") == [{"task": GENERATE_TASK, "args": [str(job_id)]}]
    # and it can be claimed again
    from common.db import session_scope
    with session_scope() as s:
        assert job_states.claim(s, job_id=job_id, worker_id="next", ttl_s=30).attempt == 2


def test_a_requeued_batch_job_goes_to_its_own_queue(env):
    settings, r, tenant_id = env
    job_id = running_job(tenant_id, queue="batch")
    assert maintenance_pass(settings)["requeued"] == 1
    assert job(job_id).status == "queued"
    assert messages(r, "batch") == [{"task": GENERATE_TASK, "args": [str(job_id)]}]
    assert r.llen("interactive") == 0


def test_a_live_lease_is_left_alone(env):
    settings, r, tenant_id = env
    job_id = running_job(tenant_id, expired=False)
    before = job(job_id)
    counts = maintenance_pass(settings)
    assert (counts["requeued"], counts["dead"], counts["reenqueued"]) == (0, 0, 0)
    after = job(job_id)
    assert after.status == "running" and after.lease_token == before.lease_token
    assert r.llen("interactive") == 0


def test_a_job_out_of_attempts_is_dead_lettered(env):
    settings, r, tenant_id = env
    job_id = running_job(tenant_id, max_attempts=1)
    sql("UPDATE jobs SET error = '{\"type\": \"lease_expired\", \"message\": \"earlier\"}' WHERE id=:id", id=job_id)
    counts = maintenance_pass(settings)
    assert (counts["requeued"], counts["dead"], counts["reenqueued"]) == (0, 1, 0)
    j = job(job_id)
    assert j.status == "failed" and j.finished_at is not None and j.lease_token is None
    assert j.error["type"] == "attempts_exhausted"
    assert j.error["last_error"] == {"type": "lease_expired", "message": "earlier"}
    assert r.llen("interactive") == 0  # never sent again
    assert maintenance_pass(settings)["dead"] == 0  # and only once


def test_a_dead_lettered_job_with_a_webhook_gets_its_failed_event_sent(env):
    settings, r, tenant_id = env
    job_id = running_job(tenant_id, max_attempts=1, webhook_url="http://127.0.0.1:9/hook")
    maintenance_pass(settings)
    events = sql("SELECT id, type, status FROM webhook_events WHERE job_id=:id", id=job_id).all()
    assert [(e.type, e.status) for e in events] == [("job.failed", "pending")]
    assert messages(r, "webhooks") == [{"task": "webhooks.deliver", "args": [events[0].id]}]


def test_an_expired_lease_of_a_canceled_job_ends_canceled(env):
    settings, r, tenant_id = env
    job_id = running_job(tenant_id)
    sql("UPDATE jobs SET cancel_requested = true WHERE id=:id", id=job_id)
    counts = maintenance_pass(settings)
    assert counts["requeued"] == 0 and counts["reenqueued"] == 0
    assert counts["dead"] == 1  # job_states.recover_expired_leases reports the canceled among the dead
    j = job(job_id)
    assert j.status == "canceled" and j.finished_at is not None and j.lease_token is None
    assert r.llen("interactive") == 0


# ---------------------------------------------------------------------------------------- lost enqueues

def test_a_queued_job_never_enqueued_is_sent(env):
    settings, r, tenant_id = env
    job_id = new_job(tenant_id, enqueued=False)
    assert job(job_id).enqueued_at is None
    counts = maintenance_pass(settings)
    assert counts["reenqueued"] == 1 and counts["requeued"] == 0
    assert job(job_id).enqueued_at is not None
    assert messages(r, "interactive") == [{"task": GENERATE_TASK, "args": [str(job_id)]}]
    assert maintenance_pass(settings)["reenqueued"] == 0  # enqueued now: not sent twice


def test_lost_enqueues_are_sent_oldest_first(env):
    settings, r, tenant_id = env
    ids = [new_job(tenant_id, enqueued=False) for _ in range(3)]
    assert maintenance_pass(settings)["reenqueued"] == 3
    assert [m["args"][0] for m in messages(r, "interactive")] == [str(i) for i in ids]


def test_a_stale_enqueue_is_resent_only_when_the_broker_queue_is_empty(env):
    settings, r, tenant_id = env
    job_id = new_job(tenant_id)
    sql("UPDATE jobs SET enqueued_at = now() - make_interval(secs => :s) WHERE id=:id",
        s=settings.worker.requeue_after_s + 5, id=job_id)
    r.rpush("interactive", "someone else's message")  # a queue with work in it is waiting, not lost
    assert maintenance_pass(settings)["reenqueued"] == 0
    r.delete("interactive")  # Redis was flushed: the message is gone
    assert maintenance_pass(settings)["reenqueued"] == 1
    assert messages(r, "interactive") == [{"task": GENERATE_TASK, "args": [str(job_id)]}]


def test_a_recent_enqueue_is_not_resent(env):
    settings, r, tenant_id = env
    new_job(tenant_id)  # enqueued just now, its message in a worker's hand
    assert maintenance_pass(settings)["reenqueued"] == 0
    assert r.llen("interactive") == 0


def test_batch_items_are_left_to_the_feeder(env):
    from common.db import session_scope

    settings, r, tenant_id = env
    with session_scope() as s:
        batch = Batch(tenant_id=tenant_id, status="in_progress", request_hash="x", manifest_key="m")
        s.add(batch)
        s.flush()
        batch_id = batch.id
    job_id = new_job(tenant_id, queue="batch", enqueued=False, batch_id=batch_id)
    assert maintenance_pass(settings)["reenqueued"] == 0
    assert job(job_id).enqueued_at is None and r.llen("batch") == 0


# --------------------------------------------------------------------------------------------- one at a time

def test_a_pass_is_skipped_while_another_holds_the_lock(env):
    from common.db import session_scope

    settings, r, tenant_id = env
    expired = running_job(tenant_id)
    lost = new_job(tenant_id, enqueued=False)
    with session_scope() as other:
        other.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": ADVISORY_LOCK_ID})
        counts = maintenance_pass(settings)
        assert counts == {"requeued": 0, "dead": 0, "reenqueued": 0}
        assert job(expired).status == "running" and job(lost).enqueued_at is None
    counts = maintenance_pass(settings)  # the lock is free again
    assert counts["requeued"] == 1 and counts["reenqueued"] == 2
    assert {m["args"][0] for m in messages(r, "interactive")} == {str(expired), str(lost)}


def test_with_redis_down_nothing_is_lost(env):
    """A send that fails leaves the job queued with enqueued_at NULL for the next pass."""
    from common.settings import use_settings
    from tests.support import free_port

    settings, r, tenant_id = env
    job_id = new_job(tenant_id, enqueued=False)
    down = settings.model_copy(update={"redis": settings.redis.model_copy(
        update={"url": f"redis://127.0.0.1:{free_port()}/0"})})
    get_celery.cache_clear()
    try:
        with use_settings(down):
            counts = maintenance_pass(down)
    finally:
        get_celery.cache_clear()
    assert counts["reenqueued"] == 0
    assert job(job_id).status == "queued" and job(job_id).enqueued_at is None
    assert maintenance_pass(settings)["reenqueued"] == 1  # Redis back: sent
    assert messages(r, "interactive") == [{"task": GENERATE_TASK, "args": [str(job_id)]}]
