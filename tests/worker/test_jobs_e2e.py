"""One job end to end with real parts: HTTP -> Postgres -> Redis/Celery -> a real worker process running the
tiny Ideogram 4 on the CPU -> S3 (moto server) -> Postgres -> HTTP."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import boto3
from PIL import Image

from tests.support import BEYOND_THE_MODEL, ApiClient, make_tenant
from common.image_files import read_recipe, sha256_hex

JOB = {"prompt": "a poster that says HELLO", "width": 320, "height": 256, "preset": "V4_TURBO_12", "seed": 1234,
       "num_images": 2}


def s3_get(services, key: str) -> bytes:
    s3 = boto3.client("s3", endpoint_url=services["s3"].endpoint_url, region_name="us-east-1",
                      aws_access_key_id="test", aws_secret_access_key="test")
    return s3.get_object(Bucket="letterpress-test", Key=key)["Body"].read()


def usage_rows(job_id: str) -> list[tuple]:
    from common.db import session_scope
    from common.models import UsageRecord

    with session_scope() as session:
        return [(r.outcome, r.attempt, r.gpu_kind, r.capacity, r.gpu_seconds, r.images)
                for r in session.query(UsageRecord).filter(UsageRecord.job_id == job_id).order_by(UsageRecord.id)]


def test_job_succeeds_and_png_in_s3_decodes_with_recipe(client, worker, services, tiny_model, tenant):
    job = client.submit(JOB).json()
    done = client.wait(job["id"])
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 1 and done["error"] is None
    assert done["progress"] == {"step": 12, "total": 12, "fraction": 1.0}
    assert [i["seed"] for i in done["images"]] == [1234, 1235]
    assert done["timings"]["generate_s"] > 0
    # its usage: the generation's seconds on this worker's device, one ledger row of the attempt
    assert done["timings"]["gpu_kind"] == "cpu" and done["timings"]["gpu_seconds"] > 0
    assert usage_rows(job["id"]) == [("succeeded", 1, "cpu", "on_demand", done["timings"]["gpu_seconds"], 2)]
    for image in done["images"]:
        assert image["key"] == f"images/{tenant.id}/{job['id']}/{image['index']}.png"
        data = s3_get(services, image["key"])
        assert sha256_hex(data) == image["sha256"] and len(data) == image["size_bytes"]
        with Image.open(io.BytesIO(data)) as im:
            assert im.format == "PNG" and im.size == (320, 256)
        recipe = read_recipe(data)
        assert recipe["prompt"] == JOB["prompt"] and recipe["seed"] == image["seed"]
        # the console's thumbnail, written beside the image by the worker (common/thumbnails.py)
        with Image.open(io.BytesIO(s3_get(services, image["key"][:-len(".png")] + ".thumb.webp"))) as thumb:
            assert thumb.format == "WEBP" and thumb.size == (320, 256)  # already under 384 px: kept as it is
        assert recipe["preset"] == "V4_TURBO_12" and (recipe["width"], recipe["height"]) == (320, 256)
        assert recipe["model"] == str(tiny_model)
        # the presigned URL serves the same bytes
        import httpx
        assert httpx.get(image["url"]).content == data
    # two seeds -> two different images
    assert done["images"][0]["sha256"] != done["images"][1]["sha256"]


def test_same_request_and_seed_give_identical_bytes(client, worker, api_url):
    a = client.wait(client.submit(JOB).json()["id"])
    other = ApiClient(api_url, make_tenant().key)  # another tenant: a generation again, not the result cache
    b = other.wait(other.submit(JOB).json()["id"])
    assert a["status"] == b["status"] == "succeeded"
    assert not b["timings"].get("cached") and b["timings"]["gpu_seconds"] > 0
    assert [i["sha256"] for i in a["images"]] == [i["sha256"] for i in b["images"]]
    c = client.wait(client.submit({**JOB, "seed": 99, "num_images": 1}).json()["id"])
    assert c["images"][0]["sha256"] != a["images"][0]["sha256"]


def test_the_same_request_again_is_served_from_the_result_cache(client, worker, services, tenant):
    """Same tenant, request and explicit seed: copies of the first run's images, no device time, the same bytes
    under the new job's own keys, answered at submit; a new seed, metadata aside, or a server-chosen seed
    generates."""
    body = {**JOB, "seed": 4321, "num_images": 1}
    first = client.wait(client.submit(body).json()["id"])
    # answered by the API at once (common/cache_answers.py): the worker announced its cache scope, no queue
    again = client.submit({**body, "metadata": {"run": 2}}).json()
    assert first["status"] == again["status"] == "succeeded"
    assert again["timings"]["cached"] is True and again["timings"]["cache_source_job"] == first["id"]
    assert again["timings"]["answered_by"] == "api"
    assert again["cache_hit"] is True and first["cache_hit"] is False
    assert again["timings"]["gpu_seconds"] == 0 and "generate_s" not in again["timings"]
    image, copy = first["images"][0], again["images"][0]
    assert copy["key"] == f"images/{tenant.id}/{again['id']}/0.png" != image["key"]
    assert copy["sha256"] == image["sha256"] and s3_get(services, copy["key"]) == s3_get(services, image["key"])
    assert usage_rows(again["id"]) == [("succeeded", 0, "none", "on_demand", 0.0, 1)]
    for fresh in ({**body, "seed": 4322}, {k: v for k, v in body.items() if k != "seed"}, {**body, "cache": False}):
        done = client.wait(client.submit(fresh).json()["id"])
        assert done["status"] == "succeeded" and not done["cache_hit"], done["timings"]
        assert done["timings"]["gpu_seconds"] > 0


def test_generation_error_fails_the_job_and_worker_keeps_serving(client, worker):
    # a prompt the API admits and the model rejects: the pipeline itself raises
    bad = client.submit({**JOB, "prompt": BEYOND_THE_MODEL, "num_images": 1}).json()
    good = client.submit({**JOB, "num_images": 1, "seed": 7}).json()
    failed = client.wait(bad["id"])
    assert failed["status"] == "failed"
    assert failed["error"]["type"] == "generation_error"
    assert "2048" in failed["error"]["message"]
    assert client.wait(good["id"])["status"] == "succeeded"
    # the failed attempt is in the ledger too (its device time was used), with no image
    ((outcome, attempt, _, _, seconds, images),) = usage_rows(bad["id"])
    assert (outcome, attempt, images) == ("failed", 1, 0) and seconds >= 0


def test_cancel_queued_at_once_running_at_next_step_finished_409(client, worker):
    # a long job keeps the single worker busy, so the next one is certainly still queued
    long_job = client.submit({**JOB, "width": 1024, "height": 1024, "steps": 200, "num_images": 1}).json()
    queued = client.submit({**JOB, "num_images": 1}).json()
    from tests.support import wait_until
    wait_until(lambda: client.get(long_job["id"])["progress"]["step"] > 0, 60, what="long job running")
    resp = client.http.post(f"/v1/jobs/{queued['id']}/cancel")
    assert resp.status_code == 200 and resp.json()["status"] == "canceled"
    running = client.http.post(f"/v1/jobs/{long_job['id']}/cancel").json()
    assert running["status"] == "running"
    stopped = client.wait(long_job["id"], timeout=60)
    assert stopped["status"] == "canceled" and stopped["progress"]["step"] < 200 and stopped["images"] == []
    again = client.http.post(f"/v1/jobs/{long_job['id']}/cancel")
    assert again.status_code == 409 and again.json()["error"]["type"] == "conflict"


def test_letterpress_status_shows_the_worker_the_queues_and_recent_images(client, worker, stack_env):
    done = client.wait(client.submit({**JOB, "num_images": 1, "seed": 5}).json()["id"])
    assert done["status"] == "succeeded"
    cmd = [sys.executable, "-m", "common.cli.main", "status"]
    result = subprocess.run([*cmd, "--json"], env={**os.environ, **stack_env}, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    status = json.loads(result.stdout)
    assert status["errors"] == []
    (me,) = [w for w in status["workers"] if w["worker_id"] == done["timings"]["worker"]]
    assert me["state"] == "ready" and me["gpu_kind"] == "cpu" and me["capacity"] == "on_demand"
    assert me["variant"] and me["model"] and me["images_per_min"] > 0  # the image above, in the last 5 minutes
    assert set(status["queues"]) == {"interactive-high", "interactive", "interactive-low", "batch"}
    assert all({"waiting", "running", "in_broker", "oldest_waiting_s"} <= set(q) for q in status["queues"].values())
    table = subprocess.run(cmd, env={**os.environ, **stack_env}, capture_output=True, text=True, timeout=60)
    assert table.returncode == 0 and me["worker_id"] in table.stdout and "Batches in progress" in table.stdout


def test_webp_and_jpeg_jobs_store_their_format_with_the_recipe_inside(client, worker, services, tenant):
    jobs = {fmt: client.submit({**JOB, "num_images": 1, "seed": 77, "output_format": fmt, "output_quality": 70}
                               ).json()["id"] for fmt in ("webp", "jpeg")}
    png = client.wait(client.submit({**JOB, "num_images": 1, "seed": 77}).json()["id"])
    for fmt, extension, pil in (("webp", "webp", "WEBP"), ("jpeg", "jpg", "JPEG")):
        done = client.wait(jobs[fmt])
        assert done["status"] == "succeeded", done
        (image,) = done["images"]
        assert image["key"] == f"images/{tenant.id}/{done['id']}/0.{extension}"
        data = s3_get(services, image["key"])
        assert sha256_hex(data) == image["sha256"] and len(data) == image["size_bytes"]
        with Image.open(io.BytesIO(data)) as im:
            assert im.format == pil and im.size == (320, 256)
        recipe = read_recipe(data)
        assert recipe["output_format"] == fmt and recipe["output_quality"] == 70 and recipe["seed"] == 77
        assert recipe["prompt"] == JOB["prompt"]
        import httpx
        served = httpx.get(image["url"])
        assert served.content == data and served.headers["content-type"] == f"image/{fmt}"
        assert image["size_bytes"] < png["images"][0]["size_bytes"]  # lossy formats, smaller files
