"""Key scopes and the admin API (common/auth.py, api/deps.required_scope, api/routers/admin.py), in-process API
against the suite's Postgres: a read key reads and cannot submit, a submit key submits and cannot read, both on the
one-statement job paths and the ORM ones; only an admin key reaches /v1/admin, where it makes tenants and keys
that work at once and revokes them for the next request."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from common.auth import create_api_key, get_or_create_tenant
from common.db import session_scope
from tests.api.tenant_objects import register_adapter
from tests.support import TenantKey, make_tenant

JOB = {"prompt": "a poster that says SCOPE", "width": 256, "height": 256, "preset": "V4_TURBO_12"}


@pytest.fixture(scope="module")
def http(stack_env):
    return TestClient(create_app(), raise_server_exceptions=False)


def key_of(tenant_name: str, *scopes: str) -> str:
    with session_scope() as session:
        return create_api_key(session, tenant=get_or_create_tenant(session, tenant_name), name="scoped",
                              scopes=list(scopes))


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_a_read_key_reads_and_cannot_submit(http):
    owner = make_tenant()
    job_id = http.post("/v1/jobs", json=JOB, headers=auth(owner.key)).json()["id"]
    reader = key_of(owner.name, "read")
    assert http.get(f"/v1/jobs/{job_id}", headers=auth(reader)).status_code == 200  # one-statement read
    assert http.get("/v1/jobs", headers=auth(reader)).status_code == 200
    for call in (lambda: http.post("/v1/jobs", json=JOB, headers=auth(reader)),  # one-statement insert
                 lambda: http.post("/v1/jobs", json=JOB, headers={**auth(reader), "Idempotency-Key": "k1"}),
                 lambda: http.post(f"/v1/jobs/{job_id}/cancel", headers=auth(reader)),
                 lambda: http.post("/v1/batches", json={"items": [{"custom_id": "a", **JOB}]}, headers=auth(reader)),
                 lambda: register_adapter(http, TenantKey(id=owner.id, name=owner.name, key=reader), "look")):
        resp = call()
        assert resp.status_code == 403, resp.text
        assert resp.json()["error"]["type"] == "forbidden" and "`submit`" in resp.json()["error"]["message"]


def test_a_submit_key_submits_and_cannot_read(http):
    owner = make_tenant()
    submitter = key_of(owner.name, "submit")
    created = http.post("/v1/jobs", json=JOB, headers=auth(submitter))
    assert created.status_code == 202, created.text
    for path in (f"/v1/jobs/{created.json()['id']}", "/v1/jobs", "/v1/adapters", "/v1/usage"):
        resp = http.get(path, headers=auth(submitter))
        assert resp.status_code == 403 and "`read`" in resp.json()["error"]["message"], (path, resp.text)


def test_unknown_keys_stay_401_whatever_the_route(http):
    for method, path in (("GET", "/v1/jobs/00000000-0000-0000-0000-000000000001"), ("POST", "/v1/jobs"),
                         ("GET", "/v1/admin/tenants")):
        resp = http.request(method, path, json=JOB if method == "POST" else None, headers=auth("lp_not-a-key"))
        assert resp.status_code == 401, (path, resp.text)


def test_the_admin_api_manages_tenants_and_keys(http):
    admin = key_of(f"ops-{make_tenant().name}", "read", "admin")
    assert http.get("/v1/admin/tenants", headers=auth(make_tenant().key)).status_code == 403  # no admin scope

    tenant = http.post("/v1/admin/tenants", json={"name": "brand-team-x"}, headers=auth(admin))
    assert tenant.status_code == 201 and tenant.json()["name"] == "brand-team-x"
    assert "brand-team-x" in [t["name"] for t in http.get("/v1/admin/tenants", headers=auth(admin)).json()["data"]]

    created = http.post("/v1/admin/keys", json={"tenant": "brand-team-x", "name": "ci", "scopes": ["read"],
                                                "expires_in_s": 3600}, headers=auth(admin))
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["key"].startswith("lp_") and body["scopes"] == ["read"] and body["usable"]
    assert body["expires_at"] is not None and body["prefix"] == body["key"][:10]
    new_key = body["key"]
    assert http.get("/v1/jobs", headers=auth(new_key)).status_code == 200
    assert http.post("/v1/jobs", json=JOB, headers=auth(new_key)).status_code == 403

    listed = http.get("/v1/admin/keys", params={"tenant": "brand-team-x"}, headers=auth(admin)).json()["data"]
    assert [k["id"] for k in listed] == [body["id"]] and all("key" not in k for k in listed)
    assert new_key not in str(listed)

    revoked = http.post(f"/v1/admin/keys/{body['id']}/revoke", headers=auth(admin))
    assert revoked.status_code == 200 and revoked.json()["usable"] is False
    assert http.get("/v1/jobs", headers=auth(new_key)).status_code == 401
    assert http.post("/v1/admin/keys/lp_nothing/revoke", headers=auth(admin)).status_code == 404


@pytest.mark.parametrize("scopes", [[], ["root"], ["read", "everything"]], ids=["none", "unknown", "one-unknown"])
def test_scopes_are_validated(http, scopes):
    admin = key_of(f"ops-{make_tenant().name}", "admin")
    resp = http.post("/v1/admin/keys", json={"tenant": "t", "name": "n", "scopes": scopes}, headers=auth(admin))
    assert resp.status_code == 422 and resp.json()["error"]["field"].startswith("scopes"), resp.text
