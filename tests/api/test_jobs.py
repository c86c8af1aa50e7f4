"""REST contract of /v1/jobs against a real API process and a real Postgres (no worker needed here)."""
from __future__ import annotations

import uuid

import pytest

from tests.support import ApiClient

PROMPT = {"prompt": "a poster that says HELLO", "width": 256, "height": 256, "preset": "V4_TURBO_12"}


def test_submit_returns_202_with_id_status_and_urls(client):
    resp = client.submit(PROMPT)
    assert resp.status_code == 202, resp.text
    job = resp.json()
    assert uuid.UUID(job["id"])
    assert job["status"] in ("queued", "running", "succeeded")
    assert job["urls"]["self"].endswith(f"/v1/jobs/{job['id']}")
    assert resp.headers["location"] == job["urls"]["self"]
    assert job["request"]["preset"] == "V4_TURBO_12"
    assert job["progress"]["total"] == 12
    # the server picked a seed and recorded it
    assert isinstance(job["request"]["seed"], int)


def test_the_output_format_is_part_of_the_request(client):
    job = client.submit({**PROMPT, "output_format": "webp"}).json()
    assert job["request"]["output_format"] == "webp" and job["request"]["output_quality"] == 90
    png = client.submit(PROMPT).json()
    assert "output_format" not in png["request"]  # png, the default, as before formats existed
    for j in (job, png):
        client.http.post(f"/v1/jobs/{j['id']}/cancel")


def test_the_priority_picks_the_lane(client):
    jobs = {p: client.submit({**PROMPT, "priority": p}).json() for p in ("high", "low")}
    plain = client.submit(PROMPT).json()
    assert [(j["priority"], j["queue"]) for j in (jobs["high"], plain, jobs["low"])] == [
        ("high", "interactive-high"), ("normal", "interactive"), ("low", "interactive-low")]
    assert "priority" not in plain["request"]  # a scheduling choice, not part of the recipe
    for j in (*jobs.values(), plain):
        client.http.post(f"/v1/jobs/{j['id']}/cancel")


def test_defaults_preset_size_and_caption(client):
    job = client.submit({"caption": {
        "high_level_description": "a cafe menu board",
        "compositional_deconstruction": {"background": "a brick wall", "elements": [
            {"type": "text", "text": "SOUP 5", "desc": "chalk letters"}, {"type": "obj", "desc": "a mug"}]}},
    }).json()
    assert job["request"]["preset"] == "V4_DEFAULT_20"
    assert (job["request"]["width"], job["request"]["height"]) == (1024, 1024)
    assert job["request"]["caption"]["compositional_deconstruction"]["elements"][0]["text"] == "SOUP 5"
    client.http.post(f"/v1/jobs/{job['id']}/cancel")  # don't leave a 1024² job for the worker tests


@pytest.mark.parametrize("body, field", [
    ({}, None),
    ({"prompt": "x", "caption": {"high_level_description": "d",
                                 "compositional_deconstruction": {"background": "b"}}}, None),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": "x", "width": 1000}, "width"),
    ({"prompt": "x", "height": 100}, "height"),
    ({"prompt": "x", "width": 4096}, "width"),
    ({"prompt": "x", "num_images": 9}, "num_images"),
    ({"prompt": "x", "num_images": 0}, "num_images"),
    ({"prompt": "x", "preset": "V5_ULTRA"}, "preset"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "steps": 0}, "steps"),
    ({"prompt": "x", "guidance_scale": 99}, "guidance_scale"),
    ({"prompt": "x", "metadata": {"blob": "y" * 5000}}, "metadata"),
    ({"prompt": "x", "unknown_field": 1}, "unknown_field"),
    ({"prompt": "x", "resolution": "big"}, "resolution"),
    ({"caption": {"high_level_description": "d", "compositional_deconstruction": {
        "background": "b", "elements": [{"type": "text", "desc": "no text given"}]}}},
     "caption.compositional_deconstruction.elements.0.text.text"),
    ({"prompt": "x", "webhook_url": "http://169.254.169.254/latest"}, "webhook_url"),
    ({"prompt": "x", "output_format": "gif"}, "output_format"),
    ({"prompt": "x", "output_format": "jpeg", "output_quality": 0}, "output_quality"),
    ({"prompt": "x", "output_format": "webp", "output_quality": 101}, "output_quality"),
    ({"prompt": "x", "output_quality": 80}, "output_quality"),  # png is lossless: no quality
    ({"prompt": "x", "priority": "urgent"}, "priority"),
    ({"prompt": "x", "priority": 1}, "priority"),
])
def test_validation_errors_are_422_naming_the_field(client, body, field):
    resp = client.submit(body)
    assert resp.status_code == 422, resp.text
    error = resp.json()["error"]
    assert error["message"]
    if field is not None:
        assert error["field"] == field, error


