"""Usage and cost (common/usage.py, GET /v1/usage, the batch object's `usage`): pricing rules without a server;
then ledger rows written with the worker's own `record_attempt` on jobs made through the in-process API, against
the suite's real Postgres. Real workers writing the ledger: tests/worker/test_batches_e2e.py (the 1,000-line batch)."""
from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from api.main import create_app
from common.db import session_scope
from common.models import UsageRecord
from common.settings import PricingSettings, get_settings, settings_from_env, use_settings
from common.usage import DeviceTime, price_per_hour, record_attempt
from tests.support import make_tenant

PRICES = PricingSettings(currency="EUR", on_demand_per_gpu_hour={"A100": 1.2, "A100-SXM4-80GB": 1.6, "*": 2.0},
                         spot_per_gpu_hour={"H200": 3.6})


@pytest.mark.parametrize("kind, capacity, price", [
    ("NVIDIA A100-SXM4-80GB", "on_demand", 1.6),  # the longest key that the name contains
    ("NVIDIA A100-PCIE-40GB", "on_demand", 1.2),
    ("nvidia a100-sxm4-80gb", "on_demand", 1.6),  # case does not matter
    ("NVIDIA L4", "on_demand", 2.0),  # `*`: any other kind
    ("NVIDIA H200", "spot", 3.6),
    ("NVIDIA A100-SXM4-80GB", "spot", None),  # no spot price for it, and no spot `*`: unpriced, not free
])
def test_price_per_hour_matches_the_device_name(kind, capacity, price):
    assert price_per_hour(PRICES, kind, capacity) == price


def test_prices_come_from_the_environment_and_refuse_negative_ones():
    env = {"LETTERPRESS_PRICING__SPOT_PER_GPU_HOUR": '{"A100": 1.1}', "LETTERPRESS_PRICING__CURRENCY": "EUR"}
    pricing = settings_from_env(env).pricing
    assert pricing.spot_per_gpu_hour == {"A100": 1.1} and pricing.currency == "EUR"
    with pytest.raises(ValueError, match="spot_per_gpu_hour"):
        settings_from_env({"LETTERPRESS_PRICING__SPOT_PER_GPU_HOUR": '{"A100": -1}'})


# ------------------------------------------------------------------------------------------- against Postgres

@pytest.fixture(scope="module")
def http(stack_env):
    settings = get_settings().model_copy(update={"pricing": PRICES})
    with use_settings(settings):
        yield TestClient(create_app(), raise_server_exceptions=False)


def _auth(tenant) -> dict:
    return {"Authorization": f"Bearer {tenant.key}"}


def _job(http, tenant, preset: str = "V4_TURBO_12") -> str:
    resp = http.post("/v1/jobs", json={"prompt": "a poster that says USAGE", "width": 256, "height": 256,
                                       "preset": preset}, headers=_auth(tenant))
    assert resp.status_code == 202, resp.text
    return resp.json()["id"]


def _record(job_id: str, seconds: float, *, kind: str = "NVIDIA A100-SXM4-80GB", capacity: str = "on_demand",
            outcome: str = "succeeded", images: int = 1, attempt: int = 1, days_ago: int = 0) -> None:
    with session_scope() as session:
        record_attempt(session, job_id=uuid.UUID(job_id), attempt=attempt, outcome=outcome, worker_id="host:1:gpu0",
                       used=DeviceTime(gpu_kind=kind, capacity=capacity, seconds=seconds), images=images)
        if days_ago:
            session.execute(update(UsageRecord).where(UsageRecord.job_id == uuid.UUID(job_id))
                            .values(recorded_at=UsageRecord.recorded_at - timedelta(days=days_ago)))


