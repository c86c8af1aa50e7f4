"""POST /v1/batches `input_url` names an object the server reads with its own storage credentials, so a tenant may
only name objects inside its own storage prefix (`s3://letterpress-test/images/{tenant}/...`) or an operator
allow-listed prefix (common.references). Everything else is refused before anything is read, with one answer
whether the object exists or not; a failed read never returns the store's error text.

In-process API (TestClient) against the suite's real Postgres and S3 (moto)."""
from __future__ import annotations

import json
import uuid

import pytest
from fastapi.testclient import TestClient

import api.batch_submission as batch_submission
from api.main import create_app
from common.settings import get_settings, use_settings
from tests.support import make_tenant

BUCKET = "letterpress-test"
FOREIGN = "foreign-bucket"
SHARED = "shared-prompts"
LINE = {"prompt": "a poster that says HELLO", "width": 256, "height": 256, "preset": "V4_TURBO_12", "steps": 2}
# whatever the store or boto3 say about an object must never reach the caller
LEAKS = ("NoSuchKey", "NoSuchBucket", "AccessDenied", "Not Found", "Forbidden", "404", "403", "botocore",
         "An error occurred", "ClientError", "HeadObject", "GetObject", "does not exist")


def jsonl(n: int, tag: str) -> bytes:
    return "".join(json.dumps({**LINE, "custom_id": f"{tag}-{i}", "seed": i}) + "\n" for i in range(n)).encode()


@pytest.fixture(scope="module")
def s3(services):
    client = services["s3"].client(aws_access_key_id="test", aws_secret_access_key="test")
    for bucket in (FOREIGN, SHARED):
        services["s3"].create_bucket(bucket)
    return client


@pytest.fixture
def reads(monkeypatch):
    """Every object the API reads for an input_url, as (bucket, key)."""
    seen: list[tuple[str, str]] = []
    real = batch_submission.download_tenant_object

    def recording(bucket, key, into, **kwargs):
        seen.append((bucket, key))
        return real(bucket, key, into, **kwargs)

    monkeypatch.setattr(batch_submission, "download_tenant_object", recording)
    return seen


@pytest.fixture
def me(stack_env):
    return make_tenant()


@pytest.fixture
def other(stack_env):
    return make_tenant()


@pytest.fixture
def http(stack_env, me):
    """The caller's in-process client; its unfinished batches are canceled at teardown (nothing for a worker)."""
    client = TestClient(create_app(), headers={"Authorization": f"Bearer {me.key}"})
    yield client
    for batch in client.get("/v1/batches", params={"limit": 200}).json()["data"]:
        if batch["status"] in ("in_progress", "validating"):
            client.post(f"/v1/batches/{batch['id']}/cancel")


def post(http, url: str):
    return http.post("/v1/batches", json={"input_url": url})


def refusal(tenant) -> dict:
    return {"error": {"type": "invalid_request", "field": "input_url",
                      "message": f"input_url must be a plain s3:// URL inside your own storage prefix "
                                 f"s3://{BUCKET}/images/{tenant.id}/ or an allowed prefix"}}


def assert_refused(resp, tenant) -> None:
    assert resp.status_code == 422, resp.text
    assert resp.json() == refusal(tenant)
    # the caller's own tenant id is in the message; a random uuid may well contain "404" or "403"
    assert not any(leak in resp.text.replace(str(tenant.id), "") for leak in LEAKS), resp.text


def test_another_tenants_objects_are_refused_unread_with_one_answer_whether_they_exist_or_not(http, s3, me, other,
                                                                                              reads):
    manifest = f"images/{other.id}/batches/{uuid.uuid4()}/manifest.jsonl"
    image = f"images/{other.id}/{uuid.uuid4()}/0.png"
    s3.put_object(Bucket=BUCKET, Key=manifest, Body=jsonl(3, "stolen"))
    s3.put_object(Bucket=BUCKET, Key=image, Body=jsonl(2, "stolen-image"))
    existing = [post(http, f"s3://{BUCKET}/{manifest}"), post(http, f"s3://{BUCKET}/{image}")]
    missing = [post(http, f"s3://{BUCKET}/images/{other.id}/batches/{uuid.uuid4()}/manifest.jsonl"),
               post(http, f"s3://{BUCKET}/images/{other.id}/{uuid.uuid4()}/0.png")]
    for resp in existing + missing:
        assert_refused(resp, me)
    assert {r.text for r in existing} == {r.text for r in missing}  # no existence oracle
    assert reads == []  # refused before anything was read
    assert http.get("/v1/batches").json()["data"] == []


