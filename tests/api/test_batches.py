"""REST contract of /v1/batches against a real API process, Postgres and S3 (moto): input forms, line-numbered
validation, skip_invalid, idempotency, listing, cancel, results. No worker is needed; batches made here are
canceled at teardown so a worker started later in the session never runs them."""
from __future__ import annotations

import json
import uuid

import boto3
import pytest
from sqlalchemy import select

from tests.support import ApiClient, make_tenant

LINE = {"prompt": "a poster that says HELLO", "width": 256, "height": 256, "preset": "V4_TURBO_12", "steps": 2}


def items(n: int, prefix: str = "item") -> list[dict]:
    return [{**LINE, "custom_id": f"{prefix}-{i}", "seed": i} for i in range(n)]


def jsonl(rows: list) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()


@pytest.fixture
def bclient(client):
    """The tenant's client; at teardown its unfinished batches are canceled (nothing left for a worker)."""
    yield client
    for batch in client.http.get("/v1/batches", params={"limit": 200}).json()["data"]:
        if batch["status"] in ("in_progress", "validating"):
            client.http.post(f"/v1/batches/{batch['id']}/cancel")


def db_jobs(batch_id: str):
    from common.db import session_scope
    from common.models import Job

    with session_scope() as session:
        return [dict(custom_id=j.custom_id, line=j.batch_line, queue=j.queue, status=j.status,
                     enqueued_at=j.enqueued_at, seed=j.params["seed"], tenant_id=j.tenant_id)
                for j in session.scalars(select(Job).where(Job.batch_id == uuid.UUID(batch_id))
                                         .order_by(Job.batch_line))]


def test_inline_items_202_batch_object_and_nothing_enqueued_at_submit(bclient, tenant):
    resp = bclient.http.post("/v1/batches", json={"items": items(3), "metadata": {"run": "nightly"}})
    assert resp.status_code == 202, resp.text
    batch = resp.json()
    assert batch["object"] == "batch" and batch["status"] == "in_progress"
    assert batch["request_counts"] == {"total": 3, "queued": 3, "running": 0, "succeeded": 0, "failed": 0,
                                       "canceled": 0}
    assert batch["metadata"] == {"run": "nightly"} and batch["input_source"] == "inline"
    assert batch["manifest_key"] == f"images/{tenant.id}/batches/{batch['id']}/manifest.jsonl"
    assert batch["results_url"].endswith(f"/v1/batches/{batch['id']}/results")
    assert batch["created_at"] and batch["in_progress_at"] and batch["completed_at"] is None
    assert resp.headers["location"] == batch["urls"]["self"]
    assert bclient.http.get(f"/v1/batches/{batch['id']}").json()["request_counts"]["total"] == 3
    rows = db_jobs(batch["id"])
    assert [r["custom_id"] for r in rows] == ["item-0", "item-1", "item-2"] and [r["line"] for r in rows] == [1, 2, 3]
    assert {r["queue"] for r in rows} == {"batch"} and {r["tenant_id"] for r in rows} == {tenant.id}
    # the feeder, not the API, hands batch items to the broker
    assert all(r["enqueued_at"] is None for r in rows)


def test_multipart_jsonl_upload_keeps_file_line_numbers_and_accepts_openai_envelope(bclient):
    rows = [items(1)[0], "", {"custom_id": "env", "method": "POST", "url": "/v1/images",
                              "body": {**LINE, "seed": 5}}, "   ", {**LINE, "custom_id": "last"}]
    resp = bclient.http.post("/v1/batches", files={"file": ("prompts.jsonl", jsonl(rows), "application/x-ndjson")},
                             data={"metadata": json.dumps({"k": 1})})
    assert resp.status_code == 202, resp.text
    batch = resp.json()
    assert batch["input_source"] == "upload:prompts.jsonl" and batch["metadata"] == {"k": 1}
    got = db_jobs(batch["id"])
    assert [(r["custom_id"], r["line"]) for r in got] == [("item-0", 1), ("env", 3), ("last", 5)]
    assert got[1]["seed"] == 5


BAD = [
    (2, None, "{not json"),
    (3, "custom_id", {**LINE}),
    (4, "width", {**LINE, "custom_id": "w", "width": 250}),
    (5, "custom_id", {**LINE, "custom_id": "item-0"}),
    (6, None, {**LINE, "custom_id": "pc", "caption": {"high_level_description": "d",
                                                       "compositional_deconstruction": {"background": "b"}}}),
    (7, "colour", {**LINE, "custom_id": "x", "colour": "red"}),
    (8, "webhook_url", {**LINE, "custom_id": "wh", "webhook_url": "https://example.com/hook"}),
    (9, None, "[1, 2]"),
]