def test_malformed_json_is_422(client):
    resp = client.http.post("/v1/jobs", content=b"{not json", headers={"content-type": "application/json"})
    assert resp.status_code == 422
    assert resp.json()["error"]["type"] == "validation_error"


def test_idempotency_replay_and_conflict(client):
    key = {"Idempotency-Key": f"k-{uuid.uuid4()}"}
    first = client.submit(PROMPT, headers=key)
    again = client.submit(PROMPT, headers=key)
    assert first.status_code == 202 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    other = client.submit({**PROMPT, "prompt": "something else"}, headers=key)
    assert other.status_code == 409
    assert other.json()["error"]["field"] == "Idempotency-Key"


def test_idempotency_keys_are_per_tenant(client, api_url):
    from tests.support import make_tenant

    key = {"Idempotency-Key": "shared-key"}
    a = client.submit(PROMPT, headers=key).json()
    b = ApiClient(api_url, make_tenant().key).submit(PROMPT, headers=key).json()
    assert a["id"] != b["id"]


def test_auth_missing_wrong_and_other_tenant(client, api_url):
    job = client.submit(PROMPT).json()
    anonymous = ApiClient(api_url, None)
    assert anonymous.submit(PROMPT).status_code == 401
    assert anonymous.http.get(f"/v1/jobs/{job['id']}").status_code == 401
    wrong = ApiClient(api_url, "lp_not-a-real-key")
    assert wrong.http.get(f"/v1/jobs/{job['id']}").status_code == 401
    assert wrong.http.get(f"/v1/jobs/{job['id']}").json()["error"]["type"] == "unauthorized"
    from tests.support import make_tenant

    other = ApiClient(api_url, make_tenant().key)
    assert other.http.get(f"/v1/jobs/{job['id']}").status_code == 404
    assert other.http.post(f"/v1/jobs/{job['id']}/cancel").status_code == 404
    assert client.http.get("/v1/jobs/not-a-uuid").status_code == 404


def test_a_revoked_key_is_refused_on_submit_and_read(api_url):
    """The submit and read statements (api/job_store.py) check the key in SQL; the rule is common.auth.usable_key."""
    from sqlalchemy import func, update

    from common.auth import key_hash_of
    from common.db import session_scope
    from common.models import ApiKey
    from tests.support import make_tenant

    owner = make_tenant()
    client = ApiClient(api_url, owner.key)
    job = client.submit(PROMPT).json()
    client.http.post(f"/v1/jobs/{job['id']}/cancel")
    with session_scope() as session:
        session.execute(update(ApiKey).where(ApiKey.key_hash == key_hash_of(owner.key))
                        .values(revoked_at=func.now()))
        session.commit()
    for resp in (client.http.get(f"/v1/jobs/{job['id']}"), client.submit(PROMPT),
                 client.submit(PROMPT, headers={"Idempotency-Key": "after-revoke"})):
        assert resp.status_code == 401, resp.text
        assert resp.json()["error"]["type"] == "unauthorized"


def test_list_pagination_and_status_filter(client):
    ids = [client.submit({**PROMPT, "seed": i}).json()["id"] for i in range(5)]
    seen, cursor = [], None
    while True:
        page = client.http.get("/v1/jobs", params={"limit": 2, **({"cursor": cursor} if cursor else {})}).json()
        seen += [j["id"] for j in page["data"]]
        assert len(page["data"]) <= 2
        if not page["has_more"]:
            break
        cursor = page["next_cursor"]
    assert seen == list(reversed(ids))  # newest first, each exactly once
    canceled = client.http.post(f"/v1/jobs/{ids[0]}/cancel").json()
    filtered = client.http.get("/v1/jobs", params={"status": "canceled"}).json()["data"]
    if canceled["status"] == "canceled":
        assert [j["id"] for j in filtered] == [ids[0]]
    assert all(j["status"] == "canceled" for j in filtered)
    assert client.http.get("/v1/jobs", params={"status": "bogus"}).status_code == 422
    assert client.http.get("/v1/jobs", params={"cursor": "garbage"}).status_code == 422


def test_health_and_readiness(api_url):
    import httpx

    assert httpx.get(api_url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(api_url + "/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"postgres": "ok", "redis": "ok"}
