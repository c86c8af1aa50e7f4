"""api/job_store.py: the enqueue mark, one statement that records the send and turns synchronous_commit off for its
own transaction only (the mark is advisory: a lost one means a second, harmless send by maintenance); queue places
counted once at a time, and again off the request once a place is known."""
from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import replace

import psycopg

from api.job_store import MARK_ENQUEUED, JobStore, conninfo
from common.db import session_scope
from common.job_states import create_job, mark_enqueued
from common.queue_position import position
from common.settings import get_settings
from tests.common.test_job_states import PARAMS
from tests.support import make_tenant


def test_the_mark_sets_enqueued_at_of_its_jobs_and_relaxes_only_its_own_commit(stack_env):
    tenant = make_tenant()
    with session_scope() as session:
        jobs = [create_job(session, tenant_id=tenant.id, params=PARAMS, queue="held-mark")[0] for _ in range(3)]
        session.commit()
        marked, other = [j.id for j in jobs[:2]], jobs[2].id
    with psycopg.connect(conninfo(get_settings().database.url)) as conn:  # a transaction, to look inside it
        assert conn.execute("SHOW synchronous_commit").fetchone()[0] == "on"
        assert {row[0] for row in conn.execute(MARK_ENQUEUED, {"job_ids": marked}).fetchall()} == set(marked)
        assert conn.execute("SHOW synchronous_commit").fetchone()[0] == "off"  # the FROM subquery ran
        conn.commit()
        assert conn.execute("SHOW synchronous_commit").fetchone()[0] == "on"  # and ended with its transaction
        enqueued = dict(conn.execute("SELECT id, enqueued_at IS NOT NULL FROM jobs WHERE id = ANY(%s)",
                                     ([*marked, other],)).fetchall())
    assert enqueued == {marked[0]: True, marked[1]: True, other: False}


def test_concurrent_polls_of_a_job_whose_place_expired_count_it_once(stack_env, monkeypatch):
    """api/recent_places.py: one count at a time; the polls meanwhile get the last place (a count per poll made a
    deep queue's counts multiply under load)."""
    job = _queued_job()
    store = JobStore(get_settings().database)
    counts = _slow_counts(store, monkeypatch)

    async def polls() -> list:
        first = await store.queue_place(job)
        store.places._by_job[job.id] = (0.0, first)  # expired long ago
        return [first, *await asyncio.gather(*(store.queue_place(job) for _ in range(20)))]

    places = asyncio.run(polls())
    assert len(counts) == 2  # the first poll, then one for the 20 after it expired
    assert places[0] is not None and all(place == places[0] for place in places)


def _queued_job(queue: str | None = None, tenant=None):
    tenant = tenant or make_tenant()
    with session_scope() as session:
        job = create_job(session, tenant_id=tenant.id, params=PARAMS, **({"queue": queue} if queue else {}))[0]
        session.commit()
        session.refresh(job)
        session.expunge(job)
    return job


def _slow_counts(store: JobStore, monkeypatch, delay_s: float = 0.2) -> list:
    """Make the store's counts take `delay_s` (as in a deep queue); the ids of the jobs counted."""
    counts = []
    count = store._queue_place

    async def counted(job):
        counts.append(job.id)
        await asyncio.sleep(delay_s)
        return await count(job)

    monkeypatch.setattr(store, "_queue_place", counted)
    return counts


