"""One of every object an API path parameter names, owned by one tenant: for the fuzzer (tests/api/test_fuzz.py:
id routes on real objects) and the cross-tenant walker (tests/api/test_tenant_isolation.py).

`PATH_PARAMETERS` is the list of path parameters these fill; a route with any other one fails both tests until it
is added here (with an object to point it at)."""
from __future__ import annotations

import functools
import tempfile
import uuid
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import select

from common import batches, job_states
from common.db import session_scope
from common.auth import create_api_key, hash_key
from common.models import ApiKey, Batch, BatchStatus, Job, JobImage, JobStatus, Tenant, WebhookDelivery
from common.webhooks import outbox
from common.settings import get_settings
from tests.support import TenantKey
from tests.tiny_loras import tiny_transformer, write_lora

JOB = {"prompt": "a poster that says HELLO", "width": 256, "height": 256, "preset": "V4_TURBO_12", "seed": 3}
HOOK = "http://127.0.0.1:9/hook"  # nothing listens; nothing consumes the delivery queue in the fast tier either
PATH_PARAMETERS = frozenset({"job_id", "batch_id", "event_id", "delivery_id", "index", "name", "key_id",
                             "tenant_id"})
# A valid body for each id route that needs one ("METHOD path" as the OpenAPI document spells it), so the walker's
# call reaches the ownership check instead of stopping at validation
REQUEST_BODIES = {"POST /v1/batches/{batch_id}/priority": {"priority": "low"}}


@functools.cache
def tiny_lora_bytes() -> bytes:
    """A LoRA file for the configured (tiny) model, made once per process."""
    with tempfile.TemporaryDirectory() as tmp:
        transformer = tiny_transformer(Path(get_settings().model.id))
        return write_lora(Path(tmp) / "lora.safetensors", transformer).read_bytes()


def register_adapter(http: TestClient, tenant: TenantKey, name: str, data: bytes | None = None, **fields):
    return http.post("/v1/adapters", data={"name": name, **fields},
                     files={"file": ("lora.safetensors", data if data is not None else tiny_lora_bytes())},
                     headers={"Authorization": f"Bearer {tenant.key}"})


def make_objects(http: TestClient, tenant: TenantKey) -> dict[str, str]:
    """A job (with one image row, in S3 storage), a batch of one inline item, a webhook event of the job and one
    delivery attempt of it, an adapter, a second API key (for /v1/admin), all the tenant's: {path parameter name: value}. The tenant's name is in
    the metadata of each (a marker of its data in an answer); the adapter's name is another."""
    headers = {"Authorization": f"Bearer {tenant.key}"}
    adapter = register_adapter(http, tenant, f"lora-{uuid.uuid4().hex[:8]}")
    assert adapter.status_code == 201, adapter.text
    owner = {"owner": tenant.name}
    job = http.post("/v1/jobs", json={**JOB, "webhook_url": HOOK, "metadata": owner}, headers=headers)
    assert job.status_code == 202, job.text
    batch = http.post("/v1/batches", json={"items": [{"custom_id": "only", **JOB}], "webhook_url": HOOK,
                                           "metadata": owner}, headers=headers)
    assert batch.status_code == 202, batch.text
    job_id = uuid.UUID(job.json()["id"])
    with session_scope() as session:
        session.add(JobImage(job_id=job_id, index=0, seed=3, key=f"tests/{job_id}/0.png", sha256="0" * 64,
                             width=256, height=256, size_bytes=68))
        event = outbox.record_event(session, tenant_id=tenant.id, type="job.succeeded",
                                    payload={"id": str(job_id), **owner}, job_id=job_id, webhook_url=HOOK)
        delivery = WebhookDelivery(event_id=event.id, tenant_id=tenant.id, attempt=1, trigger="scheduled", url=HOOK,
                                   ip="127.0.0.1", status_code=503, error=None, duration_ms=12,
                                   response_excerpt="busy", outcome="retry")
        session.add(delivery)
        session.flush()
        key = create_api_key(session, tenant=session.get(Tenant, tenant.id), name="second key")
        key_id = session.scalar(select(ApiKey.id).where(ApiKey.key_hash == hash_key(key)))
        ids = {"key_id": str(key_id), "tenant_id": str(tenant.id), "job_id": str(job_id), "batch_id": batch.json()["id"], "event_id": event.id,
               "delivery_id": str(delivery.id), "index": "0", "name": adapter.json()["name"]}
    assert set(ids) == PATH_PARAMETERS
    return ids


def cancel_everything(tenant_id: uuid.UUID) -> None:
    """Cancel the tenant's unfinished batches and queued jobs, so that no worker of a later test (the slow tier
    runs real ones) spends its time on what a fuzzer or a walker submitted."""
    with session_scope() as session:
        for batch in session.scalars(select(Batch).where(
                Batch.tenant_id == tenant_id,
                Batch.status.in_((BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS)))).all():
            batches.cancel_batch(session, batch=batch)
        for job in session.scalars(select(Job).where(Job.tenant_id == tenant_id,
                                                     Job.status == JobStatus.QUEUED)).all():
            job_states.cancel(session, job=job)
