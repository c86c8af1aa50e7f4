"""Schemathesis fuzzes every operation of the OpenAPI document against the in-process app (the suite's real
Postgres and Redis; nothing consumes the queues in the fast tier): no answer may be a 5xx, and every answer must
be one the document declares, with the declared content type, headers and body schema; a request the document
calls invalid must be refused; every /v1 operation must refuse a missing or wrong key; a method the document does
not list is a 405 with `Allow`. The document is built from the code (FastAPI), so this holds the routes and what
they declare (api/schemas/errors.py `error_responses`, the request examples) to each other.

Two passes:
- every operation with generated values (path ids too: they name nothing, so id routes answer 401/404/422);
- every operation with a path parameter again, its ids replaced by real objects of the caller's
  (tests/api/tenant_objects.py), so their 2xx (and 307, 409) answers are checked against the document as well.

Bounded for CI (under a minute on two cores): a fixed seed and derandomized generation (a failure reproduces on
every run), few examples per operation, no example database. Some operations: `-k "batches and POST"`.

Below the fuzzer, the answers it once found wrong, pinned as plain tests."""
from __future__ import annotations

import secrets
import uuid

import pytest

schemathesis = pytest.importorskip("schemathesis")

from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.config import SchemathesisConfig  # noqa: E402
from schemathesis.specs.openapi import checks as openapi_checks  # noqa: E402

from api.main import app as imported_app  # noqa: E402
from api.main import create_app  # noqa: E402
from common.auth import KEY_PREFIX, SCOPES, get_or_create_tenant, hash_key  # noqa: E402
from common.db import session_scope  # noqa: E402
from common.models import ApiKey  # noqa: E402
from tests.api.tenant_objects import PATH_PARAMETERS, cancel_everything, make_objects  # noqa: E402
from tests.support import TenantKey, make_tenant  # noqa: E402

MAX_EXAMPLES = 25
KEY = KEY_PREFIX + secrets.token_urlsafe(32)  # the fuzzing tenant's API key (the `tenant` fixture stores it)
SEED = 20_240_601

CHECKS = [
    schemathesis.checks.not_a_server_error,         # no 5xx
    openapi_checks.status_code_conformance,         # only documented statuses
    openapi_checks.content_type_conformance,        # with the documented content type
    openapi_checks.response_headers_conformance,    # and documented headers (Location, Retry-After)
    openapi_checks.response_schema_conformance,     # and body schema (ErrorOut for every error)
    openapi_checks.negative_data_rejection,         # what the document calls invalid is refused: it is not looser
    openapi_checks.missing_required_header,         # a call without `Authorization` is a 401
    openapi_checks.ignored_auth,                    # a 2xx with a key is a 401 without one, or with a wrong one
    openapi_checks.unsupported_method,              # an undocumented method is a 405 with `Allow`
]


class Forward:
    """The ASGI app Schemathesis calls (its checks' own probes too): forwards to `target`, the app the `app`
    fixture made under the suite's settings."""

    target = None

    async def __call__(self, scope, receive, send):
        assert self.target is not None, "the `app` fixture sets the target"
        await self.target(scope, receive, send)


forward = Forward()

# The document is the code's (FastAPI builds it from the routes), read at collection so that every operation is a
# test of its own (`test_every_operation_answers_as_documented[POST /v1/batches]`); no request is made here (the
# document needs no database).
schema = schemathesis.openapi.from_dict(imported_app.openapi(), config=SchemathesisConfig.from_dict({
    "seed": SEED,
    "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none"},
    "phases": {"stateful": {"enabled": False}},
    # the declared security scheme, filled: Schemathesis knows this is the auth, so its own probes (ignored_auth)
    # remove or spoil it, and a key-less case is never taken as one the server must refuse for another reason
    "auth": {"openapi": {"bearerAuth": {"bearer": KEY}}},
}))
schema.app = forward  # as schemathesis.openapi.from_asgi does
id_operations = schema.include(path_regex=r"\{")

hypothesis_settings = settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                               suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def app(stack_env):
    forward.target = create_app()
    yield forward.target
    forward.target = None