def test_on_the_server_loop_an_expired_place_is_answered_at_once_and_counted_again_off_the_request(
        stack_env, monkeypatch):
    """Only a place never counted makes its caller wait for the count; past its second the last place is answered
    and one count runs in the background, whose result the next polls get."""
    job = _queued_job()
    store = JobStore(get_settings().database)
    counts = _slow_counts(store, monkeypatch)

    async def polls() -> tuple[float, float, list, object, int]:
        await store.open()
        try:
            started = time.monotonic()
            first = await store.queue_place(job)  # never counted: waits for its count
            first_s = time.monotonic() - started
            store.places._by_job[job.id] = (0.0, replace(first, position=first.position + 5))  # expired, stale
            started = time.monotonic()
            answers = await asyncio.gather(*(store.queue_place(job) for _ in range(20)))
            stale_s = time.monotonic() - started
            while store._background:
                await asyncio.sleep(0.05)
            return first_s, stale_s, answers, await store.queue_place(job), len(counts)
        finally:
            await store.close()

    first_s, stale_s, answers, after, count_n = asyncio.run(polls())
    assert first_s >= 0.2  # the first count was waited for
    assert stale_s < 0.2 and count_n == 2  # the 20 did not wait; one count ran for them, off the request
    assert {a.position for a in answers} == {after.position + 5}  # they got the last place...
    assert after.position == answers[0].position - 5  # ...and the poll after the count its result


def test_close_cancels_a_count_still_running_in_the_background(stack_env, monkeypatch):
    job = _queued_job()
    store = JobStore(get_settings().database)
    counts = _slow_counts(store, monkeypatch, delay_s=30)

    async def poll_then_close() -> float:
        await store.open()
        store.places.remember(job.id, None)
        store.places._by_job[job.id] = (0.0, None)  # known (it left the queue) but expired: counted in background
        assert await store.queue_place(job) is None and len(store._background) == 1
        started = time.monotonic()
        await store.close()
        return time.monotonic() - started

    assert asyncio.run(poll_then_close()) < 5 and counts == [job.id] and not store._background


def test_polls_of_many_jobs_of_a_lane_read_its_ranking_once(stack_env, monkeypatch):
    """On the server's loop, the places of a broker list's jobs come from one ranking of the list a second
    (api/recent_places.RecentRanks), each the position its own count gives (sent jobs in send order, then unsent)."""
    queue, tenant = f"held-rank-{uuid.uuid4().hex[:6]}", make_tenant()
    jobs = [_queued_job(queue, tenant) for _ in range(12)]
    with session_scope() as session:
        mark_enqueued(session, [j.id for j in jobs[4:]])  # the first four stay unsent: behind the eight sent
    store = JobStore(get_settings().database)
    reads = []
    read = store.ranks._read

    async def counted_read(lane: str):
        reads.append(lane)
        return await read(lane)

    monkeypatch.setattr(store.ranks, "_read", counted_read)

    async def polls() -> list:
        await store.open()
        try:
            return await asyncio.gather(*(store.queue_place(job) for job in jobs))
        finally:
            await store.close()

    places = asyncio.run(polls())
    with session_scope() as session:
        counted = [position(session, job_id=j.id, queue=queue, batch_item=False) for j in jobs]
    assert [p.position for p in places] == counted
    assert counted[4:] == list(range(counted[4], counted[4] + 8)) and counted[0] == counted[4] + 8
    assert reads == [queue]


def test_a_ranking_that_fails_to_be_read_leaves_the_place_out_and_the_next_poll_reads_it_again(
        stack_env, monkeypatch):
    """The database failing during a lane's ranking costs the poll its position only (the job is still answered),
    and nothing stays stuck: the next poll reads the ranking again."""
    queue = f"held-rank-{uuid.uuid4().hex[:6]}"
    job = _queued_job(queue)
    store = JobStore(get_settings().database)
    read, reads = store.ranks._read, []

    async def failing_once(lane: str):
        reads.append(lane)
        if len(reads) == 1:
            raise psycopg.OperationalError("the database went away")
        return await read(lane)

    monkeypatch.setattr(store.ranks, "_read", failing_once)

    async def polls() -> list:
        await store.open()
        try:
            return [await store.queue_place(job), await store.queue_place(job)]
        finally:
            await store.close()

    first, second = asyncio.run(polls())
    assert first is None and second is not None and second.position >= 0 and len(reads) == 2
