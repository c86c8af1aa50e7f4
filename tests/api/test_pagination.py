"""api.pagination (cursor round trip, refusal of foreign cursors, the list body) and api.schemas.jobs.check_webhook_url,
without a server; then keyset paging of /v1/webhooks lists (text and uuid ids) against the real API."""
from __future__ import annotations

import base64
import uuid
from datetime import datetime, timezone

import pytest

from api.pagination import ListPage, Page, decode_cursor, encode_cursor
from api.schemas.jobs import JobList, check_webhook_url
from common.errors import InvalidRequest
from common.settings import WebhookSettings

CREATED = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=timezone.utc)


def test_cursor_round_trip_uuid_and_text_ids():
    row_id = uuid.uuid4()
    assert decode_cursor(encode_cursor(CREATED, row_id)) == (CREATED, row_id)
    assert decode_cursor(encode_cursor(CREATED, "msg_01ABC"), str) == (CREATED, "msg_01ABC")


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode()


# fixed values only: parallel test runners (pytest-xdist) must collect the same ids
@pytest.mark.parametrize("cursor", ["garbage", "", _b64("no separator"),
                                    _b64("not a date|0f999d3a-b802-4124-aa35-9dee5060d20e"),
                                    _b64(f"{CREATED.isoformat()}|not-a-uuid"), _b64("a|b|c")])
def test_foreign_cursor_is_a_422_naming_cursor(cursor):
    with pytest.raises(InvalidRequest) as err:
        decode_cursor(cursor)
    assert err.value.status_code == 422 and err.value.field == "cursor"


def test_list_body_keeps_its_shape():
    class IntList(ListPage[int]):
        pass

    body = IntList.of(Page(rows=["a", "b"], has_more=True, next_cursor="c"), [1, 2]).model_dump()
    assert list(body) == ["object", "data", "next_cursor", "has_more"]
    assert body == {"object": "list", "data": [1, 2], "next_cursor": "c", "has_more": True}
    assert list(JobList.model_json_schema()["properties"]) == ["object", "data", "next_cursor", "has_more"]
    assert JobList.model_json_schema()["title"] == "JobList"


@pytest.mark.parametrize("url", [None, "https://example.com/hook", "http://93.184.216.34:8080/x?y=1"])
def test_webhook_url_accepted(url):
    check_webhook_url(url, WebhookSettings())


@pytest.mark.parametrize("url", ["http://169.254.169.254/latest", "ftp://example.com/x", "http://localhost/x",
                                 "http://user:pw@example.com/", "http://2130706433/"])
def test_webhook_url_refused_names_the_field(url):
    with pytest.raises(InvalidRequest) as err:
        check_webhook_url(url, WebhookSettings())
    assert err.value.status_code == 422 and err.value.field == "webhook_url"
    assert err.value.message.startswith("webhook_url refused: ")


def test_webhook_url_loopback_only_when_allowed():
    check_webhook_url("http://127.0.0.1:9000/hook", WebhookSettings(allow_loopback=True))
    with pytest.raises(InvalidRequest):
        check_webhook_url("http://127.0.0.1:9000/hook", WebhookSettings(allow_loopback=False))


def _events(tenant_id: uuid.UUID, n: int) -> list[str]:
    """n finished events of the tenant (nothing to send), the first three in one transaction (same created_at:
    the id breaks the tie), each with one delivery row. Returns their ids, oldest first."""
    from common.db import session_scope
    from common.models import WebhookDelivery, WebhookEvent

    ids = []
    for group in ([3] + [1] * (n - 3)):
        with session_scope() as s:
            for _ in range(group):
                event = WebhookEvent(id=f"msg_{uuid.uuid4().hex}", tenant_id=tenant_id, type="job.succeeded",
                                     payload={}, url="https://example.com/hook", status="delivered", attempts=1,
                                     scheduled_attempts=1)
                s.add(event)
                s.flush()
                s.add(WebhookDelivery(event_id=event.id, tenant_id=tenant_id, attempt=1, trigger="scheduled",
                                      url=event.url, status_code=200, duration_ms=1, outcome="success"))
                ids.append(event.id)
    return ids


def _all_pages(client, path: str) -> list[dict]:
    seen, cursor = [], None
    while True:
        page = client.http.get(path, params={"limit": 2, **({"cursor": cursor} if cursor else {})}).json()
        assert page["object"] == "list" and len(page["data"]) <= 2, page
        seen += page["data"]
        if not page["has_more"]:
            assert page["next_cursor"] is None
            return seen
        cursor = page["next_cursor"]


def test_webhook_lists_page_newest_first_each_once(client, tenant):
    ids = _events(tenant.id, 6)
    events = [e["id"] for e in _all_pages(client, "/v1/webhooks/events")]
    assert sorted(events) == sorted(ids) and len(events) == 6
    assert events[-3:] == sorted(ids[:3], reverse=True)  # same created_at: id descending
    assert events[:3] == list(reversed(ids[3:]))
    deliveries = _all_pages(client, "/v1/webhooks/deliveries")
    assert sorted(d["event_id"] for d in deliveries) == sorted(ids)
    for path in ("/v1/webhooks/events", "/v1/webhooks/deliveries"):
        resp = client.http.get(path, params={"cursor": "garbage"})
        assert resp.status_code == 422 and resp.json()["error"]["field"] == "cursor"
