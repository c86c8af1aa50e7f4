"""api/routers/webhooks.py in-process (FastAPI TestClient) against the real Postgres of the test stack: the signing
secret (show, rotate), the event and delivery logs, redelivery and disabled endpoints; tenants never see each
other's rows, and bad ids or parameters get a JSON error that names the field."""
from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from common import job_states
from common.db import session_scope
from common.models import WebhookEvent
from common.webhooks import outbox
from tests.support import make_tenant

PARAMS = {"prompt": "p", "prompt_text": "p", "preset": "V4_TURBO_12", "width": 256, "height": 256, "steps": 2,
          "mu": 0.5, "std": 1.75, "guidance_schedule": [7.0, 3.0], "seed": 1, "seed_generated": False,
          "num_images": 1}
HOOK = "http://127.0.0.1:9/hook"


@pytest.fixture(scope="module")
def app(stack_env):
    from api.main import create_app

    return TestClient(create_app())


class As:
    """Requests as one tenant."""

    def __init__(self, http: TestClient, tenant):
        self.http, self.tenant = http, tenant
        self.headers = {"Authorization": f"Bearer {tenant.key}"}

    def get(self, path, **kw):
        return self.http.get("/v1/webhooks" + path, headers=self.headers, **kw)

    def post(self, path, **kw):
        return self.http.post("/v1/webhooks" + path, headers=self.headers, **kw)

    def delete(self, path, **kw):
        return self.http.delete("/v1/webhooks" + path, headers=self.headers, **kw)


@pytest.fixture
def alice(app, tenant):
    return As(app, tenant)


@pytest.fixture
def bob(app, stack_env):
    return As(app, make_tenant())


def canceled_job_event(tenant, url=HOOK) -> tuple[uuid.UUID, str]:
    """A job with a webhook, canceled while queued: its job.canceled event is written in the same transaction."""
    with session_scope() as s:
        job, _ = job_states.create_job(s, tenant_id=tenant.id, params=PARAMS, queue="test-none", webhook_url=url)
        job_states.cancel(s, job=job)
        job_id = job.id
    with session_scope() as s:
        return job_id, s.scalar(select(WebhookEvent.id).where(WebhookEvent.job_id == job_id))


