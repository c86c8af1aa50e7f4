"""Answering a submit from the result cache at once, in the API: no queue, no worker, the same bytes.

A cache entry's key names the worker configuration that made it (model, revision, variant, path, compile:
common/result_cache.py), and the API does not run a model, so it asks the fleet: every worker announces the scope
of its cache key in the registry (worker/presence.py, common.fleet). For a cacheable request (an explicit seed,
`cache` not false, the cache on), the API computes the key under each scope the fleet runs now and looks them up
in one statement. A hit whose source objects are all still in storage becomes the new job's images (copied to the
job's own keys), and the job is created `succeeded` with `cache_hit` in one transaction with its usage row
(`cached`, no device time) and its `job.succeeded` webhook event. Anything else (no worker announced, a miss, an
object gone, a storage error) leaves the job to the queue as before, where a worker may still find it in the
cache under its own configuration. Scopes are read at most every SCOPES_TTL_S per process (the registry is a
Redis scan).
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any

import redis as redis_lib
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from common import result_cache
from common.errors import StorageError
from common.fleet import workers_seen
from common.job_states import StoredImage
from common.models import Job, JobImage, JobStatus, ResultCacheEntry
from common.storage import Storage, image_key
from common.usage import DeviceTime, record_attempt
from common.webhooks import outbox

log = logging.getLogger(__name__)
SCOPES_TTL_S = 5.0
ANSWERED_BY = "api"
_scopes: dict[str, tuple[float, list[tuple[str, str | None, str]]]] = {}
_lock = threading.Lock()


def fleet_scopes(redis_url: str) -> list[tuple[str, str | None, str]]:
    """(model, revision, config) of every worker announced now (each worker's result-cache scope); [] when Redis
    cannot tell (then the queue answers, as without this module)."""
    now = time.monotonic()
    found = known_fleet_scopes(redis_url)
    if found is not None:
        return found
    try:
        client = redis_lib.Redis.from_url(redis_url, socket_connect_timeout=1, socket_timeout=1)
        try:
            workers = workers_seen(client)
        finally:
            client.close()
        scopes = sorted({(w["model"], w.get("revision"), w["cache_scope"]) for w in workers
                         if w.get("model") and w.get("cache_scope")}, key=str)
    except redis_lib.RedisError as exc:
        log.warning("result cache at submit: the worker registry cannot be read (%s); queueing", exc)
        scopes = []
    with _lock:
        _scopes[redis_url] = (now, scopes)
    return scopes


def known_fleet_scopes(redis_url: str) -> list[tuple[str, str | None, str]] | None:
    """`fleet_scopes` while its last reading is fresh, else None: no Redis call, so an async caller can ask on its
    event loop and hop to a thread only when Redis must be read."""
    with _lock:
        found = _scopes.get(redis_url)
    return found[1] if found is not None and time.monotonic() - found[0] < SCOPES_TTL_S else None


def find_answer(session: Session, *, tenant_id: uuid.UUID, params: dict[str, Any],
                scopes: list[tuple[str, str | None, str]]) -> ResultCacheEntry | None:
    keys = {key for model, revision, config in scopes
            if (key := result_cache.cache_key(tenant_id=tenant_id, params=params, model_id=model, revision=revision,
                                              worker_config=config)) is not None}
    if not keys:
        return None
    return session.scalars(select(ResultCacheEntry).where(ResultCacheEntry.key.in_(keys))
                           .order_by(ResultCacheEntry.created_at.desc()).limit(1)).first()


def answer(session: Session, storage: Storage, *, job: Job, entry: ResultCacheEntry) -> bool:
    """Complete the new (uncommitted, unsent) `job` with copies of the entry's images; False (nothing changed in
    the session) when a source object is gone or storage fails: the job then goes to the queue."""
    started = time.perf_counter()
    try:
        if not all(storage.exists(image["key"]) for image in entry.images):
            return False
        stored = []
        for image in entry.images:
            target = image_key(storage.prefix, job.tenant_id, job.id, image["index"], image["key"].rsplit(".", 1)[-1])
            storage.copy(image["key"], target)
            stored.append(StoredImage(**{**image, "key": target}))
    except StorageError as exc:
        log.warning("job %s: result cache entry not usable at submit (%s); queueing", job.id, exc)
        return False
    timings = {"cached": True, "cache_source_job": str(entry.job_id), "answered_by": ANSWERED_BY,
               "store_s": round(time.perf_counter() - started, 3), "gpu_seconds": 0.0, "gpu_kind": "none"}
    session.execute(update(Job).where(Job.id == job.id).values(
        status=JobStatus.SUCCEEDED, started_at=func.now(), finished_at=func.now(), progress_step=Job.progress_total,
        timings=timings))
    session.add_all(JobImage(job_id=job.id, **vars(image)) for image in stored)
    record_attempt(session, job_id=job.id, attempt=0, outcome="succeeded", worker_id=ANSWERED_BY,
                   used=DeviceTime(gpu_kind="none", capacity="on_demand", seconds=0.0), images=len(stored),
                   cached=True)
    session.flush()
    session.refresh(job)  # the row as updated above, images included, for the answer and the webhook payload
    if job.webhook_url:
        outbox.record_job_event(session, job_id=job.id, type="job.succeeded")
    return True
