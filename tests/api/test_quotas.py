"""Quotas of active jobs per tenant (common/quotas.py): the in-process API against the suite's Postgres. A tenant
at its limit gets 429 with Retry-After on both submit paths (the one-statement insert and the ORM path) and keeps
every job it had; finishing jobs frees room; an admin sets a tenant's own limit; the feeder gives a limited
tenant no more turns than it has room for. Real workers draining a limited tenant: tests/worker/test_quotas_e2e.py."""
from __future__ import annotations

import uuid

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from api.main import create_app
from common import batches
from common.auth import create_api_key, get_or_create_tenant
from common.db import session_scope
from common.models import Job, JobStatus
from common.settings import get_settings, use_settings
from tests.support import make_tenant

JOB = {"prompt": "a poster that says QUOTA", "width": 256, "height": 256, "preset": "V4_TURBO_12"}


@pytest.fixture(scope="module")
def http(stack_env):
    return TestClient(create_app(), raise_server_exceptions=False)


def auth(tenant) -> dict:
    return {"Authorization": f"Bearer {tenant.key}"}


def with_default(limit: int):
    settings = get_settings()
    return use_settings(settings.model_copy(update={
        "limits": settings.limits.model_copy(update={"max_active_jobs": limit})}))


def jobs_of(tenant_id) -> list[str]:
    with session_scope() as session:
        return [str(i) for i in session.scalars(select(Job.id).where(Job.tenant_id == tenant_id))]


def test_a_tenant_at_its_limit_gets_429_on_both_paths_and_keeps_its_jobs(http):
    tenant = make_tenant()
    with with_default(2):
        accepted = [http.post("/v1/jobs", json=JOB, headers=auth(tenant)) for _ in range(2)]
        assert [a.status_code for a in accepted] == [202, 202]
        for headers in (auth(tenant), {**auth(tenant), "Idempotency-Key": "quota-1"}):
            refused = http.post("/v1/jobs", json=JOB, headers=headers)
            assert refused.status_code == 429, refused.text
            assert refused.json()["error"]["field"] == "quota" and "limit" in refused.json()["error"]["message"]
            assert int(refused.headers["retry-after"]) > 0
        assert sorted(jobs_of(tenant.id)) == sorted(a.json()["id"] for a in accepted)
        other = make_tenant()  # another tenant is not affected
        assert http.post("/v1/jobs", json=JOB, headers=auth(other)).status_code == 202
        with session_scope() as session:  # one finishes: room for one more
            session.execute(update(Job).where(Job.id == uuid.UUID(accepted[0].json()["id"]))
                            .values(status=JobStatus.SUCCEEDED))
        assert http.post("/v1/jobs", json=JOB, headers=auth(tenant)).status_code == 202
        assert http.post("/v1/jobs", json=JOB, headers=auth(tenant)).status_code == 429


def test_an_admin_sets_a_tenants_own_limit_over_the_default(http):
    tenant = make_tenant()
    with session_scope() as session:
        admin = create_api_key(session, tenant=get_or_create_tenant(session, f"ops-{tenant.name}"), name="ops",
                               scopes=["read", "admin"])
    patched = http.patch(f"/v1/admin/tenants/{tenant.id}", json={"limits": {"max_active_jobs": 1}},
                         headers={"Authorization": f"Bearer {admin}"})
    assert patched.status_code == 200 and patched.json()["limits"] == {"max_active_jobs": 1}, patched.text
    assert http.post("/v1/jobs", json=JOB, headers=auth(tenant)).status_code == 202  # default: no limit
    assert http.post("/v1/jobs", json=JOB, headers=auth(tenant)).status_code == 429  # its own: 1
    back = http.patch(f"/v1/admin/tenants/{tenant.id}", json={"limits": {"max_active_jobs": None}},
                      headers={"Authorization": f"Bearer {admin}"})
    assert back.json()["limits"] == {}
    assert http.post("/v1/jobs", json=JOB, headers=auth(tenant)).status_code == 202
    bad = http.patch(f"/v1/admin/tenants/{tenant.id}", json={"limits": {"max_active_jobs": -1}},
                     headers={"Authorization": f"Bearer {admin}"})
    assert bad.status_code == 422
    assert http.patch(f"/v1/admin/tenants/{uuid.uuid4()}", json={"limits": {}},
                      headers={"Authorization": f"Bearer {admin}"}).status_code == 404


def test_batch_items_count_as_they_are_fed(http):
    """A 10-line batch is accepted whole; the feeder then gives the tenant no more than its room."""
    tenant = make_tenant()
    with with_default(3):
        lines = [{"custom_id": f"b{i}", **JOB} for i in range(10)]
        assert http.post("/v1/batches", json={"items": lines}, headers=auth(tenant)).status_code == 202
        assert http.post("/v1/jobs", json=JOB, headers=auth(tenant)).status_code == 202  # one interactive
        with session_scope() as session:
            fed = [jid for jid, _ in batches.feed_candidates(session, room=50)]
            mine = set(session.scalars(select(Job.id).where(Job.tenant_id == tenant.id, Job.batch_id.is_not(None))))
            assert len([jid for jid in fed if jid in mine]) == 2  # 3 - the interactive one
            session.execute(update(Job).where(Job.id.in_(fed)).values(enqueued_at=func.now()))  # as dispatch does
        with session_scope() as session:
            again = [jid for jid, _ in batches.feed_candidates(session, room=50)]
            assert not set(again) & mine  # at its limit: no more turns until something finishes


def test_images_a_day_count_what_was_made_and_what_is_queued(http):
    """Images stored in the last 24 hours (the usage ledger) plus those of active jobs, plus the new job's, within
    the limit; usage older than a day no longer counts."""
    from datetime import timedelta

    from common.models import UsageRecord
    from common.usage import DeviceTime, record_attempt

    tenant = make_tenant()
    settings = get_settings()
    with use_settings(settings.model_copy(update={
            "limits": settings.limits.model_copy(update={"max_images_per_day": 10})})):
        first = http.post("/v1/jobs", json={**JOB, "num_images": 4}, headers=auth(tenant))
        assert first.status_code == 202, first.text
        with session_scope() as session:  # it ran: 4 images in the ledger, the job done
            job_id = uuid.UUID(first.json()["id"])
            session.execute(update(Job).where(Job.id == job_id).values(status=JobStatus.SUCCEEDED))
            record_attempt(session, job_id=job_id, attempt=1, outcome="succeeded", worker_id="w",
                           used=DeviceTime(gpu_kind="cpu", capacity="on_demand", seconds=1.0), images=4)
        assert http.post("/v1/jobs", json={**JOB, "num_images": 5}, headers=auth(tenant)).status_code == 202  # 9
        for headers in (auth(tenant), {**auth(tenant), "Idempotency-Key": "images-1"}):
            refused = http.post("/v1/jobs", json={**JOB, "num_images": 2}, headers=headers)  # 11 > 10
            assert refused.status_code == 429 and "images" in refused.json()["error"]["message"], refused.text
        assert http.post("/v1/jobs", json={**JOB, "num_images": 1}, headers=auth(tenant)).status_code == 202  # 10
        with session_scope() as session:  # a day later the ledger's 4 no longer count
            session.execute(update(UsageRecord).where(UsageRecord.job_id == job_id)
                            .values(recorded_at=UsageRecord.recorded_at - timedelta(days=1, minutes=1)))
        assert http.post("/v1/jobs", json={**JOB, "num_images": 4}, headers=auth(tenant)).status_code == 202
