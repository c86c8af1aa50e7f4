"""Remix inputs at the front door (common.input_images, POST /v1/uploads, `image`/`strength` on jobs and batch
lines), in-process against the real Postgres and S3 (moto): each input form, each refusal a 422 naming the field,
and tenant isolation for every form. Jobs made here are canceled at teardown (nothing for a worker)."""
from __future__ import annotations

import io
import uuid

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from api.main import create_app
from common.presets import remix_steps
from tests.support import make_tenant

BUCKET = "letterpress-test"
FOREIGN = "remix-foreign"
JOB = {"prompt": "a poster that says REMIX", "width": 256, "height": 256, "preset": "V4_TURBO_12", "seed": 3}


def png(color=(200, 30, 30), size=(64, 48)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def s3(services):
    services["s3"].create_bucket(FOREIGN)
    return services["s3"].client(aws_access_key_id="test", aws_secret_access_key="test")


def client_for(tenant) -> TestClient:
    return TestClient(create_app(), headers={"Authorization": f"Bearer {tenant.key}"})


@pytest.fixture
def me(stack_env):
    return make_tenant()


@pytest.fixture
def http(me):
    client = client_for(me)
    yield client
    for job in client.get("/v1/jobs", params={"limit": 200}).json()["data"]:
        if job["status"] == "queued":
            client.post(f"/v1/jobs/{job['id']}/cancel")
    for batch in client.get("/v1/batches", params={"limit": 200}).json()["data"]:
        if batch["status"] == "in_progress":
            client.post(f"/v1/batches/{batch['id']}/cancel")


def upload(http, data: bytes, name="in.png"):
    return http.post("/v1/uploads", files={"file": (name, data, "image/png")})


def refused(resp, field="image", text=""):
    assert resp.status_code == 422, resp.text
    error = resp.json()["error"]
    assert error["field"] == field and text in error["message"], error
    return error["message"]


def test_an_upload_is_stored_by_content_and_named_for_a_job(http, me, s3):
    first = upload(http, png())
    assert first.status_code == 201, first.text
    body = first.json()
    assert body["image"] == f"upload:{body['sha256']}" and (body["width"], body["height"]) == (64, 48)
    assert upload(http, png(), name="again.png").json()["image"] == body["image"]  # same bytes, same upload
    stored = s3.get_object(Bucket=BUCKET, Key=f"images/{me.id}/inputs/{body['sha256']}")["Body"].read()
    assert stored == png()

    job = http.post("/v1/jobs", json={**JOB, "image": body["image"]})
    assert job.status_code == 202, job.text
    request = job.json()["request"]
    assert request["image"]["sha256"] == body["sha256"] and request["strength"] == 0.8
    assert job.json()["progress"]["total"] == remix_steps(12, 0.8) == 9


def test_refused_uploads_name_the_image(http):
    refused(upload(http, b"GIF89a not really"), text="could not be read")
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    refused(upload(http, gif.getvalue()), text="PNG, JPEG or WebP")
    refused(http.post("/v1/uploads", data={"x": "1"}), field="file")


def test_another_tenants_upload_cannot_be_named(http, stack_env):
    sha = upload(http, png((1, 2, 3))).json()["sha256"]
    stranger = client_for(make_tenant())
    theirs = refused(stranger.post("/v1/jobs", json={**JOB, "image": f"upload:{sha}"}))
    unknown = refused(stranger.post("/v1/jobs", json={**JOB, "image": f"upload:{'0' * 64}"}))
    assert theirs.replace(sha, "X") == unknown.replace("0" * 64, "X")  # the same answer: nothing leaks


def test_an_earlier_image_of_ones_own_is_named_by_job_and_index(http, me):
    from common.db import session_scope
    from common.models import JobImage

    job_id = http.post("/v1/jobs", json=JOB).json()["id"]
    refused(http.post("/v1/jobs", json={**JOB, "image": {"job_id": job_id, "index": 0}}), text="no image 0")
    with session_scope() as session:  # as the worker records an image
        session.add(JobImage(job_id=uuid.UUID(job_id), index=0, seed=3, key=f"images/{me.id}/{job_id}/0.png",
                             sha256="a" * 64, width=256, height=256, size_bytes=10))
    ok = http.post("/v1/jobs", json={**JOB, "image": {"job_id": job_id, "index": 0}, "strength": 0.5})
    assert ok.status_code == 202, ok.text
    assert ok.json()["request"]["image"]["sha256"] == "a" * 64
    stranger = client_for(make_tenant())
    refused(stranger.post("/v1/jobs", json={**JOB, "image": {"job_id": job_id, "index": 0}}), text="no image 0")


def test_an_s3_object_inside_ones_prefix_is_read_checked_and_stored(http, me, s3):
    data = png((5, 250, 5))
    s3.put_object(Bucket=BUCKET, Key=f"images/{me.id}/my-pictures/a.png", Body=data)
    job = http.post("/v1/jobs", json={**JOB, "image": f"s3://{BUCKET}/images/{me.id}/my-pictures/a.png"})
    assert job.status_code == 202, job.text
    sha = job.json()["request"]["image"]["sha256"]
    assert s3.get_object(Bucket=BUCKET, Key=f"images/{me.id}/inputs/{sha}")["Body"].read() == data

    s3.put_object(Bucket=FOREIGN, Key="a.png", Body=data)
    refused(http.post("/v1/jobs", json={**JOB, "image": f"s3://{FOREIGN}/a.png"}), text="own storage prefix")
    other = make_tenant()
    s3.put_object(Bucket=BUCKET, Key=f"images/{other.id}/secret.png", Body=data)
    refused(http.post("/v1/jobs", json={**JOB, "image": f"s3://{BUCKET}/images/{other.id}/secret.png"}),
            text="own storage prefix")
    s3.put_object(Bucket=BUCKET, Key=f"images/{me.id}/notes.txt", Body=b"not an image")
    refused(http.post("/v1/jobs", json={**JOB, "image": f"s3://{BUCKET}/images/{me.id}/notes.txt"}),
            text="could not be read")
    missing = refused(http.post("/v1/jobs", json={**JOB, "image": f"s3://{BUCKET}/images/{me.id}/none.png"}))
    assert "NoSuchKey" not in missing and "404" not in missing  # the store's words stay server-side


@pytest.mark.parametrize("url,why", [
    ("https://10.0.0.1/x.png", "private"), ("https://169.254.169.254/latest/meta-data", "link-local"),
    ("https://user:pw@example.com/x.png", "credentials"), ("http://example.com/x.png", "")])
def test_urls_go_through_the_ssrf_guard(http, url, why):
    refused(http.post("/v1/jobs", json={**JOB, "image": url}), text=why)


@pytest.mark.parametrize("body,field", [
    ({"strength": 0.5}, "strength"),                                   # strength without an image
    ({"image": f"upload:{'1' * 64}", "strength": 0.05}, "strength"),    # 12 steps x 0.05: no step to run
    ({"image": f"upload:{'1' * 64}", "strength": 1.5}, "strength"),
    ({"image": f"upload:{'1' * 64}", "strength": "0.5"}, "strength"),
    ({"image": "ftp://x/y.png"}, "image"),
    ({"image": {"job_id": "not-a-uuid"}}, "image"),
])
def test_bad_remix_fields_are_422_naming_the_field(http, body, field):
    resp = http.post("/v1/jobs", json={**JOB, **body})
    assert resp.status_code == 422 and resp.json()["error"]["field"].startswith(field), resp.text


def test_batch_lines_remix_from_uploads_but_download_nothing(http):
    image = upload(http, png((9, 9, 9))).json()["image"]
    ok = http.post("/v1/batches", json={"items": [{**JOB, "custom_id": f"r{i}", "image": image, "seed": i}
                                                  for i in range(3)]})
    assert ok.status_code == 202, ok.text
    bad = http.post("/v1/batches", json={"items": [
        {**JOB, "custom_id": "url", "image": "https://example.com/x.png"},
        {**JOB, "custom_id": "gone", "image": f"upload:{'2' * 64}"}]})
    assert bad.status_code == 422, bad.text
    errors = bad.json()["error"]["errors"]
    assert [(e["line"], e["field"]) for e in errors] == [(1, "image"), (2, "image")]
    assert "upload:<sha256>" in errors[0]["message"]