def test_a_foreign_bucket_is_refused_unread_whether_the_object_exists_or_not(http, s3, me, reads):
    key = f"prompts/{uuid.uuid4().hex}.jsonl"
    s3.put_object(Bucket=FOREIGN, Key=key, Body=jsonl(2, "foreign"))
    s3.put_object(Bucket=FOREIGN, Key=f"images/{me.id}/x.jsonl", Body=jsonl(2, "foreign"))  # own ids, other bucket
    answers = [post(http, f"s3://{FOREIGN}/{key}"), post(http, f"s3://{FOREIGN}/images/{me.id}/x.jsonl"),
               post(http, f"s3://{FOREIGN}/prompts/missing-{uuid.uuid4().hex}.jsonl"),
               post(http, f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/x.jsonl")]
    for resp in answers:
        assert_refused(resp, me)
    assert len({r.text for r in answers}) == 1
    assert reads == []


def test_path_tricks_are_refused_unread(http, s3, me, other, reads):
    target = f"images/{other.id}/batches/{uuid.uuid4()}/manifest.jsonl"
    s3.put_object(Bucket=BUCKET, Key=target, Body=jsonl(2, "stolen"))
    sibling = f"images/{me.id}x/prompts.jsonl"  # a key that begins with the caller's id as a string
    s3.put_object(Bucket=BUCKET, Key=sibling, Body=jsonl(2, "sibling"))
    own = f"s3://{BUCKET}/images/{me.id}"
    rest = target.removeprefix("images/")
    tricks = [
        f"{own}/../{rest}", f"{own}/%2e%2e/{rest}", f"{own}/%2E%2E/{rest}", f"{own}/%252e%252e/{rest}",
        f"{own}%2f..%2f{rest}", f"{own}/./../{rest}", f"{own}/..\\{rest}", f"{own}\\..\\{rest}",
        f"{own}//../{rest}", f"s3://{BUCKET}//{target}", f"s3://{BUCKET}/images//{rest}",
        f"{own}/x.jsonl\x00/../../{rest}", f"{own}/x?/../../{rest}", f"{own}/x#/../../{rest}",
        f"s3://{BUCKET}/{sibling}", f"s3://{BUCKET}/images/{me.id}-x/prompts.jsonl",
        f"s3://{BUCKET}/images/{str(me.id).upper()}/prompts.jsonl", f"s3://user@{BUCKET}/{target}",
        f"s3://{BUCKET}:443/{target}", f"{own}/", f"{own}",
    ]
    for url in tricks:
        assert_refused(post(http, url), me)
    assert reads == []
    assert http.get("/v1/batches").json()["data"] == []


def test_a_missing_key_in_the_own_prefix_is_a_generic_422(http, me, reads):
    url = f"s3://{BUCKET}/images/{me.id}/inputs/missing-{uuid.uuid4().hex}.jsonl"
    resp = post(http, url)
    assert resp.status_code == 422, resp.text
    assert resp.json() == {"error": {"type": "invalid_request", "field": "input_url",
                                     "message": "input_url could not be read"}}
    assert not any(leak in resp.text for leak in LEAKS), resp.text
    assert reads == [(BUCKET, url.removeprefix(f"s3://{BUCKET}/"))]


def test_the_callers_own_jsonl_makes_a_batch_of_its_lines(http, s3, me, reads):
    key = f"images/{me.id}/inputs/{uuid.uuid4().hex}.jsonl"
    s3.put_object(Bucket=BUCKET, Key=key, Body=jsonl(5, "own"))
    resp = post(http, f"s3://{BUCKET}/{key}")
    assert resp.status_code == 202, resp.text
    batch = resp.json()
    assert batch["request_counts"]["total"] == 5 and batch["request_counts"]["queued"] == 5
    assert batch["input_source"] == f"s3://{BUCKET}/{key}"
    assert http.get(f"/v1/batches/{batch['id']}").json()["request_counts"]["total"] == 5
    assert reads == [(BUCKET, key)]


def test_an_allow_listed_prefix_in_another_bucket_is_accepted(http, s3, me, reads):
    key = f"public/{uuid.uuid4().hex}.jsonl"
    s3.put_object(Bucket=SHARED, Key=key, Body=jsonl(3, "shared"))
    s3.put_object(Bucket=SHARED, Key="private/secret.jsonl", Body=jsonl(3, "secret"))
    s3.put_object(Bucket=SHARED, Key="publicity/x.jsonl", Body=jsonl(3, "secret"))
    assert_refused(post(http, f"s3://{SHARED}/{key}"), me)  # not allowed until the operator says so
    base = get_settings()
    allowing = base.model_copy(update={"api": base.api.model_copy(
        update={"input_url_allow": [f"s3://{SHARED}/public/"]})})
    with use_settings(allowing):
        resp = post(http, f"s3://{SHARED}/{key}")
        assert resp.status_code == 202, resp.text
        assert resp.json()["request_counts"]["total"] == 3
        assert resp.json()["input_source"] == f"s3://{SHARED}/{key}"
        for url in (f"s3://{SHARED}/private/secret.jsonl", f"s3://{SHARED}/publicity/x.jsonl",
                    f"s3://{SHARED}/public/../private/secret.jsonl"):
            assert_refused(post(http, url), me)
        missing = post(http, f"s3://{SHARED}/public/missing-{uuid.uuid4().hex}.jsonl")
        assert missing.status_code == 422 and missing.json()["error"]["message"] == "input_url could not be read"
    assert [bucket for bucket, _ in reads] == [SHARED, SHARED] and reads[0] == (SHARED, key)
