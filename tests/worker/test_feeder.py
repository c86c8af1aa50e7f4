"""The batch feeder in-process against a real Postgres, Redis and S3, on a database and Redis db of its own:
the feeder is global across tenants by design, so it is tested where no other test's batches (or the session's
worker, whose own feeder would compete) can be seen. Messages are real Celery messages nobody consumes, so the
Redis list length is the broker depth."""
from __future__ import annotations

import json
import time
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import func, select, text, update

from common.batches import BatchOptions, items_source
from common.models import Batch, Job
from common.settings import BatchSettings
from tests.support import scratch_settings

LINE = {"prompt": "a poster that says HELLO", "width": 256, "height": 256, "preset": "V4_TURBO_12", "steps": 2}


@pytest.fixture(scope="module")
def iso(services, stack_env):
    """Point this process (only) at a fresh database and Redis db; restore afterwards."""
    with scratch_settings(services, stack_env, "lp_feeder", redis_db=7) as settings:
        yield settings


@pytest.fixture
def env(iso):
    """A clean slate per test: no batches, an empty broker."""
    import redis

    from common.db import session_scope

    with session_scope() as session:
        session.execute(text("TRUNCATE batches, jobs, tenants CASCADE"))
    r = redis.Redis.from_url(iso.redis.url)
    r.flushdb()
    return iso, r


class Sent:
    """Sends real Celery messages to the isolated Redis and remembers the order."""

    def __init__(self, settings):
        from common.broker import GENERATE_TASK, make_celery

        self.app, self.task, self.ids = make_celery(settings), GENERATE_TASK, []

    def __call__(self, job_id, queue):
        self.app.send_task(self.task, args=[str(job_id)], queue=queue, retry=False)
        self.ids.append(job_id)


def feeder(settings, depth=8, **kw):
    from worker.feeder import Feeder

    sent = Sent(settings)
    return Feeder(settings, BatchSettings(feed_depth=depth, **kw), send=sent), sent


def make_batch(settings, n: int, tenant_name: str | None = None, lines=None, priority: str = "normal"):
    from common import batches
    from common.auth import get_or_create_tenant
    from common.db import session_scope

    with session_scope() as session:
        tenant = get_or_create_tenant(session, tenant_name or f"t-{uuid.uuid4().hex[:6]}")
        batch = batches.create_batch(
            session, tenant_id=tenant.id, source=items_source(lines or [{**LINE, "custom_id": f"c{i}", "seed": i}
                                                                        for i in range(n)]),
            source_name="inline", options=BatchOptions(priority=priority), idempotency_key=None, api=settings.api,
            storage_prefix="images", max_attempts=3)
        return batch.id, tenant.id


def line_of(job_ids) -> list[tuple[uuid.UUID, int]]:
    from common.db import session_scope

    with session_scope() as session:
        rows = dict(session.execute(select(Job.id, Job.batch_line).where(Job.id.in_(job_ids))).all())
    return [rows[j] for j in job_ids]


def batch_of(job_ids) -> list[uuid.UUID]:
    from common.db import session_scope

    with session_scope() as session:
        rows = dict(session.execute(select(Job.id, Job.batch_id).where(Job.id.in_(job_ids))).all())
    return [rows[j] for j in job_ids]


def test_depth_stays_bounded_and_items_go_in_line_order(env):
    settings, r = env
    make_batch(settings, 50)
    f, sent = feeder(settings, depth=8)
    first = f.feed()
    assert (first.depth, first.fed) == (0, 8) and r.llen("batch") == 8
    assert line_of(sent.ids) == list(range(1, 9))
    assert f.feed().fed == 0 and r.llen("batch") == 8          # full: nothing more
    for _ in range(3):
        r.rpop("batch")                                         # three consumed by workers
    again = f.feed()
    assert (again.depth, again.fed) == (5, 3) and r.llen("batch") == 8
    assert line_of(sent.ids[8:]) == [9, 10, 11]


def test_two_feeders_never_overfill_the_broker(env):
    """The depth is read under the feeders' lock: a feeder whose early read went stale while another worker's
    feeder filled the queue must not fill it again (seen in CI as a batch queue at 10 with feed_depth 8)."""
    settings, r = env
    make_batch(settings, 40)
    first, sent_first = feeder(settings, depth=8)
    second, sent_second = feeder(settings, depth=8)
    real_depth = second.depth
    reads = []

    def depth_read_before_the_other_feeder_ran(queue):
        depth = real_depth(queue)
        if not reads:
            first.feed()  # the other worker's feeder runs between this read and the lock
        reads.append(depth)
        return depth

    second.depth = depth_read_before_the_other_feeder_ran
    result = second.feed()
    assert reads[0] == 0 and len(sent_first.ids) == 8  # the stale read saw an empty queue; the other filled it
    assert result.fed == 0 and sent_second.ids == []
    assert r.llen("batch") == 8