def bad_input() -> list:
    return [items(1)[0]] + [row for _, _, row in BAD] + [items(2)[1]]


def test_bad_lines_are_refused_422_with_line_numbers_and_nothing_is_inserted(bclient):
    resp = bclient.http.post("/v1/batches", files={"file": ("bad.jsonl", jsonl(bad_input()))})
    assert resp.status_code == 422, resp.text
    error = resp.json()["error"]
    assert error["type"] == "invalid_batch" and error["field"] == "input"
    assert error["invalid_count"] == len(BAD)
    by_line = {}
    for e in error["errors"]:
        by_line.setdefault(e["line"], []).append(e)
    assert sorted(by_line) == [line for line, _, _ in BAD]
    for line, field, _ in BAD:
        if field:
            assert any(e.get("field") == field for e in by_line[line]), (line, by_line[line])
    assert "first on line 1" in by_line[5][0]["message"]
    assert "JSON" in by_line[2][0]["message"]
    assert bclient.http.get("/v1/batches").json()["data"] == []


def test_skip_invalid_ingests_the_valid_lines_and_reports_the_others(bclient):
    resp = bclient.http.post("/v1/batches", json={"items": bad_input(), "skip_invalid": True})
    assert resp.status_code == 202, resp.text
    batch = resp.json()
    assert batch["request_counts"]["total"] == 2
    assert batch["invalid"]["count"] == len(BAD)
    assert sorted({e["line"] for e in batch["invalid"]["lines"]}) == [line for line, _, _ in BAD]
    assert [r["custom_id"] for r in db_jobs(batch["id"])] == ["item-0", "item-1"]


@pytest.mark.parametrize("body, field", [
    ({}, "input"),
    ({"items": items(1), "input_url": "s3://letterpress-test/x.jsonl"}, "input"),
    ({"items": []}, "input"),
    ({"items": items(1), "webhook_url": "http://169.254.169.254/latest"}, "webhook_url"),
    ({"items": items(1), "surprise": 1}, "surprise"),
    ({"input_url": "https://example.com/x.jsonl"}, "input_url"),
    ({"input_url": "s3://letterpress-test/missing.jsonl"}, "input_url"),
])
def test_request_level_errors_name_the_field(bclient, body, field):
    resp = bclient.http.post("/v1/batches", json=body)
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["field"] == field


def test_s3_input_url(bclient, services, tenant):
    s3 = boto3.client("s3", endpoint_url=services["s3"].endpoint_url, region_name="us-east-1",
                      aws_access_key_id="test", aws_secret_access_key="test")
    key = f"images/{tenant.id}/inputs/{uuid.uuid4().hex}.jsonl"  # inside the tenant's own prefix (test_references)
    s3.put_object(Bucket="letterpress-test", Key=key, Body=jsonl(items(4)))
    resp = bclient.http.post("/v1/batches", json={"input_url": f"s3://letterpress-test/{key}"})
    assert resp.status_code == 202, resp.text
    assert resp.json()["request_counts"]["total"] == 4
    assert resp.json()["input_source"] == f"s3://letterpress-test/{key}"


def test_idempotency_key_same_input_same_batch_other_input_409(bclient):
    headers = {"Idempotency-Key": f"nightly-{uuid.uuid4().hex}"}
    first = bclient.http.post("/v1/batches", json={"items": items(3)}, headers=headers)
    again = bclient.http.post("/v1/batches", json={"items": items(3)}, headers=headers)
    assert first.status_code == 202 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"] and again.json()["request_counts"]["total"] == 3
    other = bclient.http.post("/v1/batches", json={"items": items(4)}, headers=headers)
    assert other.status_code == 409 and other.json()["error"]["field"] == "Idempotency-Key"
    assert len(bclient.http.get("/v1/batches").json()["data"]) == 1


def test_list_newest_first_with_cursor_and_status_filter(bclient):
    ids = [bclient.http.post("/v1/batches", json={"items": items(1)}).json()["id"] for _ in range(3)]
    page = bclient.http.get("/v1/batches", params={"limit": 2}).json()
    assert [b["id"] for b in page["data"]] == ids[::-1][:2] and page["has_more"]
    rest = bclient.http.get("/v1/batches", params={"limit": 2, "cursor": page["next_cursor"]}).json()
    assert [b["id"] for b in rest["data"]] == [ids[0]] and not rest["has_more"]
    bclient.http.post(f"/v1/batches/{ids[1]}/cancel")
    cancelling = bclient.http.get("/v1/batches", params={"status": "cancelling"}).json()["data"]
    assert [b["id"] for b in cancelling] == [ids[1]]
    assert bclient.http.get("/v1/batches", params={"cursor": "garbage"}).json()["error"]["field"] == "cursor"


