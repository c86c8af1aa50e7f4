"""A tenant with a limit of active jobs runs a batch bigger than the limit with a real worker: the whole batch is
accepted, the feeder never lets more than the limit of its jobs be active at once, every item completes, and
a submit at the limit is a 429 that changes nothing."""
from __future__ import annotations

import time

from sqlalchemy import func, select, update

from common.db import session_scope
from common.models import Job, Tenant
from common.quotas import active_jobs
from tests.support import wait_until

ITEM = {"prompt": "a poster that says LIMIT", "width": 256, "height": 256, "preset": "V4_TURBO_12", "steps": 2}


def active(tenant_id) -> int:
    with session_scope() as session:
        return session.scalar(select(func.count()).select_from(Job).where(active_jobs(tenant_id)))


def test_a_limited_tenant_never_exceeds_its_limit_and_loses_nothing(client, worker, tenant):
    with session_scope() as session:
        session.execute(update(Tenant).where(Tenant.id == tenant.id).values(limits={"max_active_jobs": 2}))
    batch = client.http.post("/v1/batches", json={"items": [{"custom_id": f"q{i}", **ITEM} for i in range(6)]})
    assert batch.status_code == 202, batch.text
    seen, refused = [], None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        seen.append(active(tenant.id))
        if refused is None and seen[-1] >= 2:
            refused = client.submit(ITEM)
        body = client.http.get(f"/v1/batches/{batch.json()['id']}").json()
        if body["status"] in ("completed", "failed", "cancelled"):
            break
        time.sleep(0.05)
    assert body["status"] == "completed" and body["request_counts"]["succeeded"] == 6, body
    assert max(seen) <= 2, seen
    assert refused is not None and refused.status_code == 429, refused and refused.text
    with session_scope() as session:  # the refused submit made no job
        assert session.scalar(select(func.count()).select_from(Job).where(
            Job.tenant_id == tenant.id, Job.batch_id.is_(None))) == 0
    wait_until(lambda: active(tenant.id) == 0, 30, what="nothing active")
    assert client.submit(ITEM).status_code == 202  # room again
