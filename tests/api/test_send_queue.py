"""api/send_queue.py: submits' broker sends off the request, in submit order, marked in one statement; nothing lost
when Redis is down (the jobs stay unsent for maintenance) and the queue goes on afterwards; drained at shutdown."""
from __future__ import annotations

import asyncio
import uuid

import redis

from api.job_store import JobStore
from common import job_states
from common.broker import get_celery
from common.db import session_scope
from common.models import Job
from common.settings import get_settings, settings_from_env, use_settings
from tests.common.test_job_states import PARAMS
from tests.support import make_tenant
from tests.worker.test_maintenance import messages


def _new_jobs(n: int, queue: str) -> list[uuid.UUID]:
    tenant = make_tenant()
    with session_scope() as session:
        jobs = [job_states.create_job(session, tenant_id=tenant.id, params=PARAMS, queue=queue)[0] for _ in range(n)]
        session.commit()
        return [j.id for j in jobs]


def _enqueued(ids: list[uuid.UUID]) -> dict[uuid.UUID, bool]:
    with session_scope() as session:
        return {job_id: session.get(Job, job_id).enqueued_at is not None for job_id in ids}


def _sent_ids(queue: str) -> list[str]:
    r = redis.Redis.from_url(get_settings().redis.url)
    return [m["args"][0] for m in messages(r, queue)]


async def _submit_all(store: JobStore, ids: list[uuid.UUID], queue: str) -> int:
    """Hand every job to the queue as submits do; how many were still pending when the last was handed over."""
    for job_id in ids:
        await store.sends.send(job_id, queue)
    return store.sends.pending


def test_jobs_are_sent_in_submit_order_marked_and_drained_at_close(stack_env):
    queue = f"held-send-{uuid.uuid4().hex[:6]}"
    ids = _new_jobs(40, queue)

    async def run() -> int:
        store = JobStore(get_settings().database)
        await store.open()
        pending = await _submit_all(store, ids, queue)
        await store.close()  # the lifespan's shutdown: what is pending is sent and marked first
        return pending

    pending = asyncio.run(run())
    assert pending > 0  # the submits returned before their sends: the sends happen off the request
    assert _sent_ids(queue) == [str(i) for i in ids]
    assert all(_enqueued(ids).values())


def test_with_redis_down_the_jobs_stay_unsent_and_later_ones_go_through(stack_env):
    queue = f"held-send-{uuid.uuid4().hex[:6]}"
    lost, later = _new_jobs(3, queue), _new_jobs(2, queue)
    dead = settings_from_env({**stack_env, "LETTERPRESS_REDIS__URL": "redis://127.0.0.1:1/0"})

    async def run() -> None:
        store = JobStore(get_settings().database)
        await store.open()
        get_celery.cache_clear()
        with use_settings(dead):  # the broker is unreachable for these sends
            await _submit_all(store, lost, queue)
            while store.sends.pending:
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)  # the run in flight fails and is logged
        get_celery.cache_clear()
        await _submit_all(store, later, queue)
        await store.close()

    try:
        asyncio.run(run())
    finally:
        get_celery.cache_clear()
    assert _enqueued(lost) == {job_id: False for job_id in lost}  # left for maintenance (lost_enqueues)
    with session_scope() as session:
        assert set(job_states.lost_enqueues(session, queue=queue, stale_after_s=None)) == set(lost)
    assert _sent_ids(queue) == [str(i) for i in later]
    assert all(_enqueued(later).values())


def test_a_run_redis_refuses_at_the_flush_is_left_unmarked_for_maintenance(stack_env):
    """A run goes to Redis in one pipeline, so Redis refusing its commands shows only when the pipeline is flushed,
    after every send of the run "succeeded": none of the run may be marked (maintenance sends them again)."""
    queue = f"held-send-{uuid.uuid4().hex[:6]}"
    refused, later = _new_jobs(3, queue), _new_jobs(2, queue)
    r = redis.Redis.from_url(get_settings().redis.url)
    policy = r.config_get("maxmemory-policy")["maxmemory-policy"]

    async def run() -> None:
        store = JobStore(get_settings().database)
        await store.open()
        r.config_set("maxmemory-policy", "noeviction")
        r.config_set("maxmemory", 1)  # every write is refused: OOM
        try:
            await _submit_all(store, refused, queue)
            while store.sends.pending:
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)  # the run in flight fails at its flush and is logged
        finally:
            r.config_set("maxmemory", 0)
            r.config_set("maxmemory-policy", policy)
        await _submit_all(store, later, queue)
        await store.close()

    asyncio.run(run())
    assert _enqueued(refused) == {job_id: False for job_id in refused}
    assert _sent_ids(queue) == [str(i) for i in later]
    assert all(_enqueued(later).values())


def test_a_caller_on_another_loop_has_its_job_sent_at_once(stack_env):
    queue = f"held-send-{uuid.uuid4().hex[:6]}"
    [job_id] = _new_jobs(1, queue)
    store = JobStore(get_settings().database)  # never opened on a server loop (as under TestClient outside `with`)
    asyncio.run(store.sends.send(job_id, queue))
    assert _sent_ids(queue) == [str(job_id)] and _enqueued([job_id]) == {job_id: True}


def test_sends_wait_their_linger_for_the_submits_after_them_and_go_in_one_run(stack_env):
    """With a linger, the submits of those milliseconds share one run: one send pipeline and one mark. Without one,
    a submit handed over while the queue is idle is sent in a run of its own."""
    queue = f"held-send-{uuid.uuid4().hex[:6]}"
    ids = _new_jobs(8, queue)

    async def runs(linger_s: float, job_ids: list[uuid.UUID]) -> list[int]:
        store = JobStore(get_settings().database, send_linger_s=linger_s)
        marked: list[int] = []
        mark = store.sends._mark

        async def counting_mark(sent: list[uuid.UUID]) -> None:
            marked.append(len(sent))
            await mark(sent)

        store.sends._mark = counting_mark
        await store.open()
        for handed, job_id in enumerate(job_ids, 1):  # submits 5 ms apart
            await store.sends.send(job_id, queue)
            await asyncio.sleep(0.005)
            while not linger_s and sum(marked) < handed:  # without a linger: each after the last was sent
                await asyncio.sleep(0.005)
        await asyncio.sleep(linger_s + 0.3)
        await store.close()
        return marked

    assert asyncio.run(runs(0.5, ids[:4])) == [4]
    assert asyncio.run(runs(0.0, ids[4:])) == [1, 1, 1, 1]
    assert _sent_ids(queue) == [str(i) for i in ids]
    assert all(_enqueued(ids).values())
