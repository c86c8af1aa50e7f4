"""The API's request metrics (api/metrics.py, RequestMetrics): each request counted once under the route template it
matched (never the raw path, so ids do not explode the label set), its status class and its method, and timed; a
path no route matches counts as `none`; /metrics itself is not counted and serves the exposition format. The event
loop's lag: a blocked loop shows, and the app watches it from startup."""
from __future__ import annotations

import asyncio
import time

import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from api import metrics
from api.main import create_app
from tests.support import make_tenant, wait_until

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


def lag_observations(late_by_at_most: float | None = None) -> float:
    """How many lags were observed (of at most `late_by_at_most` seconds)."""
    if late_by_at_most is None:
        return REGISTRY.get_sample_value("letterpress_api_event_loop_lag_seconds_count") or 0.0
    return REGISTRY.get_sample_value("letterpress_api_event_loop_lag_seconds_bucket",
                                     {"le": str(late_by_at_most)}) or 0.0


def test_a_blocked_event_loop_shows_as_lag():
    async def block_the_loop_once():
        watcher = asyncio.create_task(metrics.watch_event_loop_lag(interval_s=0.05))
        await asyncio.sleep(0.12)
        time.sleep(0.3)  # a blocking call on the loop: the watcher's pending timer fires at least 0.25 s late
        await asyncio.sleep(0.12)
        watcher.cancel()

    before, before_on_time = lag_observations(), lag_observations(0.1)
    asyncio.run(block_the_loop_once())
    observed, on_time = lag_observations() - before, lag_observations(0.1) - before_on_time
    assert observed >= 3, observed
    assert observed - on_time >= 1, (observed, on_time)  # the blocked one, over 0.1 s late


def test_the_app_watches_its_event_loop_from_startup(stack_env):
    before = lag_observations()
    with TestClient(create_app()):
        wait_until(lambda: lag_observations() >= before + 2, 10, what="two lag observations of the app's loop")
