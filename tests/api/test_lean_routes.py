"""api/lean_routes.py: `GET /v1/jobs/{id}` served by its lean handler answers exactly what FastAPI's own handling of
the same endpoint answers (a plain APIRoute), call for call: the owner's job, another tenant's, a malformed id, no
key, a wrong key, a key without the read scope, another auth scheme."""
from __future__ import annotations

import uuid

import fastapi.routing as fastapi_routing
import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from api.lean_routes import LeanRoute
from api.main import create_app
from api.routers.jobs import get_job
from api.routers.jobs import router as jobs_router
from api.schemas.jobs import JobOut
from common.auth import create_api_key, get_or_create_tenant
from common.db import session_scope
from tests.support import make_tenant

JOB = {"prompt": "a poster that says LEAN", "width": 256, "height": 256, "preset": "V4_TURBO_12"}


@pytest.fixture(scope="module")
def apps(stack_env) -> tuple[TestClient, TestClient]:
    """The app, and the app with a plain APIRoute of the same endpoint matched first (served as FastAPI serves any
    route)."""
    plain = create_app()
    plain.router.routes.insert(0, APIRoute("/v1/jobs/{job_id}", get_job, response_model=JobOut, name="plain"))
    return (TestClient(create_app(), raise_server_exceptions=False),
            TestClient(plain, raise_server_exceptions=False))


@pytest.fixture
def solved(monkeypatch) -> list[str]:
    """The paths of the calls FastAPI solved dependencies for."""
    calls: list[str] = []
    solve = fastapi_routing.solve_dependencies

    async def counted(*, request, **kwargs):
        calls.append(request.url.path)
        return await solve(request=request, **kwargs)

    monkeypatch.setattr(fastapi_routing, "solve_dependencies", counted)
    return calls


def _submit_only_key(tenant_name: str) -> str:
    with session_scope() as session:
        return create_api_key(session, tenant=get_or_create_tenant(session, tenant_name), name="no-read",
                              scopes=["submit"])


def test_the_lean_handler_answers_as_fastapi_does(apps, solved):
    lean, plain = apps
    alice, bob = make_tenant(), make_tenant()
    job_id = lean.post("/v1/jobs", json=JOB, headers={"Authorization": f"Bearer {alice.key}"}).json()["id"]
    calls = {
        "owner": (f"/v1/jobs/{job_id}", f"Bearer {alice.key}"),
        "another tenant": (f"/v1/jobs/{job_id}", f"Bearer {bob.key}"),
        "missing job": (f"/v1/jobs/{uuid.uuid4()}", f"Bearer {alice.key}"),
        "malformed id": ("/v1/jobs/not-a-uuid", f"Bearer {alice.key}"),
        "no key": (f"/v1/jobs/{job_id}", None),
        "wrong key": (f"/v1/jobs/{job_id}", "Bearer lp_wrong"),
        "basic auth": (f"/v1/jobs/{job_id}", "Basic YTpi"),
        "no read scope": (f"/v1/jobs/{job_id}", f"Bearer {_submit_only_key(alice.name)}"),
    }
    answers = {}
    for name, (path, authorization) in calls.items():
        headers = {"Authorization": authorization} if authorization else {}
        solved.clear()
        ours = lean.get(path, headers=headers)
        assert solved == [], name  # served by the lean handler: no dependency solving
        theirs = plain.get(path, headers=headers)
        assert solved, name  # FastAPI's own handling
        assert (ours.status_code, ours.json()) == (theirs.status_code, theirs.json()), name
        assert ours.headers["content-type"] == theirs.headers["content-type"], name
        answers[name] = ours.status_code
    assert answers == {"owner": 200, "another tenant": 404, "missing job": 404, "malformed id": 404, "no key": 401,
                       "wrong key": 401, "basic auth": 401, "no read scope": 403}


def test_the_route_is_lean_and_documented_as_before(apps):
    lean, _ = apps
    [route] = [r for r in jobs_router.routes if r.name == "get_job"]
    assert isinstance(route, LeanRoute) and route.endpoint.lean_handler is not None
    operation = lean.app.openapi()["paths"]["/v1/jobs/{job_id}"]["get"]
    assert operation["security"] == [{"bearerAuth": []}]
    assert operation["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/JobOut"}
    assert {"401", "404"} <= operation["responses"].keys()