def test_a_high_priority_batch_overtakes_a_low_one_of_another_tenant(env):
    """Over passes (each worker taking what was sent), a high batch submitted after a low one of another tenant
    gets four turns to its one: it overtakes, the low one keeps moving. Raised to high, the low one shares evenly."""
    from common import batches
    from common.db import session_scope

    settings, r = env
    low, _ = make_batch(settings, 60, "tenant-low", priority="low")
    high, _ = make_batch(settings, 60, "tenant-high", priority="high")
    f, sent = feeder(settings, depth=4)
    for _ in range(10):
        f.feed()
        r.delete("batch")  # the workers took them all
    owners = batch_of(sent.ids)
    assert (owners.count(high), owners.count(low)) == (32, 8)
    assert all(low in owners[i:i + 5] for i in range(0, 40, 5))  # never starved: a turn in every five
    with session_scope() as session:
        batches.set_priority(session, batch=batches.get_batch(session, low), priority="high")
    for _ in range(5):
        f.feed()
        r.delete("batch")
    later = batch_of(sent.ids[40:])
    assert (later.count(high), later.count(low)) == (10, 10)


def test_tenants_share_first_then_their_batches(env):
    settings, r = env
    a1, _ = make_batch(settings, 40, "tenant-a")
    a2, _ = make_batch(settings, 40, "tenant-a")
    b1, _ = make_batch(settings, 40, "tenant-b")
    f, sent = feeder(settings, depth=12)
    f.feed()
    owners = batch_of(sent.ids)
    assert owners.count(b1) == 6 and owners.count(a1) == 3 and owners.count(a2) == 3
    # one slot at a time (a worker took one message each pass): tenants alternate, tenant A's batches rotate
    f1, sent1 = feeder(settings, depth=1)
    for _ in range(8):
        r.delete("batch")
        assert f1.feed().fed == 1
    owners = batch_of(sent1.ids)
    assert {owners[i] for i in range(0, 8, 2)} == {b1} or {owners[i] for i in range(1, 8, 2)} == {b1}
    a_turns = [o for o in owners if o != b1]
    assert a_turns.count(a1) == a_turns.count(a2) == 2


def test_interactive_messages_waiting_pause_the_batch_top_up(env):
    settings, r = env
    make_batch(settings, 10)
    f, _ = feeder(settings, depth=4)
    r.lpush("interactive", "pending-interactive-message")
    assert f.feed().fed == 0 and r.llen("batch") == 0
    r.delete("interactive")
    assert f.feed().fed == 4


def test_lost_messages_are_fed_again_and_maintenance_leaves_batch_items_alone(env):
    from common import job_states
    from common.db import session_scope

    settings, r = env
    batch_id, _ = make_batch(settings, 20)
    with session_scope() as session:  # never fed: enqueued_at NULL, still not maintenance's to enqueue
        assert job_states.lost_enqueues(session, queue="batch", stale_after_s=0) == []
    f, sent = feeder(settings, depth=5)
    assert f.feed().fed == 5
    r.delete("batch")  # Redis flushed: the five messages are gone
    with session_scope() as session:
        session.execute(update(Job).where(Job.id.in_(sent.ids)).values(
            enqueued_at=func.now() - timedelta(hours=1)))
        assert job_states.lost_enqueues(session, queue="batch", stale_after_s=0) == []
    # (a fresh feeder: each checks for stale items at most every requeue_after_s / 2, and f just did)
    later, resent = feeder(settings, depth=5)
    again = later.feed()
    assert again.stale_reset == 5 and again.fed == 0  # a reset pass feeds nothing (one lock order)...
    assert later.feed().fed == 5  # ...the next pass does
    assert resent.ids == sent.ids  # the same items again, lowest lines first


def test_a_batch_cancel_and_the_feeder_lock_in_one_order(env):
    """The feeder stamps a batch row, then locks its jobs; a cancel must lock the batch row before the jobs, or
    each holds what the other waits for (a cancel of a 90,909-item batch answered 503 four times out of five)."""
    import threading

    from sqlalchemy import text

    from common import batches, job_states
    from common.db import session_factory, session_scope

    settings, _ = env
    batch_id, _ = make_batch(settings, 10)
    feeder_tx = session_factory()()
    try:
        feeder_tx.execute(text("SET lock_timeout = '5s'"))
        feeder_tx.execute(update(Batch).where(Batch.id == batch_id).values(last_fed_at=func.clock_timestamp()))
        outcome: list = []

        def cancel():
            try:
                with session_scope() as s:
                    outcome.append(batches.cancel_batch(s, batch=batches.get_batch(s, batch_id)).status)
            except Exception as exc:  # noqa: BLE001 - the test reports it
                outcome.append(exc)

        canceller = threading.Thread(target=cancel)
        canceller.start()
        time.sleep(0.5)  # the cancel takes every lock it can get before it waits
        assert len(job_states.lock_in_id_order(feeder_tx, Job.batch_id == batch_id)) == 10
        feeder_tx.commit()
        canceller.join(15)
        assert outcome == ["cancelling"]
    finally:
        feeder_tx.close()


