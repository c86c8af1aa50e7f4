"""No console page reaches another tenant's objects: every /ui route with a path parameter, requested by tenant B
(signed in, with B's own CSRF token on POSTs) with tenant A's ids, is the not-found page, and shows nothing of
A's; the same requests by A are not (so B's 404s are isolation, not typos). The routes come from the console's
routers, so a new page is walked the day it is added. Forms without a session go to the sign-in form.

In-process API (TestClient) against the suite's real Postgres, Redis and S3."""
from __future__ import annotations

import io
import re

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from PIL import Image

from api.console import auth, batches, gallery, jobs, operations, webhooks
from api.main import create_app
from tests.api.tenant_objects import PATH_PARAMETERS, cancel_everything, make_objects
from tests.support import make_tenant

CONSOLE_ROUTES = [(method, route.path) for module in (auth, jobs, gallery, batches, webhooks, operations)
                  for route in module.router.routes if isinstance(route, APIRoute)
                  for method in sorted(route.methods)]


@pytest.fixture(scope="module")
def app(stack_env):
    return create_app()


def signed_in(app, key: str) -> tuple[TestClient, str]:
    """A client with a console session of `key`, and that session's CSRF token."""
    http = TestClient(app, raise_server_exceptions=False, follow_redirects=False)
    form = http.get("/ui/login")
    login_csrf = re.search(r'name="login_csrf" value="([^"]+)"', form.text).group(1)
    answer = http.post("/ui/login", data={"login_csrf": login_csrf, "api_key": key, "next": "/ui/gallery"})
    assert answer.status_code == 303 and answer.headers["location"] == "/ui/gallery", answer.text
    page = http.get("/ui/gallery")
    assert page.status_code == 200
    return http, re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)


def test_every_console_id_route_is_not_found_for_another_tenant(app, stack_env):
    alice, bob = make_tenant(), make_tenant()
    api = TestClient(app, raise_server_exceptions=False)
    ids = make_objects(api, alice)
    walked = [(m, p) for m, p in CONSOLE_ROUTES if "{" in p]
    assert len(walked) >= 10, "the console lost its id routes?"
    names = {n for _, p in walked for n in re.findall(r"{(\w+)}", p)}
    assert names <= PATH_PARAMETERS, f"the walker cannot fill {names - PATH_PARAMETERS}"
    http, token = signed_in(app, bob.key)
    for method, path in walked:
        url = path.format(**ids)
        resp = http.request(method, url, data={"csrf_token": token, "seed": "new"} if method == "POST" else None)
        assert resp.status_code == 404, f"{method} {url} as another tenant: {resp.status_code} {resp.text[:300]}"
        assert "Not found" in resp.text and alice.name not in resp.text, (method, url)
    _store_image(f"tests/{ids['job_id']}/0.png")  # the owner's image row names this key (make_objects)
    owner, owner_token = signed_in(app, alice.key)
    try:
        for method, path in walked:
            url = path.format(**ids)
            resp = owner.request(method, url,
                                 data={"csrf_token": owner_token, "seed": "new"} if method == "POST" else None)
            assert resp.status_code in (200, 303, 409), f"{method} {url} as its owner: {resp.status_code}"
    finally:
        cancel_everything(alice.id)


def _store_image(key: str) -> None:
    from common.settings import get_settings
    from common.storage import open_storage

    out = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 40, 40)).save(out, format="PNG")
    open_storage(get_settings().storage).put(key, out.getvalue())


def test_every_console_page_sends_a_signed_out_visitor_to_sign_in(app, stack_env):
    http = TestClient(app, raise_server_exceptions=False, follow_redirects=False)
    for method, path in CONSOLE_ROUTES:
        if path in ("/ui/login", "/ui"):
            continue
        url = re.sub(r"{\w+}", "00000000-0000-0000-0000-000000000000", path).replace("{index}", "0")
        resp = http.request(method, url)
        assert resp.status_code == 303 and resp.headers["location"].startswith("/ui/login?next="), (method, url)


def test_console_pages_carry_a_strict_content_security_policy(app, stack_env):
    http, _ = signed_in(app, make_tenant().key)
    page = http.get("/ui/create")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy and "frame-ancestors 'none'" in policy
    assert page.headers["cache-control"] == "no-store" and page.headers["x-content-type-options"] == "nosniff"
    assert "<script src=\"/ui/static/console.js\"" in page.text and "<script>" not in page.text


def test_operations_page_is_for_admin_keys_only(app, stack_env):
    from common.auth import create_api_key, get_or_create_tenant
    from common.broker import QUEUES
    from common.db import session_scope

    tenant_only, _ = signed_in(app, make_tenant().key)
    refused = tenant_only.get("/ui/operations")
    assert refused.status_code == 403 and "admin" in refused.text
    assert 'href="/ui/operations"' not in tenant_only.get("/ui/gallery").text
    with session_scope() as session:
        operator = create_api_key(session, tenant=get_or_create_tenant(session, "operators"), name="ops",
                                  scopes=["read", "admin"])
    admin, _ = signed_in(app, operator)
    page = admin.get("/ui/operations")
    assert page.status_code == 200, page.text
    assert all(f"<td>{queue}</td>" in page.text for queue in QUEUES)
    assert 'href="/ui/operations"' in admin.get("/ui/gallery").text
