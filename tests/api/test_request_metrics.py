"""The API's request metrics (api/metrics.py, RequestMetrics): each request counted once under the route template it
matched (never the raw path, so ids do not explode the label set), its status class and its method, and timed; a
path no route matches counts as `none`; /metrics itself is not counted and serves the exposition format."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from api.main import create_app
from tests.support import make_tenant

JOB = {"prompt": "a poster that says METRICS", "width": 256, "height": 256, "preset": "V4_TURBO_12"}


@pytest.fixture(scope="module")
def http(stack_env):
    return TestClient(create_app(), raise_server_exceptions=False)


def count(handler: str, method: str, status: str) -> float:
    return REGISTRY.get_sample_value("http_requests_total",
                                     {"handler": handler, "method": method, "status": status}) or 0.0


def timed(handler: str, method: str) -> float:
    labels = {"handler": handler, "method": method}
    return REGISTRY.get_sample_value("http_request_duration_seconds_count", labels) or 0.0


def test_requests_are_counted_and_timed_by_route_template_and_status_class(http):
    tenant = make_tenant()
    auth = {"Authorization": f"Bearer {tenant.key}"}
    job_id = http.post("/v1/jobs", json=JOB, headers=auth).json()["id"]
    before = (count("/v1/jobs/{job_id}", "GET", "2xx"), count("/v1/jobs/{job_id}", "GET", "4xx"),
              timed("/v1/jobs/{job_id}", "GET"), count("none", "GET", "4xx"))
    assert http.get(f"/v1/jobs/{job_id}", headers=auth).status_code == 200
    assert http.get(f"/v1/jobs/{job_id}", headers=auth).status_code == 200
    assert http.get("/v1/jobs/00000000-0000-0000-0000-000000000000", headers=auth).status_code == 404
    assert http.get("/no/such/route", headers=auth).status_code == 404
    after = (count("/v1/jobs/{job_id}", "GET", "2xx"), count("/v1/jobs/{job_id}", "GET", "4xx"),
             timed("/v1/jobs/{job_id}", "GET"), count("none", "GET", "4xx"))
    assert [a - b for a, b in zip(after, before)] == [2, 1, 3, 1]
    assert REGISTRY.get_sample_value("http_request_duration_seconds_sum",
                                     {"handler": "/v1/jobs/{job_id}", "method": "GET"}) > 0


def test_metrics_are_served_and_not_counted(http):
    before = count("/metrics", "GET", "2xx") + count("none", "GET", "2xx")
    resp = http.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    assert "http_requests_total{" in resp.text and "letterpress_queue_jobs_waiting" in resp.text
    assert count("/metrics", "GET", "2xx") + count("none", "GET", "2xx") == before