def error_of(resp, status: int, field: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    error = resp.json()["error"]
    assert error["type"] and error["message"]
    if field is not None:
        assert error.get("field") == field, error
    return error


def parse(ts: str) -> datetime:
    return datetime.fromisoformat(ts.replace("Z", "+00:00"))


# ------------------------------------------------------------------------------------------------- secret

def test_the_secret_is_created_on_first_use_and_stable(alice):
    first = alice.get("/secret")
    assert first.status_code == 200
    body = first.json()
    assert body["object"] == "webhook_secret" and body["secret"].startswith("whsec_")
    assert body["rotated_at"] is None and body["previous_secret_expires_at"] is None
    assert alice.get("/secret").json() == body


def test_each_tenant_has_its_own_secret(alice, bob):
    assert alice.get("/secret").json()["secret"] != bob.get("/secret").json()["secret"]


def test_rotate_keeps_the_previous_secret_signing_for_a_day(alice):
    old = alice.get("/secret").json()["secret"]
    before = datetime.now(timezone.utc)
    rotated = alice.post("/secret/rotate")
    assert rotated.status_code == 200
    body = rotated.json()
    assert body["secret"].startswith("whsec_") and body["secret"] != old
    assert parse(body["rotated_at"]) >= before - timedelta(seconds=5)
    window = parse(body["previous_secret_expires_at"]) - before
    assert timedelta(hours=23, minutes=59) < window <= timedelta(hours=24, seconds=5)
    assert alice.get("/secret").json()["secret"] == body["secret"]
    with session_scope() as s:  # both sign during the window
        assert outbox.signing_secrets(s, tenant_id=alice.tenant.id) == [body["secret"], old]


def test_rotate_with_no_window_drops_the_previous_secret_at_once(alice):
    old = alice.get("/secret").json()["secret"]
    body = alice.post("/secret/rotate", json={"previous_valid_for_s": 0}).json()
    assert body["secret"] != old and body["previous_secret_expires_at"] is None
    with session_scope() as s:
        assert outbox.signing_secrets(s, tenant_id=alice.tenant.id) == [body["secret"]]


@pytest.mark.parametrize("payload, field", [({"previous_valid_for_s": -1}, "previous_valid_for_s"),
                                            ({"previous_valid_for_s": 8 * 24 * 3600}, "previous_valid_for_s"),
                                            ({"previous_valid_for_s": 60, "extra": 1}, "extra")])
def test_rotate_refuses_bad_bodies_naming_the_field(alice, payload, field):
    old = alice.get("/secret").json()["secret"]
    error = error_of(alice.post("/secret/rotate", json=payload), 422, field)
    assert error["type"] == "validation_error"
    assert alice.get("/secret").json()["secret"] == old  # nothing rotated


def test_the_webhook_routes_need_a_key(app):
    for path in ("/secret", "/events", "/deliveries", "/disabled-endpoints"):
        error_of(app.get("/v1/webhooks" + path), 401)
    error_of(app.post("/v1/webhooks/secret/rotate"), 401)
    error_of(app.get("/v1/webhooks/secret", headers={"Authorization": "Bearer lp_not-a-key"}), 401)


# -------------------------------------------------------------------------------------------------- events

def test_a_new_tenant_has_no_events_deliveries_or_disabled_endpoints(alice):
    assert alice.get("/events").json() == {"object": "list", "data": [], "next_cursor": None, "has_more": False}
    assert alice.get("/deliveries").json() == {"object": "list", "data": [], "next_cursor": None,
                                               "has_more": False}
    assert alice.get("/disabled-endpoints").json() == []


def test_events_are_listed_and_shown_to_their_tenant_only(alice, bob):
    job_id, event_id = canceled_job_event(alice.tenant)
    listed = alice.get("/events").json()["data"]
    assert [e["id"] for e in listed] == [event_id]
    event = alice.get(f"/events/{event_id}").json()
    assert event["id"] == event_id and event["object"] == "webhook_event"
    assert (event["type"], event["status"], event["url"]) == ("job.canceled", "pending", HOOK)
    assert event["job_id"] == str(job_id) and event["batch_id"] is None
    assert event["data"]["id"] == str(job_id) and event["data"]["status"] == "canceled"

    assert bob.get("/events").json()["data"] == []
    error = error_of(bob.get(f"/events/{event_id}"), 404)
    assert error["type"] == "not_found" and event_id in error["message"]
    error_of(bob.post(f"/events/{event_id}/redeliver"), 404)
    assert bob.get("/events", params={"job_id": str(job_id)}).json()["data"] == []


def test_unknown_event_ids_are_404(alice):
    for event_id in ("msg_00000000000000000000000000", "not-an-id", str(uuid.uuid4()), "msg_" + "X" * 200):
        error_of(alice.get(f"/events/{event_id}"), 404)
        error_of(alice.post(f"/events/{event_id}/redeliver"), 404)
    error_of(alice.get("/events/msg_%00"), 404)  # a NUL: no id Postgres can hold, not a database error


def test_event_filters(alice):
    job_a, event_a = canceled_job_event(alice.tenant)
    _job_b, event_b = canceled_job_event(alice.tenant)
    assert [e["id"] for e in alice.get("/events", params={"job_id": str(job_a)}).json()["data"]] == [event_a]
    assert [e["id"] for e in alice.get("/events").json()["data"]] == [event_b, event_a]  # newest first
    assert len(alice.get("/events", params={"status": "pending"}).json()["data"]) == 2
    assert alice.get("/events", params={"status": "delivered"}).json()["data"] == []
    assert alice.get("/events", params={"batch_id": str(uuid.uuid4())}).json()["data"] == []


def test_events_page_with_a_cursor(alice):
    ids = [canceled_job_event(alice.tenant)[1] for _ in range(3)]
    first = alice.get("/events", params={"limit": 2}).json()
    assert first["has_more"] is True and [e["id"] for e in first["data"]] == ids[::-1][:2]
    rest = alice.get("/events", params={"limit": 2, "cursor": first["next_cursor"]}).json()
    assert rest["has_more"] is False and rest["next_cursor"] is None
    assert [e["id"] for e in rest["data"]] == [ids[0]]


@pytest.mark.parametrize("params, field", [({"job_id": "not-a-uuid"}, "job_id"),
                                           ({"batch_id": "12"}, "batch_id"),
                                           ({"status": "lost"}, "status"),
                                           ({"limit": 0}, "limit"),
                                           ({"limit": 201}, "limit"),
                                           ({"cursor": "garbage"}, "cursor")])
def test_bad_event_list_parameters_are_422_naming_the_field(alice, params, field):
    error_of(alice.get("/events", params=params), 422, field)


def test_redelivering_an_event_records_the_request(alice):
    _job, event_id = canceled_job_event(alice.tenant)
    resp = alice.post(f"/events/{event_id}/redeliver")
    assert resp.status_code == 202 and resp.json()["id"] == event_id
    with session_scope() as s:
        event = s.get(WebhookEvent, event_id)
        assert event.redeliver_requested_at is not None


# -------------------------------------------------------------------------------------------- deliveries

@pytest.mark.parametrize("params, field", [({"job_id": "nope"}, "job_id"), ({"batch_id": "nope"}, "batch_id"),
                                           ({"limit": 0}, "limit"), ({"cursor": "%%%"}, "cursor")])
def test_bad_delivery_list_parameters_are_422_naming_the_field(alice, params, field):
    error_of(alice.get("/deliveries", params=params), 422, field)


def test_deliveries_filtered_by_a_job_with_none_are_empty(alice):
    job_id, event_id = canceled_job_event(alice.tenant)
    assert alice.get("/deliveries", params={"job_id": str(job_id)}).json()["data"] == []
    assert alice.get("/deliveries", params={"event_id": event_id}).json()["data"] == []


def test_redelivering_an_unknown_delivery_is_404(alice):
    for delivery_id in ("not-a-uuid", str(uuid.uuid4())):
        error_of(alice.post(f"/deliveries/{delivery_id}/redeliver"), 404)


# ------------------------------------------------------------------------------------- disabled endpoints

def test_disabled_endpoints_listed_and_reenabled_per_tenant(alice, bob):
    with session_scope() as s:
        outbox.disable_endpoint(s, tenant_id=alice.tenant.id, url=HOOK, reason="410 Gone")
    listed = alice.get("/disabled-endpoints").json()
    assert [(d["url"], d["reason"]) for d in listed] == [(HOOK, "410 Gone")]
    assert bob.get("/disabled-endpoints").json() == []
    error_of(bob.delete("/disabled-endpoints", params={"url": HOOK}), 404, "url")  # not bob's
    assert alice.delete("/disabled-endpoints", params={"url": HOOK}).status_code == 204
    assert alice.get("/disabled-endpoints").json() == []
    error_of(alice.delete("/disabled-endpoints", params={"url": HOOK}), 404, "url")


def test_reenabling_needs_a_url(alice):
    error_of(alice.delete("/disabled-endpoints"), 422, "url")
