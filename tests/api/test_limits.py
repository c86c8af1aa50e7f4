"""The front door's bounds (api/limits.py): no body is read for a caller without a key, a body past its route's
limit is a 413 naming the limit (declared or streamed), batch ingests past the concurrency bounds are a 429 with
Retry-After at once, and /healthz answers while every database connection is taken (then /v1 answers 503 at once,
never hangs). In-process API against the suite's real Postgres."""
from __future__ import annotations

import json
import time

import pytest
from fastapi.testclient import TestClient

from api.limits import ingest_slots
from api.main import create_app
from common.db import reset_engines, session_factory
from common.settings import get_settings, use_settings
from tests.support import make_tenant

JOB = {"prompt": "a poster that says HELLO", "width": 256, "height": 256, "preset": "V4_TURBO_12", "seed": 3}
LINE = {**JOB, "custom_id": "a"}


def small_limits(**api):
    settings = get_settings()
    return use_settings(settings.model_copy(update={"api": settings.api.model_copy(update=api)}))


@pytest.fixture
def tenant(stack_env):
    return make_tenant()


@pytest.fixture
def http(stack_env, tenant):
    client = TestClient(create_app(), raise_server_exceptions=False)
    client.headers["Authorization"] = f"Bearer {tenant.key}"
    return client


def test_no_key_no_body_read(stack_env):
    anonymous = TestClient(create_app(), raise_server_exceptions=False)
    resp = anonymous.post("/v1/jobs", content=b"x" * (8 * 1024 * 1024), headers={"content-type": "application/json"})
    assert resp.status_code == 401 and resp.json()["error"]["field"] == "Authorization"


def test_a_declared_body_past_the_limit_is_413_naming_it(http):
    limit = get_settings().api.max_body_bytes
    resp = http.post("/v1/jobs", json={**JOB, "prompt": "x" * (limit + 10)})
    assert resp.status_code == 413, resp.text
    error = resp.json()["error"]
    assert error["type"] == "payload_too_large" and str(limit) in error["message"] and error["field"] == "body"


def test_a_streamed_body_past_the_limit_is_413(http):
    limit = get_settings().api.max_body_bytes

    def chunks():  # no Content-Length: chunked transfer, counted as it arrives
        body = json.dumps({**JOB, "prompt": "x" * (limit * 2)}).encode()
        for i in range(0, len(body), 4096):
            yield body[i:i + 4096]

    resp = http.post("/v1/jobs", content=chunks(), headers={"content-type": "application/json"})
    assert resp.status_code == 413, resp.text
    assert str(limit) in resp.json()["error"]["message"]


def test_batch_limits_by_content_type(http):
    with small_limits(max_batch_json_bytes=2048, max_batch_upload_bytes=4096):
        items = [{**LINE, "custom_id": f"c{i}"} for i in range(40)]
        resp = http.post("/v1/batches", json={"items": items})
        assert resp.status_code == 413 and "2048" in resp.json()["error"]["message"], resp.text
        jsonl = "".join(json.dumps(x) + "\n" for x in items).encode()
        resp = http.post("/v1/batches", files={"file": ("in.jsonl", jsonl)})
        assert resp.status_code == 413 and "4096" in resp.json()["error"]["message"], resp.text
        small = "".join(json.dumps(x) + "\n" for x in items[:2]).encode()
        assert http.post("/v1/batches", files={"file": ("in.jsonl", small)}).status_code == 202


def test_concurrent_ingests_past_the_bounds_are_429_at_once(http, tenant):
    api = get_settings().api
    held = [ingest_slots.take(tenant.id, api) for _ in range(api.max_ingests_per_tenant)]
    for slot in held:
        slot.__enter__()
    try:
        t0 = time.monotonic()
        resp = http.post("/v1/batches", json={"items": [LINE]})
        assert resp.status_code == 429 and resp.headers["Retry-After"] == "5", resp.text
        assert time.monotonic() - t0 < 2
        other = make_tenant()
        assert http.post("/v1/batches", json={"items": [LINE]},
                         headers={"Authorization": f"Bearer {other.key}"}).status_code == 202
    finally:
        for slot in held:
            slot.__exit__(None, None, None)
    assert http.post("/v1/batches", json={"items": [LINE]}).status_code == 202  # the slots came back


def test_healthz_answers_while_the_pool_is_exhausted_and_v1_is_503_at_once(http):
    settings = get_settings()
    tight = settings.model_copy(update={"database": settings.database.model_copy(
        update={"pool_size": 1, "max_overflow": 0, "pool_timeout_s": 0.5})})
    reset_engines()
    try:
        with use_settings(tight):
            hog = session_factory()()
            hog.connection()  # the only connection of the pool, held
            try:
                t0 = time.monotonic()
                assert http.get("/healthz").status_code == 200
                resp = http.get("/v1/jobs")
                assert resp.status_code == 503 and resp.json()["error"]["type"] == "overloaded", resp.text
                assert resp.headers["Retry-After"] == "1" and time.monotonic() - t0 < 5
            finally:
                hog.close()
            assert http.get("/v1/jobs").status_code == 200  # recovered as soon as a connection is free
    finally:
        reset_engines()


def test_past_max_in_flight_a_request_is_503_at_once_and_the_probes_still_answer(http):
    from concurrent.futures import ThreadPoolExecutor

    settings = get_settings()
    tight = settings.model_copy(update={
        "api": settings.api.model_copy(update={"max_in_flight": 1}),
        "database": settings.database.model_copy(update={"pool_size": 1, "max_overflow": 0, "pool_timeout_s": 2})})
    reset_engines()
    try:
        with use_settings(tight):
            hog = session_factory()()
            hog.connection()  # the first request will wait for a connection: in flight for ~2 s
            try:
                with ThreadPoolExecutor(max_workers=1) as pool:
                    slow = pool.submit(http.get, "/v1/jobs")
                    time.sleep(0.5)
                    t0 = time.monotonic()
                    shed = http.get("/v1/jobs")
                    assert shed.status_code == 503 and "capacity" in shed.json()["error"]["message"], shed.text
                    assert shed.headers["Retry-After"] == "1" and time.monotonic() - t0 < 1
                    assert http.get("/healthz").status_code == 200  # probes are never held back
                    assert slow.result(timeout=15).status_code == 503  # it did wait, for the pool
            finally:
                hog.close()
            assert http.get("/v1/jobs").status_code == 200
    finally:
        reset_engines()
