"""api/job_store.py's enqueue mark: one statement that records the send and turns synchronous_commit off for its own
transaction only (the mark is advisory: a lost one means a second, harmless send by maintenance)."""
from __future__ import annotations

import asyncio

import psycopg

from api.job_store import MARK_ENQUEUED, conninfo
from common.db import session_scope
from common.job_states import create_job
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
    from api.job_store import JobStore

    tenant = make_tenant()
    with session_scope() as session:
        job = create_job(session, tenant_id=tenant.id, params=PARAMS)[0]
        session.commit()
        session.refresh(job)
        session.expunge(job)
    store = JobStore(get_settings().database)
    counts = []
    count = store._queue_place

    async def counted(job):
        counts.append(job.id)
        await asyncio.sleep(0.2)  # a count that takes a while, as in a deep queue
        return await count(job)

    monkeypatch.setattr(store, "_queue_place", counted)

    async def polls() -> list:
        first = await store.queue_place(job)
        store.places._by_job[job.id] = (0.0, first)  # expired long ago
        return [first, *await asyncio.gather(*(store.queue_place(job) for _ in range(20)))]

    places = asyncio.run(polls())
    assert len(counts) == 2  # the first poll, then one for the 20 after it expired
    assert places[0] is not None and all(place == places[0] for place in places)
