"""A submit the result cache can answer is answered at once by the API (common/cache_answers.py): the job is
created `succeeded` with copies of the cached images, never queued or sent, with its usage row and webhook event;
anything else queues as before. In-process API (TestClient) against the suite's real Postgres, Redis and S3; the
fleet is one announced worker scope in the real registry (what worker/presence.py writes)."""
from __future__ import annotations

import io
import uuid

import pytest
import redis as redis_lib
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import select

from api.main import create_app
from common import cache_answers, result_cache
from common.db import session_scope
from common.fleet import announce, withdraw
from common.image_files import sha256_hex
from common.job_request import JobRequest, to_params
from common.job_states import create_job
from common.models import Job, UsageRecord, WebhookEvent
from common.settings import get_settings
from common.storage import image_key, open_storage
from tests.support import make_tenant

BODY = {"prompt": "a poster that says CACHED", "width": 256, "height": 256, "preset": "V4_TURBO_12", "seed": 8080}
SCOPE = {"model": "cache-test-model", "revision": "r1", "cache_scope": "bf16/fast_path=True/compiled=True"}


@pytest.fixture(scope="module")
def http(stack_env):
    return TestClient(create_app(), raise_server_exceptions=False)


@pytest.fixture
def fleet(stack_env):
    """One worker of SCOPE in the registry (fresh: the per-process scope cache is cleared)."""
    client = redis_lib.Redis.from_url(get_settings().redis.url)
    worker_id = f"cache-test-{uuid.uuid4().hex[:6]}"
    announce(client, worker_id, {**SCOPE, "state": "ready"}, ttl_s=60)
    cache_answers._scopes.clear()
    yield
    withdraw(client, worker_id)
    cache_answers._scopes.clear()


def cached_run(tenant_id: uuid.UUID, body: dict) -> tuple[str, bytes]:
    """An earlier job of the tenant whose image is in storage and in the cache under SCOPE: (its key, bytes)."""
    settings = get_settings()
    storage = open_storage(settings.storage)
    params = to_params(JobRequest(**body), settings.api)
    out = io.BytesIO()
    Image.new("RGB", (256, 256), (12, 200, 90)).save(out, format="PNG")
    data = out.getvalue()
    with session_scope() as session:
        job, _ = create_job(session, tenant_id=tenant_id, params=params, queue="cache-test-source")
        key = image_key(storage.prefix, tenant_id, job.id, 0)
        storage.put(key, data)
        image = {"index": 0, "seed": body["seed"], "key": key, "sha256": sha256_hex(data), "width": 256,
                 "height": 256, "size_bytes": len(data)}
        result_cache.remember(session, key=result_cache.cache_key(
            tenant_id=tenant_id, params=params, model_id=SCOPE["model"], revision=SCOPE["revision"],
            worker_config=SCOPE["cache_scope"]), tenant_id=tenant_id, job_id=job.id, images=[image])
        return key, data


def submit(http, tenant, body: dict) -> dict:
    resp = http.post("/v1/jobs", json=body, headers={"Authorization": f"Bearer {tenant.key}"})
    assert resp.status_code == 202, resp.text
    return resp.json()


def test_a_hit_is_answered_at_once_with_the_same_bytes(http, fleet):
    tenant = make_tenant()
    source_key, data = cached_run(tenant.id, BODY)
    job = submit(http, tenant, {**BODY, "webhook_url": "https://hooks.example/letterpress"})
    assert job["status"] == "succeeded" and job["cache_hit"] is True, job
    assert job["timings"]["answered_by"] == "api" and job["timings"]["gpu_seconds"] == 0
    assert job["progress"]["step"] == job["progress"]["total"] == 12
    image = job["images"][0]
    assert image["key"] == image_key(open_storage(get_settings().storage).prefix, tenant.id, job["id"], 0)
    assert image["key"] != source_key and image["sha256"] == sha256_hex(data)
    assert open_storage(get_settings().storage).get(image["key"]) == data
    with session_scope() as session:
        row = session.get(Job, uuid.UUID(job["id"]))
        assert row.enqueued_at is None and row.attempts == 0  # never sent, never claimed
        usage = session.scalars(select(UsageRecord).where(UsageRecord.job_id == row.id)).all()
        assert [(u.outcome, u.cached, u.gpu_seconds, u.images) for u in usage] == [("succeeded", True, 0.0, 1)]
        events = session.scalars(select(WebhookEvent).where(WebhookEvent.job_id == row.id)).all()
        assert [(e.type, e.payload["status"], e.payload["cache_hit"]) for e in events] == [
            ("job.succeeded", "succeeded", True)]
    read = http.get(f"/v1/jobs/{job['id']}", headers={"Authorization": f"Bearer {tenant.key}"}).json()
    assert read["status"] == "succeeded" and read["images"][0]["sha256"] == image["sha256"]


def test_misses_queue_as_before(http, fleet):
    tenant = make_tenant()
    source_key, _ = cached_run(tenant.id, BODY)
    other = make_tenant()  # the same request from another tenant never sees this tenant's results
    for who, body in ((other, BODY), (tenant, {**BODY, "seed": 8081}), (tenant, {**BODY, "cache": False}),
                      (tenant, {**BODY, "prompt": "a poster that says CACHEd"})):
        job = submit(http, who, body)
        assert job["status"] == "queued" and job["cache_hit"] is False, (body, job)
        http.post(f"/v1/jobs/{job['id']}/cancel", headers={"Authorization": f"Bearer {who.key}"})
    open_storage(get_settings().storage).delete(source_key)  # the cached object is gone: a miss, not an error
    job = submit(http, tenant, BODY)
    assert job["status"] == "queued", job
    http.post(f"/v1/jobs/{job['id']}/cancel", headers={"Authorization": f"Bearer {tenant.key}"})


def test_without_an_announced_worker_of_that_scope_the_job_queues(http, stack_env):
    tenant = make_tenant()
    cached_run(tenant.id, BODY)
    cache_answers._scopes.clear()
    job = submit(http, tenant, BODY)  # no worker of SCOPE runs now: its bytes may not be what the fleet makes
    assert job["status"] == "queued", job
    http.post(f"/v1/jobs/{job['id']}/cancel", headers={"Authorization": f"Bearer {tenant.key}"})
