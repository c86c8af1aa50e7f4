"""worker.heartbeat.AttemptMonitor against the real Postgres: it renews the lease, writes progress only when it
changed and at most every `progress_interval_s`, raises its cancel flag when a cancel is requested, and stops for
good on a lost lease."""
from __future__ import annotations

import time
import uuid

import pytest
from sqlalchemy import text

from common import job_states
from common.db import session_scope
from tests.support import wait_until
from worker.heartbeat import AttemptMonitor

PARAMS = {"prompt": "p", "prompt_text": "p", "preset": "V4_TURBO_12", "width": 256, "height": 256, "steps": 12,
          "mu": 0.5, "std": 1.75, "guidance_schedule": [7.0] * 12, "seed": 1, "seed_generated": False,
          "num_images": 1}


@pytest.fixture
def claimed(tenant):
    """A running job under a short lease, in a queue nobody consumes."""
    with session_scope() as s:
        job, _ = job_states.create_job(s, tenant_id=tenant.id, params=PARAMS, queue="test-none")
        claim = job_states.claim(s, job_id=job.id, worker_id="hb-test", ttl_s=5)
    return claim


def row(job_id):
    with session_scope() as s:
        return s.execute(text("SELECT status, lease_expires_at, progress_step, progress_total, cancel_requested, "
                              "lease_expires_at - now() AS left FROM jobs WHERE id=:id"), {"id": job_id}).one()


def monitor(claim, *, ttl_s=60, heartbeat_s=60.0, progress_interval_s=60.0) -> AttemptMonitor:
    return AttemptMonitor(job_id=claim.job_id, token=claim.token, ttl_s=ttl_s, heartbeat_s=heartbeat_s,
                          progress_interval_s=progress_interval_s)


@pytest.fixture
def monitors():
    started: list[AttemptMonitor] = []
    yield started
    for m in started:
        m.stop()


# ---------------------------------------------------------------------------------------- one beat at a time

def test_a_beat_renews_the_lease_for_its_ttl(claimed):
    before = row(claimed.job_id)
    assert before.left.total_seconds() <= 5
    m = monitor(claimed, ttl_s=120)
    m.beat()
    after = row(claimed.job_id)
    assert 110 < after.left.total_seconds() <= 120
    assert after.lease_expires_at > before.lease_expires_at
    assert not m.lease_lost.is_set() and not m.cancel_requested.is_set()


def test_a_beat_writes_progress_only_when_it_changed(claimed):
    m = monitor(claimed)
    m.report(3, 12)
    m.beat()
    assert (row(claimed.job_id).progress_step, row(claimed.job_id).progress_total) == (3, 12)
    with session_scope() as s:  # a marker: a beat without news must leave the step alone
        s.execute(text("UPDATE jobs SET progress_step=99 WHERE id=:id"), {"id": claimed.job_id})
    m.beat()
    assert row(claimed.job_id).progress_step == 99
    m.report(4, 12)
    m.beat()
    assert row(claimed.job_id).progress_step == 4


def test_a_beat_before_any_report_writes_no_progress(claimed):
    m = monitor(claimed)
    m.beat()
    r = row(claimed.job_id)
    assert (r.progress_step, r.progress_total) == (0, 12)


def test_a_cancel_request_raises_the_flag_at_the_next_beat(claimed):
    m = monitor(claimed)
    m.beat()
    assert not m.cancel_requested.is_set()
    with session_scope() as s:
        job = job_states.cancel(s, job=job_states.get_job(s, claimed.job_id))
        assert job.status == "running" and job.cancel_requested  # the worker is asked, not overruled
    m.beat()
    assert m.cancel_requested.is_set() and not m.lease_lost.is_set()
    assert row(claimed.job_id).status == "running"  # the attempt itself ends it


def test_a_lost_lease_raises_lease_lost_and_writes_nothing(claimed):
    m = monitor(claimed)
    with session_scope() as s:  # another attempt took the job over
        s.execute(text("UPDATE jobs SET lease_token=:t, lease_expires_at=now() + interval '7 seconds' "
                       "WHERE id=:id"), {"t": uuid.uuid4(), "id": claimed.job_id})
    before = row(claimed.job_id)
    m.report(5, 12)
    m.beat()
    assert m.lease_lost.is_set()
    after = row(claimed.job_id)
    assert (after.lease_expires_at, after.progress_step) == (before.lease_expires_at, before.progress_step)


def test_a_finished_job_is_a_lost_lease(claimed):
    with session_scope() as s:
        job_states.complete(s, job_id=claimed.job_id, token=claimed.token, images=[])
    m = monitor(claimed)
    m.beat()
    assert m.lease_lost.is_set() and row(claimed.job_id).status == "succeeded"


