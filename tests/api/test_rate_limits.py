"""Per-key request rates (api/rate_limits.py): the in-process API against the suite's Redis and Postgres. Within the
rate every answer says how much is left; past it the key gets 429 with Retry-After at once and its submit creates
nothing; another key is not affected; the window resets; Redis down lets calls through."""
from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from api.main import create_app
from common.db import session_scope
from common.models import Job
from common.settings import get_settings, use_settings
from tests.support import make_tenant

JOB = {"prompt": "a poster that says RATE", "width": 256, "height": 256, "preset": "V4_TURBO_12"}


def limited(rate: str, **redis):
    settings = get_settings()
    update = {"limits": settings.limits.model_copy(update={"requests_per_key": rate})}
    if redis:
        update["redis"] = settings.redis.model_copy(update=redis)
    return use_settings(settings.model_copy(update=update))


@pytest.fixture(scope="module")
def http(stack_env):
    return TestClient(create_app(), raise_server_exceptions=False)


def jobs_of(tenant) -> int:
    with session_scope() as session:
        return session.scalar(select(func.count()).select_from(Job).where(Job.tenant_id == tenant.id))


def test_a_key_past_its_rate_gets_429_at_once_and_loses_nothing(http):
    alice, bob = make_tenant(), make_tenant()
    with limited("4/2 second"):
        time.sleep(2 - time.time() % 2 + 0.05)  # start at a fresh 2 s window
        answers = [http.get("/v1/jobs", headers={"Authorization": f"Bearer {alice.key}"}) for _ in range(4)]
        assert [a.status_code for a in answers] == [200] * 4
        assert [a.headers["ratelimit-remaining"] for a in answers] == ["3", "2", "1", "0"]
        assert all(a.headers["ratelimit-limit"] == "4" for a in answers)
        before = jobs_of(alice)
        refused = http.post("/v1/jobs", json=JOB, headers={"Authorization": f"Bearer {alice.key}"})
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"] == {"type": "rate_limited", "field": "Authorization",
                                           "message": refused.json()["error"]["message"]}
        assert 1 <= int(refused.headers["retry-after"]) <= 2 and refused.headers["ratelimit-remaining"] == "0"
        assert jobs_of(alice) == before  # nothing half-made
        assert http.get("/v1/jobs", headers={"Authorization": f"Bearer {bob.key}"}).status_code == 200
        time.sleep(int(refused.headers["retry-after"]) + 0.05)
        assert http.post("/v1/jobs", json=JOB, headers={"Authorization": f"Bearer {alice.key}"}).status_code == 202


def test_without_redis_calls_go_through_uncounted(http):
    tenant = make_tenant()
    with limited("1/minute", url="redis://127.0.0.1:9/0"):
        for _ in range(3):
            resp = http.get("/v1/jobs", headers={"Authorization": f"Bearer {tenant.key}"})
            assert resp.status_code == 200 and "ratelimit-limit" not in resp.headers


def test_the_rate_setting_is_checked():
    from common.settings import settings_from_env

    with pytest.raises(ValueError, match="100/second"):
        settings_from_env({"LETTERPRESS_LIMITS__REQUESTS_PER_KEY": "fast"})
    assert settings_from_env({"LETTERPRESS_LIMITS__REQUESTS_PER_KEY": ""}).limits.requests_per_key == ""


def test_a_tenant_has_its_own_rate_when_an_admin_sets_one(http):
    """Its own rate (read once per TTL per process: a fresh app here), another tenant keeps the default, and ""
    exempts a tenant from a low default."""
    from common.auth import create_api_key, get_or_create_tenant

    limited_tenant, other = make_tenant(), make_tenant()
    with session_scope() as session:
        admin = create_api_key(session, tenant=get_or_create_tenant(session, f"ops-{other.name}"), name="ops",
                               scopes=["read", "admin"])
    for tenant, rate in ((limited_tenant, "3/hour"), (other, "")):
        resp = http.patch(f"/v1/admin/tenants/{tenant.id}", json={"limits": {"requests_per_key": rate}},
                          headers={"Authorization": f"Bearer {admin}"})
        assert resp.status_code == 200 and resp.json()["limits"] == {"requests_per_key": rate}, resp.text
    bad = http.patch(f"/v1/admin/tenants/{other.id}", json={"limits": {"requests_per_key": "lots"}},
                     headers={"Authorization": f"Bearer {admin}"})
    assert bad.status_code == 422 and "requests_per_key" in bad.json()["error"]["field"], bad.text

    fresh = TestClient(create_app(), raise_server_exceptions=False)  # no cached tenant rates
    with limited("1000/second"):
        answers = [fresh.get("/v1/jobs", headers={"Authorization": f"Bearer {limited_tenant.key}"}).status_code
                   for _ in range(4)]
        assert answers[:3] == [200] * 3 and answers[3] == 429, answers
    with limited("1/minute"):  # the default is low now; the exempt tenant is not limited
        assert all(fresh.get("/v1/jobs", headers={"Authorization": f"Bearer {other.key}"}).status_code == 200
                   for _ in range(3))


def test_a_window_another_api_process_opened_is_counted_and_its_reset_read_from_redis(stack_env):
    """Two API processes share one budget per key: a second app (its own process-local window ends) joining a
    window the first opened continues the count and reads the window's end from Redis, not a fresh full window."""
    tenant = make_tenant()
    first, second = (TestClient(create_app(), raise_server_exceptions=False) for _ in range(2))
    headers = {"Authorization": f"Bearer {tenant.key}"}
    with limited("5/10 second"):  # a new tenant: its window opens with the first call and lasts 10 s
        assert first.get("/v1/jobs", headers=headers).headers["ratelimit-remaining"] == "4"
        time.sleep(3)
        joined = second.get("/v1/jobs", headers=headers)
        assert joined.headers["ratelimit-remaining"] == "3"
        assert 1 <= int(joined.headers["ratelimit-reset"]) <= 7  # the first window's end, not 10 s from now


def test_processes_reserve_call_numbers_and_never_let_a_key_past_its_rate(stack_env, monkeypatch):
    """A rate of 1,000 a window: each app reserves reserve_size(1000) = 10 call numbers a Redis round trip. Two apps
    taking turns answer exactly 1,000 calls within the rate between them, then 429, with one INCRBY per ten calls."""
    from limits.aio.storage import RedisStorage

    from api.rate_limits import reserve_size

    increments = []
    incr = RedisStorage.incr

    async def counted(self, key, expiry, amount=1):
        increments.append(amount)
        return await incr(self, key, expiry, amount)

    monkeypatch.setattr(RedisStorage, "incr", counted)
    tenant = make_tenant()
    apps = [TestClient(create_app(), raise_server_exceptions=False) for _ in range(2)]
    headers = {"Authorization": f"Bearer {tenant.key}"}
    with limited("1000/minute"):
        statuses = [apps[i % 3 % 2].get("/v1/usage", headers=headers).status_code for i in range(1030)]
    assert reserve_size(1000) == 10
    assert statuses.count(200) == 1000 and set(statuses[1010:]) == {429}
    assert set(increments) == {10} and 100 <= len(increments) <= 105  # a round trip per ten calls