def test_cancel_cancels_queued_items_at_once(bclient):
    batch = bclient.http.post("/v1/batches", json={"items": items(5)}).json()
    resp = bclient.http.post(f"/v1/batches/{batch['id']}/cancel")
    assert resp.status_code == 200
    body = resp.json()
    assert body["status"] == "cancelling" and body["cancelling_at"]
    assert body["request_counts"]["canceled"] == 5 and body["request_counts"]["queued"] == 0
    assert {r["status"] for r in db_jobs(batch["id"])} == {"canceled"}
    assert bclient.http.post(f"/v1/batches/{batch['id']}/cancel").status_code == 200  # idempotent


def test_results_stream_lists_every_line_in_input_order_while_queued(bclient):
    unseeded = {**LINE, "custom_id": "server-picks-the-seed"}
    batch = bclient.http.post("/v1/batches", json={"items": items(4) + [unseeded]}).json()
    resp = bclient.http.get(f"/v1/batches/{batch['id']}/results")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in resp.text.splitlines()]
    assert [m["custom_id"] for m in lines] == [f"item-{i}" for i in range(4)] + ["server-picks-the-seed"]
    assert [m["seed"] for m in lines[:4]] == [0, 1, 2, 3]
    # a server-picked seed (up to 2**32 - 1) is recorded and reported as the job has it
    assert lines[4]["seed"] == bclient.get(lines[4]["job_id"])["request"]["seed"] == db_jobs(batch["id"])[4]["seed"]
    assert {m["status"] for m in lines} == {"queued"} and all(m["key"] is None for m in lines)
    assert set(lines[0]) == {"custom_id", "line", "job_id", "status", "seed", "key", "url", "sha256", "error"}


def test_other_tenants_batch_is_404_and_no_key_is_401(bclient, api_url):
    batch = bclient.http.post("/v1/batches", json={"items": items(1)}).json()
    other = ApiClient(api_url, make_tenant().key)
    for path in ("", "/results"):
        assert other.http.get(f"/v1/batches/{batch['id']}{path}").status_code == 404
    assert other.http.post(f"/v1/batches/{batch['id']}/cancel").status_code == 404
    assert other.http.get("/v1/batches/not-a-uuid").status_code == 404
    assert ApiClient(api_url, None).http.post("/v1/batches", json={"items": items(1)}).status_code == 401


def test_a_batch_has_a_priority_lane_that_can_change_while_it_runs(bclient, api_url):
    high = bclient.http.post("/v1/batches", json={"items": items(2, "hi"), "priority": "high"})
    assert high.status_code == 202 and high.json()["priority"] == "high", high.text
    plain = bclient.http.post("/v1/batches", json={"items": items(1, "plain")})
    assert plain.json()["priority"] == "normal"
    upload = bclient.http.post("/v1/batches", files={"file": ("p.jsonl", jsonl(items(1, "up")))},
                               data={"priority": "low"})
    assert upload.status_code == 202 and upload.json()["priority"] == "low", upload.text
    per_line = bclient.http.post("/v1/batches", json={"items": [{**items(1, "line")[0], "priority": "high"}]})
    assert per_line.status_code == 422, per_line.text
    assert per_line.json()["error"]["errors"][0]["field"] == "priority"  # the batch has the lane, not its lines
    for body in ({"items": items(1, "bad"), "priority": "urgent"}, {"items": items(1, "bad"), "priority": 1}):
        bad = bclient.http.post("/v1/batches", json=body)
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "priority", bad.text

    batch_id = high.json()["id"]
    moved = bclient.http.post(f"/v1/batches/{batch_id}/priority", json={"priority": "low"})
    assert moved.status_code == 200 and moved.json()["priority"] == "low", moved.text
    assert bclient.http.get(f"/v1/batches/{batch_id}").json()["priority"] == "low"
    refused = bclient.http.post(f"/v1/batches/{batch_id}/priority", json={"priority": "top"})
    assert refused.status_code == 422 and refused.json()["error"]["field"] == "priority", refused.text

    stranger = ApiClient(api_url, make_tenant().key)
    foreign = stranger.http.post(f"/v1/batches/{batch_id}/priority", json={"priority": "high"})
    assert foreign.status_code == 404, foreign.text
    assert bclient.http.get(f"/v1/batches/{batch_id}").json()["priority"] == "low"  # unchanged by the stranger

    assert bclient.http.post(f"/v1/batches/{batch_id}/cancel").status_code == 200
    from common.db import session_scope
    from common.models import Batch

    with session_scope() as session:  # as the finalizer leaves it
        session.get(Batch, uuid.UUID(batch_id)).status = "cancelled"
    ended = bclient.http.post(f"/v1/batches/{batch_id}/priority", json={"priority": "high"})
    assert ended.status_code == 409 and ended.json()["error"]["field"] == "status", ended.text
