"""A caller's mistake is a 4xx naming the field, never an outage: NUL characters, non-finite numbers and deeply
nested JSON are refused at validation (Postgres would refuse them later, which used to answer 503 or 500),
invalid UTF-8 in a JSONL upload is refused (not silently replaced), a BOM is accepted, a blank Idempotency-Key is
refused, and concurrent creates under one Idempotency-Key make one job and answer every caller with it.

In-process API (TestClient) against the suite's real Postgres."""
from __future__ import annotations

import json
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from common import job_states
from common.db import session_scope
from common.job_request import JobRequest, to_params
from common.settings import get_settings
from tests.support import make_tenant

JOB = {"prompt": "a poster that says HELLO", "width": 256, "height": 256, "preset": "V4_TURBO_12", "seed": 3}
CAPTION = {"high_level_description": "a poster",
           "compositional_deconstruction": {"background": "plain", "elements": [{"type": "text", "text": "HI"}]}}


@pytest.fixture(scope="module")
def app(stack_env):
    return create_app()


@pytest.fixture
def http(app):
    tenant = make_tenant()
    client = TestClient(app, raise_server_exceptions=False)
    client.headers["Authorization"] = f"Bearer {tenant.key}"
    return client


def refused(resp, field: str, status: int = 422) -> dict:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert field in (error.get("field") or ""), error
    return error


@pytest.mark.parametrize("body, field", [
    ({**JOB, "prompt": "a poster\x00"}, "prompt"),
    ({**{k: v for k, v in JOB.items() if k != "prompt"},
      "caption": {**CAPTION, "high_level_description": "nul\x00"}}, "caption.high_level_description"),
    ({**JOB, "metadata": {"k": "v\x00"}}, "metadata"),
    ({**JOB, "metadata": {"k\x00": "v"}}, "metadata"),
    ({**JOB, "webhook_url": "https://example.com/\x00"}, "webhook_url"),
])
def test_nul_characters_are_a_422_naming_the_field(http, body, field):
    refused(http.post("/v1/jobs", content=json.dumps(body), headers={"content-type": "application/json"}), field)


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_in_metadata_are_a_422(http, number):
    body = json.dumps({**JOB, "metadata": {"score": 1}}).replace('"score": 1', f'"score": {number}')
    error = refused(http.post("/v1/jobs", content=body, headers={"content-type": "application/json"}), "metadata")
    assert "non-finite" in error["message"]


def test_deep_metadata_is_a_422_not_a_crash(http):
    deep = {"a": None}
    for _ in range(40):
        deep = {"a": deep}
    error = refused(http.post("/v1/jobs", json={**JOB, "metadata": deep}), "metadata")
    assert "deeper than" in error["message"]
    very_deep = '{"a":' * 10_000 + "1" + "}" * 10_000  # past the JSON parser's own recursion limit
    resp = http.post("/v1/batches", content=f'{{"items": [], "metadata": {very_deep}}}',
                     headers={"content-type": "application/json"})
    assert resp.status_code == 422, resp.text


def test_nul_in_a_cursor_or_an_event_id_is_a_4xx(http):
    refused(http.get("/v1/jobs", params={"cursor": "abc\x00def"}), "cursor")
    assert http.get("/v1/webhooks/events/msg_%00x").status_code == 404


@pytest.mark.parametrize("line, field", [
    ({**JOB, "custom_id": "a\x00"}, "custom_id"),
    ({**JOB, "custom_id": "a", "prompt": "p\x00"}, "prompt"),
    ({**JOB, "custom_id": "a", "metadata": {"x": "\x00"}}, "metadata"),
])
def test_nul_in_batch_items_is_a_422_with_the_line(http, line, field):
    resp = http.post("/v1/batches", json={"items": [line]})
    assert resp.status_code == 422, resp.text
    (error,) = resp.json()["error"]["errors"]
    assert error["line"] == 1 and error["field"] == field