def test_a_database_error_is_retried_not_fatal(claimed):
    """A beat that fails for any reason but a lost lease (a Postgres blip) is logged and retried: no lease_lost,
    and the progress it could not write is still owed. Here the write fails before it is sent (a NaN ttl)."""
    m = AttemptMonitor(job_id=claimed.job_id, token=claimed.token, ttl_s=float("nan"), heartbeat_s=60,
                       progress_interval_s=60)
    m.report(2, 12)
    m.beat()
    assert not m.lease_lost.is_set() and row(claimed.job_id).progress_step == 0
    m.ttl_s = 60
    m.beat()  # the next beat writes the progress it still owes
    assert row(claimed.job_id).progress_step == 2


# ---------------------------------------------------------------------------------------------- the thread

def test_the_thread_renews_the_lease_every_heartbeat(claimed, monitors):
    m = monitor(claimed, ttl_s=1, heartbeat_s=0.2, progress_interval_s=0.05)
    monitors.append(m)
    m.start()
    renewals = set()
    t0 = time.monotonic()
    while time.monotonic() - t0 < 2:  # twice the ttl: only renewals keep the lease alive
        r = row(claimed.job_id)
        assert r.left.total_seconds() > 0, "the lease expired"
        renewals.add(r.lease_expires_at)
        time.sleep(0.05)
    assert len(renewals) >= 5  # about one renewal per heartbeat_s
    assert not m.lease_lost.is_set()
    m.stop()
    assert not m.is_alive()


def test_the_thread_writes_progress_soon_without_waiting_for_the_heartbeat(claimed, monitors):
    m = monitor(claimed, heartbeat_s=60, progress_interval_s=0.05)
    monitors.append(m)
    m.start()
    # the first beat comes at once (step 0 was never written): the lease is renewed for its ttl
    wait_until(lambda: row(claimed.job_id).left.total_seconds() > 50, 5, what="the first beat")
    with session_scope() as s:
        s.execute(text("UPDATE jobs SET lease_expires_at = now() + interval '5 seconds' WHERE id=:id"),
                  {"id": claimed.job_id})
    time.sleep(0.3)
    assert row(claimed.job_id).left.total_seconds() <= 5  # no news and the heartbeat not due: no write
    m.report(7, 12)
    wait_until(lambda: row(claimed.job_id).progress_step == 7, 5, what="progress written")
    assert row(claimed.job_id).left.total_seconds() > 50  # the progress write renewed the lease too


def test_the_thread_throttles_progress_writes(claimed, monitors):
    """Reports at every step of a fast loop reach Postgres at most once per progress interval."""
    m = monitor(claimed, heartbeat_s=60, progress_interval_s=0.5)
    monitors.append(m)
    writes = []
    real_beat = m.beat

    def counted_beat():
        writes.append(time.monotonic())
        real_beat()

    m.beat = counted_beat
    m.start()
    t0 = time.monotonic()
    step = 0
    while time.monotonic() - t0 < 1.6:
        step += 1
        m.report(step, 1000)
        time.sleep(0.005)
    m.stop()
    assert step > 100
    assert 2 <= len(writes) <= 4, writes
    assert row(claimed.job_id).progress_step > 0
    gaps = [b - a for a, b in zip(writes, writes[1:])]
    assert all(g >= 0.4 for g in gaps), gaps


def test_the_thread_sets_the_cancel_flag(claimed, monitors):
    m = monitor(claimed, heartbeat_s=0.1, progress_interval_s=0.05)
    monitors.append(m)
    m.start()
    with session_scope() as s:
        job_states.cancel(s, job=job_states.get_job(s, claimed.job_id))
    assert m.cancel_requested.wait(5)
    assert m.is_alive()  # it keeps the lease until the attempt records the cancel


def test_the_thread_ends_itself_on_a_lost_lease(claimed, monitors):
    m = monitor(claimed, heartbeat_s=0.1, progress_interval_s=0.05)
    monitors.append(m)
    m.start()
    with session_scope() as s:
        s.execute(text("UPDATE jobs SET lease_token=:t WHERE id=:id"), {"t": uuid.uuid4(), "id": claimed.job_id})
    assert m.lease_lost.wait(5)
    m.join(timeout=5)
    assert not m.is_alive()


def test_stop_ends_the_thread_promptly_and_is_idempotent(claimed):
    m = monitor(claimed, heartbeat_s=60, progress_interval_s=30)
    m.start()
    t0 = time.monotonic()
    m.stop()
    m.stop()
    assert not m.is_alive() and time.monotonic() - t0 < 2