def _finish(job_ids, *, ok: bool):
    from common import job_states
    from common.db import session_scope

    for jid in job_ids:
        with session_scope() as session:
            claim = job_states.claim(session, job_id=jid, worker_id="test", ttl_s=30)
        with session_scope() as session:
            if ok:
                job_states.complete(session, job_id=jid, token=claim.token, images=[job_states.StoredImage(
                    index=0, seed=claim.params["seed"], key=f"images/x/{jid}/0.png", sha256="ab" * 32, width=256,
                    height=256, size_bytes=10)])
            else:
                job_states.fail(session, job_id=jid, token=claim.token, retryable=False,
                                error={"type": "generation_error", "message": "boom"})


def _jobs(batch_id):
    from common.db import session_scope

    with session_scope() as session:
        return list(session.scalars(select(Job.id).where(Job.batch_id == batch_id).order_by(Job.batch_line)))


def _batch(batch_id) -> Batch:
    from common.db import session_scope

    with session_scope() as session:
        return session.get(Batch, batch_id)


def test_finalize_once_writes_the_manifest_and_rolls_status_up(env):
    from common.storage import open_storage

    settings, _ = env
    batch_id, tenant_id = make_batch(settings, 3)
    ids = _jobs(batch_id)
    f, _ = feeder(settings)
    other, _ = feeder(settings)
    _finish(ids[:2], ok=True)
    assert f.finalize() == [] and _batch(batch_id).status == "in_progress"   # one still queued
    _finish(ids[2:], ok=False)
    assert f.finalize() == [(batch_id, "completed")]
    assert other.finalize() == []                                              # a second observer: no-op
    batch = _batch(batch_id)
    assert batch.status == "completed" and batch.completed_at and batch.manifest_written_at
    manifest = [json.loads(line) for line in open_storage(settings.storage).get(batch.manifest_key).splitlines()]
    assert batch.manifest_key == f"images/{tenant_id}/batches/{batch_id}/manifest.jsonl"
    assert [m["custom_id"] for m in manifest] == ["c0", "c1", "c2"]
    assert [m["status"] for m in manifest] == ["succeeded", "succeeded", "failed"]
    assert manifest[0]["key"] == f"images/x/{ids[0]}/0.png" and manifest[0]["seed"] == 0
    assert manifest[2]["error"]["type"] == "generation_error" and manifest[2]["key"] is None


def test_all_failed_is_failed_cancel_is_cancelled_and_a_dead_finalizer_is_redone(env):
    from common import batches
    from common.db import session_scope

    settings, _ = env
    f, _ = feeder(settings, finalize_retry_s=0.0)
    failed_id, _ = make_batch(settings, 2)
    _finish(_jobs(failed_id), ok=False)
    cancel_id, _ = make_batch(settings, 4)
    _finish(_jobs(cancel_id)[:1], ok=True)
    with session_scope() as session:
        batches.cancel_batch(session, batch=session.get(Batch, cancel_id))
    stuck_id, _ = make_batch(settings, 1)
    _finish(_jobs(stuck_id), ok=True)
    with session_scope() as session:  # a finalizer took it, then died before writing anything
        assert batches.begin_finalizing(session, batch_id=stuck_id, retry_after_s=60) is not None
    done = dict(f.finalize())
    assert done == {failed_id: "failed", cancel_id: "cancelled", stuck_id: "completed"}
    assert _batch(cancel_id).cancelled_at is not None


def test_a_rerun_during_finalizing_wins_over_the_finalizer(env):
    from common import batches
    from common.db import session_scope
    from common.models import JobStatus

    settings, _ = env
    batch_id, _ = make_batch(settings, 2)
    _finish(_jobs(batch_id), ok=False)
    with session_scope() as session:
        holding = batches.begin_finalizing(session, batch_id=batch_id, retry_after_s=60)
    with session_scope() as session:
        assert batches.rerun(session, batch=session.get(Batch, batch_id), statuses=(JobStatus.FAILED,)) == 2
    with session_scope() as session:
        assert batches.finish_finalizing(session, batch=holding) is None
    batch = _batch(batch_id)
    assert batch.status == "in_progress" and batch.failed_at is None and batch.manifest_written_at is None


def test_a_big_write_refreshes_planner_statistics_a_small_one_does_not(env):
    from common import batches
    from common.db import session_scope

    def last_analyze():
        with session_scope() as session:
            return session.scalar(text("SELECT last_analyze FROM pg_stat_user_tables WHERE relname = 'jobs'"))

    before = last_analyze()
    with session_scope() as session:
        batches.refresh_statistics(session, rows_changed=batches.ANALYZE_AFTER_ROWS - 1)
    assert last_analyze() == before
    with session_scope() as session:
        batches.refresh_statistics(session, rows_changed=batches.ANALYZE_AFTER_ROWS)
    assert last_analyze() is not None and last_analyze() != before