def test_jsonl_upload_refuses_invalid_utf8_and_accepts_a_bom(http):
    good = json.dumps({**JOB, "custom_id": "ok"}).encode()
    bad = json.dumps({**JOB, "custom_id": "bad", "prompt": "caf\u00e9"}, ensure_ascii=False).encode().replace(b"\xc3\xa9", b"\xe9")
    resp = http.post("/v1/batches", files={"file": ("in.jsonl", good + b"\n" + bad + b"\n")})
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["errors"] == [{"line": 2, "message": "not valid UTF-8"}]
    nul_line = json.dumps({**JOB, "custom_id": "n", "prompt": "a\u0000b"}).encode()
    resp = http.post("/v1/batches", files={"file": ("in.jsonl", good + b"\n" + nul_line + b"\n")})
    assert resp.status_code == 422 and resp.json()["error"]["errors"][0]["line"] == 2, resp.text
    resp = http.post("/v1/batches", files={"file": ("bom.jsonl", b"\xef\xbb\xbf" + good + b"\n")})
    assert resp.status_code == 202, resp.text
    assert resp.json()["request_counts"]["total"] == 1


@pytest.mark.parametrize("body, field", [
    ({**JOB, "prompt": "x" * 8000}, "prompt"),  # within 8,000 characters, but 8,016 tokens: over 2,048
    ({**{k: v for k, v in JOB.items() if k != "prompt"},
      "caption": {"high_level_description": "x" * 2000,
                  "compositional_deconstruction": {"background": "y" * 2000, "elements": []}}}, "caption"),
])
def test_a_prompt_over_the_model_token_limit_is_a_422_naming_the_field(http, body, field):
    """Counted with the model's own tokenizer (the suite's tiny model) before the job exists; it used to be
    accepted (202) and fail in the worker. A batch line over the limit is a line error like any other."""
    error = refused(http.post("/v1/jobs", json=body), field)
    assert "tokens long" in error["message"] and "limit of 2,048" in error["message"], error
    resp = http.post("/v1/batches", json={"items": [{**body, "custom_id": "long"}]})
    assert resp.status_code == 422, resp.text
    (line_error,) = resp.json()["error"]["errors"]
    assert (line_error["line"], line_error["field"], line_error["custom_id"]) == (1, field, "long")


@pytest.mark.parametrize("field, value", [("width", "256"), ("seed", True), ("steps", 2.5), ("num_images", "2")])
def test_numbers_of_the_wrong_json_type_are_a_422_naming_the_field(http, field, value):
    """Strict JSON types (common.job_request): lax parsing took `"seed": true` as seed 1."""
    refused(http.post("/v1/jobs", json={**JOB, field: value}), field)


@pytest.mark.parametrize("key", ["", "   ", "a\tb"])
def test_a_blank_or_unprintable_idempotency_key_is_refused(http, key):
    refused(http.post("/v1/jobs", json=JOB, headers={"Idempotency-Key": key}), "idempotency-key")


def test_concurrent_creates_with_one_key_make_one_job_and_answer_everyone(http):
    key = f"race-{uuid.uuid4().hex}"
    with ThreadPoolExecutor(max_workers=10) as pool:
        answers = list(pool.map(lambda _: http.post("/v1/jobs", json=JOB, headers={"Idempotency-Key": key}),
                                range(20)))
    assert sorted({r.status_code for r in answers}) in ([200, 202], [202]), [r.text for r in answers]
    assert [r.status_code for r in answers].count(202) == 1
    assert len({r.json()["id"] for r in answers}) == 1


def test_the_loser_of_the_insert_race_answers_like_a_replay(stack_env):
    """Both transactions pass the check before either inserts: the second insert hits the unique constraint and
    must return the first job (same request) or Conflict (another request), never a database error."""
    tenant = make_tenant()
    params = to_params(JobRequest.model_validate(JOB), get_settings().api)
    with session_scope() as first, session_scope() as second:
        assert job_states._replay(second, tenant_id=tenant.id, idempotency_key="k", digest="x") is None
        job, created = job_states.create_job(first, tenant_id=tenant.id, params=params, idempotency_key="k")
        first.commit()
        # `second` already looked (nothing there): force its insert path by skipping the look-up
        original, job_states._replay = job_states._replay, lambda *a, **kw: None
        try:
            with pytest.raises(Exception):
                job_states.create_job(second, tenant_id=tenant.id, params=params, idempotency_key="k")
        finally:
            job_states._replay = original
        again, created_again = job_states.create_job(second, tenant_id=tenant.id, params=params,
                                                     idempotency_key="k")
        assert (again.id, created, created_again) == (job.id, True, False)
