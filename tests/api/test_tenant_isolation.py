"""No tenant reaches another's objects: every operation of the OpenAPI document that takes a path parameter, called
by tenant B with tenant A's ids, is a 404 (not a 200, not a 403 that would confirm the id exists) and its body
carries nothing of A's; the same calls by A are not 404s (the ids are real, so B's 404s are isolation, not typos).

The operations come from `app.openapi()`, so a new id route is walked the day it is added; one whose path
parameter the walker cannot fill fails here until tests/api/tenant_objects.py makes an object for it.

In-process API (TestClient) against the suite's real Postgres and Redis."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from tests.api.tenant_objects import PATH_PARAMETERS, REQUEST_BODIES, cancel_everything, make_objects
from tests.support import make_tenant

METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")


@pytest.fixture(scope="module")
def app(stack_env):
    return create_app()


@pytest.fixture(scope="module")
def http(app):
    return TestClient(app, raise_server_exceptions=False, follow_redirects=False)


@pytest.fixture
def alice(stack_env):
    """The owner of the objects."""
    tenant = make_tenant()
    yield tenant
    cancel_everything(tenant.id)


@pytest.fixture
def bob(stack_env):
    """Another tenant."""
    return make_tenant()


ADMIN = "/v1/admin"  # the installation's tenants and keys: guarded by the admin scope, walked separately below


def operations(document: dict, *, with_path_parameters: bool | None,
               admin: bool = False) -> list[tuple[str, str, set[str], dict]]:
    """(METHOD, path, its path parameter names, the operation) of every operation of the document that has path
    parameters (or, with_path_parameters=False, that has none; None: either), outside /v1/admin (or, admin=True,
    inside it)."""
    found = []
    for path, item in document["paths"].items():
        if path.startswith(ADMIN) != admin:
            continue
        for method in METHODS:
            operation = item.get(method)
            if operation is None:
                continue
            parameters = [*item.get("parameters", []), *operation.get("parameters", [])]
            names = {p["name"] for p in parameters if p["in"] == "path"}
            if with_path_parameters is None or bool(names) == with_path_parameters:
                found.append((method.upper(), path, names, operation))
    return found


def test_every_id_route_is_a_404_for_another_tenants_ids(app, http, alice, bob):
    ids = make_objects(http, alice)
    walked = operations(app.openapi(), with_path_parameters=True)
    assert len(walked) >= 10, "the document lost its id routes?"
    unknown = {f"{method} {path}": names - PATH_PARAMETERS for method, path, names, _ in walked
               if names - PATH_PARAMETERS}
    assert not unknown, (f"the walker cannot fill these path parameters: {unknown}; make an object for each in "
                         "tests/api/tenant_objects.py (make_objects, PATH_PARAMETERS)")

    needs_body = {f"{method} {path}" for method, path, _, op in walked if "requestBody" in op}
    assert needs_body <= REQUEST_BODIES.keys(), (
        f"give the walker a valid body for {needs_body - REQUEST_BODIES.keys()} in tests/api/tenant_objects.py")
    for method, path, _, _ in walked:
        url = path.format(**ids)
        resp = http.request(method, url, json=REQUEST_BODIES.get(f"{method} {path}"),
                            headers={"Authorization": f"Bearer {bob.key}"})
        assert resp.status_code == 404, f"{method} {url} as another tenant: {resp.status_code} {resp.text[:500]}"
        assert resp.headers["content-type"].startswith("application/json"), (method, url)
        assert resp.json()["error"]["type"] == "not_found", (method, url, resp.text)
        assert alice.name not in resp.text, f"{method} {url} leaks the owner's data: {resp.text}"
        for name, value in ids.items():
            if name != "index" and value not in url:
                assert value not in resp.text, f"{method} {url} leaks the owner's {name}: {resp.text}"

    # The same calls as the owner (after the other tenant's, which must have changed nothing): found (a 409 too:
    # the batch canceled just before cannot be retried while it is cancelling; 204: the adapter deleted, after
    # its GET).
    for method, path, _, _ in walked:
        url = path.format(**ids)
        resp = http.request(method, url, json=REQUEST_BODIES.get(f"{method} {path}"),
                            headers={"Authorization": f"Bearer {alice.key}"})
        assert resp.status_code in (200, 202, 204, 307, 409), (f"{method} {url} as its owner: {resp.status_code} "
                                                                f"{resp.text}")


def test_list_routes_show_nothing_of_another_tenant(app, http, alice, bob):
    """Every GET operation without path parameters, called by B, bare and with A's ids in any query parameter
    that takes one (the job_id/batch_id/event_id filters): nothing of A's in the answer."""
    ids = make_objects(http, alice)
    listed = [(method, path, op) for method, path, _, op in operations(app.openapi(), with_path_parameters=False)
              if method == "GET"]
    assert any(path == "/v1/jobs" for _, path, _ in listed)
    for method, path, operation in listed:
        query = {p["name"]: ids[p["name"]] for p in operation.get("parameters", [])
                 if p["in"] == "query" and p["name"] in ids}
        for params in ({}, query):
            resp = http.request(method, path, params=params, headers={"Authorization": f"Bearer {bob.key}"})
            assert resp.status_code == 200, f"{method} {path} {params}: {resp.status_code} {resp.text[:500]}"
            assert alice.name not in resp.text, f"{method} {path} {params} shows another tenant's data"
            for name, value in ids.items():
                if name != "index":
                    assert value not in resp.text, f"{method} {path} {params} shows another tenant's {name}"


def test_every_admin_operation_is_a_403_without_the_admin_scope(app, http, alice, bob):
    """/v1/admin spans tenants by design: its guard is the admin scope. Every operation of it, with a tenant's
    ordinary key (read and submit), is a 403 that shows nothing."""
    ids = make_objects(http, alice)
    walked = operations(app.openapi(), with_path_parameters=None, admin=True)
    assert len(walked) >= 4, "the document lost its admin routes?"
    for method, path, _, operation in walked:
        url = path.format(**ids)
        body = {"tenant": bob.name, "name": "x"} if "requestBody" in operation else None
        resp = http.request(method, url, json=body, headers={"Authorization": f"Bearer {bob.key}"})
        assert resp.status_code == 403, f"{method} {url} without the admin scope: {resp.status_code} {resp.text}"
        assert resp.json()["error"]["type"] == "forbidden"
        assert alice.name not in resp.text and ids["key_id"] not in resp.text.replace(url, "")