@pytest.fixture(scope="module")
def tenant(stack_env) -> TenantKey:
    """A tenant whose API key is KEY (Schemathesis builds some cases at collection, with the key in them)."""
    name = f"fuzz-{uuid.uuid4().hex[:8]}"
    with session_scope() as session:
        tenant = get_or_create_tenant(session, name)
        # every scope, admin included, so /v1/admin is fuzzed with a key it accepts
        session.add(ApiKey(tenant_id=tenant.id, name=name, prefix=KEY[:10], key_hash=hash_key(KEY),
                           scopes=list(SCOPES)))
        key = TenantKey(id=tenant.id, name=name, key=KEY)
    yield key
    cancel_everything(key.id)


@pytest.fixture(scope="module")
def objects(app, tenant) -> dict[str, str]:
    ids = make_objects(TestClient(app), tenant)
    ids["tenant_id"] = str(make_tenant().id)  # the admin routes may set limits: on a scratch tenant, not the fuzzer's
    return ids


@schema.parametrize()
@hypothesis_settings
def test_every_operation_answers_as_documented(case, app, tenant):
    case.call_and_validate(checks=CHECKS)


@id_operations.parametrize()
@hypothesis_settings
def test_every_id_operation_on_real_objects_answers_as_documented(case, app, objects):
    unknown = set(case.path_parameters or {}) - PATH_PARAMETERS
    assert not unknown, f"{case.operation.label}: add {unknown} to tests/api/tenant_objects.py"
    for name in case.path_parameters:
        if name != "index":  # the image index stays generated: 0 is the job's image, others are 404s
            case.path_parameters[name] = objects[name]
    case.call_and_validate(checks=CHECKS)


# ------------------------------------------------------------------------------- what the fuzzer found, pinned

@pytest.fixture
def http(app, tenant) -> TestClient:
    client = TestClient(app, raise_server_exceptions=False)
    client.headers["Authorization"] = f"Bearer {tenant.key}"
    return client


@pytest.mark.parametrize("method, path, allowed", [
    ("PUT", "/v1/jobs", {"GET", "POST"}),
    ("DELETE", f"/v1/jobs/{uuid.UUID(int=1)}", {"GET"}),
    ("GET", "/v1/webhooks/secret/rotate", {"POST"}),
])
def test_a_method_the_path_does_not_take_is_a_405_with_allow(http, method, path, allowed):
    resp = http.request(method, path)
    assert resp.status_code == 405, resp.text
    assert {m.strip() for m in resp.headers["allow"].split(",")} >= allowed
    assert resp.json()["error"]["type"] == "http_error"


@pytest.mark.parametrize("body", [b'{"prompt": "caf\xe9"}', b"\xff\xfe{}", b"[" * 20_000 + b"]" * 20_000])
def test_a_json_body_that_cannot_be_decoded_is_a_422_naming_the_body(http, body):
    """Not UTF-8, or nested past the parser's recursion limit: FastAPI answered 400 (undocumented, and unlike POST
    /v1/batches, which answered the same bodies 422)."""
    for path in ("/v1/jobs", "/v1/batches"):
        resp = http.post(path, content=body, headers={"content-type": "application/json"})
        assert resp.status_code == 422, (path, resp.text)
        assert resp.json()["error"]["field"] == "body", (path, resp.text)


@pytest.mark.parametrize("value", [False, True, "60", 60.5])
def test_rotate_takes_only_an_integer_window(http, value):
    """`{"previous_valid_for_s": false}` rotated with a window of 0 (lax int parsing), though the document says
    integer."""
    resp = http.post("/v1/webhooks/secret/rotate", json={"previous_valid_for_s": value})
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["field"] == "previous_valid_for_s"
    assert http.post("/v1/webhooks/secret/rotate", json={"previous_valid_for_s": 60}).status_code == 200


def test_the_request_examples_of_the_document_are_accepted(http):
    """The examples the document shows (the fuzzer's `examples` phase sends them too) make a job and a batch."""
    document = imported_app.openapi()
    job_examples = document["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["examples"]
    for example in job_examples.values():
        resp = http.post("/v1/jobs", json=example["value"])
        assert resp.status_code == 202, resp.text
    batch_body = document["paths"]["/v1/batches"]["post"]["requestBody"]["content"]
    for example in batch_body["application/json"]["examples"].values():
        assert http.post("/v1/batches", json=example["value"]).status_code == 202
    for example in batch_body["multipart/form-data"]["examples"].values():
        fields = {k: str(v).lower() if isinstance(v, bool) else v for k, v in example["value"].items() if k != "file"}
        resp = http.post("/v1/batches", data=fields, files={"file": ("input.jsonl", example["value"]["file"])})
        assert resp.status_code == 202, resp.text
