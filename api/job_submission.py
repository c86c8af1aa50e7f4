"""Submitting one job, for every front end that takes one (`POST /v1/jobs` and the console's form): the same
validation, quota, adapter and remix rules, and the same two paths.

- Without an Idempotency-Key, adapters or an input image: one statement inserts the job for the key's tenant
  (api/job_store.py); its message is sent and marked after the answer, with those of other submits
  (api/send_queue.py).
- With any of them, or an explicit seed (a request the result cache may answer): the ORM path of
  common.job_states (whose replay and race rules apply), adapters resolved by name inside the tenant, a remix's
  image read, checked and stored (common.input_images), and a cache hit answered at once, never queued
  (common.cache_answers).
"""
from __future__ import annotations

from fastapi.concurrency import run_in_threadpool

from api import metrics
from api.job_store import JobStore
from api.schemas.jobs import check_webhook_url
from common import cache_answers, job_states, quotas
from common.adapters import resolve_loras
from common.auth import authenticate_hash
from common.broker import interactive_queue
from common.db import session_scope
from common.dispatch import dispatch
from common.input_images import resolve_image
from common.job_request import JobRequest, to_params
from common.models import Job, JobStatus
from common.settings import Settings
from common.storage import Storage


async def submit_job(body: JobRequest, *, key_hash: str, store: JobStore, settings: Settings, storage: Storage,
                     idempotency_key: str | None = None) -> tuple[Job, bool]:
    """The job and whether it was created now (False: the same request replayed under its Idempotency-Key)."""
    params = to_params(body, settings.api)
    check_webhook_url(body.webhook_url, settings.webhooks)
    submitted = dict(params=params, queue=interactive_queue(body.priority), idempotency_key=idempotency_key,
                     metadata=body.metadata, webhook_url=body.webhook_url, max_attempts=settings.worker.max_attempts)
    # the fleet's result-cache scopes, when the cache may answer this request (a Redis read cached a few seconds)
    scopes = await _fleet_scopes(settings) if _cacheable(params, settings) else []
    if idempotency_key is not None or "loras" in params or "image" in params or scopes:
        job, created = await run_in_threadpool(_create_in_session, key_hash, submitted, storage, settings, scopes)
    else:
        job, created = await store.insert(key_hash, job_states.new_job_values(**submitted)), True
        # after the commit, off the request (api/send_queue.py): if Redis is down the job stays queued, unsent,
        # and maintenance sends it later
        await store.sends.send(job.id, job.queue)
    if created:
        metrics.JOBS_ACCEPTED.inc()
        if job.status == JobStatus.SUCCEEDED:
            metrics.JOBS_FROM_CACHE.inc()
    return job, created


async def _fleet_scopes(settings: Settings) -> list:
    """cache_answers.fleet_scopes, on a thread only when its reading is stale (every few seconds): a thread hop
    costs the event loop about 0.3 ms of CPU."""
    known = cache_answers.known_fleet_scopes(settings.redis.url)
    return known if known is not None else await run_in_threadpool(cache_answers.fleet_scopes, settings.redis.url)


def _cacheable(params: dict, settings: Settings) -> bool:
    """A request the result cache may answer (common/result_cache.py: only explicit seeds, `cache` not false)."""
    return settings.worker.result_cache and not params.get("seed_generated", True) and params.get("cache") is not False


def _create_in_session(key_hash: str, submitted: dict, storage: Storage, settings: Settings,
                       scopes: list) -> tuple[Job, bool]:
    with session_scope() as session:
        tenant = authenticate_hash(session, key_hash, "submit")
        params = submitted["params"]
        quotas.check_limits(session, tenant, params["num_images"])
        if "loras" in params:
            params = {**params, "loras": resolve_loras(session, tenant_id=tenant.id, loras=params["loras"])}
        if "image" in params:
            params = {**params, "image": resolve_image(params["image"], session=session, tenant_id=tenant.id,
                                                        storage=storage, settings=settings)}
        submitted = {**submitted, "params": params}
        job, created = job_states.create_job(session, tenant_id=tenant.id, **submitted)
        answered = created and bool(scopes) and _answer_from_cache(session, storage, job, scopes)
        session.commit()
        if created and not answered:
            dispatch([(job.id, job.queue)], session=session)
    return job, created


def _answer_from_cache(session, storage: Storage, job: Job, scopes: list) -> bool:
    entry = cache_answers.find_answer(session, tenant_id=job.tenant_id, params=job.params, scopes=scopes)
    return entry is not None and cache_answers.answer(session, storage, job=job, entry=entry)