def test_batch_usage_is_the_sum_of_its_items_records_priced_per_kind(http):
    tenant = make_tenant()
    lines = [{"custom_id": f"u{i}", "prompt": f"a poster that says {i}", "width": 256, "height": 256}
             for i in range(3)]
    batch = http.post("/v1/batches", json={"items": lines}, headers=_auth(tenant)).json()
    assert batch["usage"]["gpu_seconds"] == 0 and batch["usage"]["estimated_cost"] == 0
    with session_scope() as session:
        from common.models import Job
        job_ids = [str(j) for (j,) in session.query(Job.id).filter(Job.batch_id == uuid.UUID(batch["id"]))]
    _record(job_ids[0], 1800.0)  # half an hour at 1.6
    _record(job_ids[1], 900.0, outcome="retried", images=0)  # a failed attempt still used the GPU
    _record(job_ids[1], 900.0, attempt=2)
    _record(job_ids[2], 3600.0, kind="NVIDIA H200", capacity="spot")  # an hour at 3.6, spot
    _record(job_ids[2], 60.0, kind="NVIDIA H200", capacity="on_demand", outcome="preempted", images=0)  # `*`: 2.0

    usage = http.get(f"/v1/batches/{batch['id']}", headers=_auth(tenant)).json()["usage"]
    assert usage["gpu_seconds"] == 1800 + 900 + 900 + 3600 + 60
    assert usage["images"] == 3 and usage["attempts"] == 5
    expected = 1.6 * (1800 + 1800) / 3600 + 3.6 + 2.0 * 60 / 3600
    assert usage["estimated_cost"] == pytest.approx(expected, abs=1e-6) and usage["currency"] == "EUR"
    assert usage["unpriced_gpu_seconds"] == 0
    assert usage["gpu_seconds_by_kind"] == {"NVIDIA A100-SXM4-80GB (on_demand)": 3600.0,
                                            "NVIDIA H200 (on_demand)": 60.0, "NVIDIA H200 (spot)": 3600.0}
    listed = http.get("/v1/batches", headers=_auth(tenant)).json()["data"]
    assert [b["usage"] for b in listed] == [usage]


def test_usage_report_groups_by_day_batch_and_preset_for_the_caller_only(http):
    alice, bob = make_tenant(), make_tenant()
    turbo, default = _job(http, alice, "V4_TURBO_12"), _job(http, alice, "V4_DEFAULT_20")
    old = _job(http, alice, "V4_TURBO_12")
    _record(turbo, 10.0)
    _record(default, 20.0, kind="Unlisted GPU", capacity="spot")  # no spot price matches: unpriced
    _record(old, 40.0, days_ago=3)
    _record(_job(http, bob), 1000.0)

    by_preset = http.get("/v1/usage", params={"group_by": "preset"}, headers=_auth(alice)).json()
    assert [(g["preset"], g["gpu_seconds"]) for g in by_preset["data"]] == [("V4_DEFAULT_20", 20.0),
                                                                             ("V4_TURBO_12", 50.0)]
    assert by_preset["total"]["gpu_seconds"] == 70.0 and by_preset["total"]["images"] == 3
    assert by_preset["total"]["unpriced_gpu_seconds"] == 20.0
    assert by_preset["total"]["estimated_cost"] == pytest.approx(1.6 * 50 / 3600, abs=1e-6)

    by_day = http.get("/v1/usage", headers=_auth(alice)).json()
    today = datetime.now(timezone.utc).date()
    assert [(g["day"], g["gpu_seconds"]) for g in by_day["data"]] == [
        (str(today - timedelta(days=3)), 40.0), (str(today), 30.0)]
    by_batch = http.get("/v1/usage", params={"group_by": "batch"}, headers=_auth(alice)).json()
    assert [(g["batch"], g["gpu_seconds"]) for g in by_batch["data"]] == [(None, 70.0)]  # interactive jobs

    recent = http.get("/v1/usage", params={"from": (datetime.now(timezone.utc) - timedelta(days=1)).isoformat()},
                      headers=_auth(alice)).json()
    assert recent["total"]["gpu_seconds"] == 30.0
    assert http.get("/v1/usage", headers=_auth(bob)).json()["total"]["gpu_seconds"] == 1000.0


@pytest.mark.parametrize("params, field", [
    ({"group_by": "tenant"}, "group_by"),
    ({"from": "yesterday"}, "from"),
    ({"from": "2026-12-02T00:00:00Z", "to": "2026-12-01T00:00:00Z"}, "from"),
])
def test_bad_usage_queries_are_422_naming_the_field(http, params, field):
    resp = http.get("/v1/usage", params=params, headers=_auth(make_tenant()))
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["field"] == field


def test_usage_needs_a_key(http):
    assert http.get("/v1/usage").status_code == 401
