"""common.representation: the public job and batch objects, built from model objects in memory (no session).
What it builds must also be what the API's response models accept, field for field."""
from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

from api.schemas.batches import BatchOut
from api.schemas.jobs import JobOut
from common.batch_counts import RequestCounts
from common.models import Batch, Job, JobImage
from common.representation import REQUEST_FIELDS, batch_representation, job_representation
from common.settings import PricingSettings
from common.usage import Usage
from common.webhooks.outbox import to_json

T0 = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
PARAMS = {"prompt": "a red fox", "prompt_text": "a red fox", "preset": "V4_TURBO_12", "width": 256, "height": 512,
          "steps": 12, "mu": 0.5, "std": 1.75, "guidance_schedule": [7.0] * 11 + [3.0], "guidance_scale": None,
          "seed": 41, "seed_generated": False, "num_images": 2}


def make_job(**kw) -> Job:
    fields = dict(id=uuid.uuid4(), tenant_id=uuid.uuid4(), queue="interactive", status="queued", params=PARAMS,
                  metadata_={"order": 7}, attempts=0, max_attempts=3, preemptions=0, progress_step=0,
                  progress_total=12, error=None, timings=None, created_at=T0, started_at=None, finished_at=None)
    fields.update(kw)
    images = fields.pop("images", [])
    job = Job(**fields)
    job.images = images
    return job


def image(job: Job, index: int) -> JobImage:
    return JobImage(job_id=job.id, index=index, seed=41 + index, key=f"images/t/{job.id}/{index}.png",
                    sha256=f"{index}" * 64, width=256, height=512, size_bytes=1000 + index)


def represent(job: Job, **kw) -> dict:
    url = f"http://api.test/v1/jobs/{job.id}"
    return job_representation(job, self_url=url, image_url=lambda i: f"https://cdn.test/{i.key}", **kw)


def test_a_queued_job():
    job = make_job()
    body = represent(job, queue_position=3, eta_s=12.5)
    assert body["id"] == str(job.id) and body["object"] == "job"
    assert (body["status"], body["queue"], body["queue_position"], body["eta_s"]) == ("queued", "interactive", 3,
                                                                                      12.5)
    assert body["request"] == {"prompt": "a red fox", "preset": "V4_TURBO_12", "width": 256, "height": 512,
                               "seed": 41, "num_images": 2, "steps": 12}
    assert body["metadata"] == {"order": 7}
    assert body["progress"] == {"step": 0, "total": 12, "fraction": 0.0}
    assert (body["attempts"], body["max_attempts"], body["preemptions"]) == (0, 3, 0)
    assert body["images"] == [] and body["error"] is None and body["timings"] is None
    assert body["created_at"] == T0 and body["started_at"] is None and body["finished_at"] is None
    assert body["urls"] == {"self": f"http://api.test/v1/jobs/{job.id}",
                            "cancel": f"http://api.test/v1/jobs/{job.id}/cancel"}
    JobOut.model_validate(body)


def test_request_leaves_out_internal_params_and_nones():
    body = represent(make_job(params={**PARAMS, "guidance_scale": 4.0}))
    assert body["request"]["guidance_scale"] == 4.0
    assert set(body["request"]) <= set(REQUEST_FIELDS)
    for internal in ("prompt_text", "mu", "std", "guidance_schedule", "seed_generated"):
        assert internal not in body["request"]
    assert "guidance_scale" not in represent(make_job())["request"]  # None is left out


def test_a_caption_job_shows_the_caption():
    caption = {"high_level_description": "a poster", "compositional_deconstruction": {"background": "sky"}}
    params = {**{k: v for k, v in PARAMS.items() if k != "prompt"}, "caption": caption, "prompt_text": "{...}"}
    body = represent(make_job(params=params))
    assert body["request"]["caption"] == caption and "prompt" not in body["request"]


def test_progress_of_a_running_job():
    body = represent(make_job(status="running", progress_step=5, progress_total=12, attempts=1, started_at=T0))
    assert body["progress"] == {"step": 5, "total": 12, "fraction": round(5 / 12, 4)}
    # a job whose total was never written falls back to its steps
    assert represent(make_job(progress_total=0, progress_step=3))["progress"] == {"step": 3, "total": 12,
                                                                                   "fraction": 0.25}


def test_a_succeeded_job_lists_its_images_in_order_with_their_urls():
    job = make_job(status="succeeded", progress_step=12, attempts=1, started_at=T0,
                   finished_at=T0 + timedelta(seconds=3), timings={"generate_s": 1.5})
    job.images = [image(job, 0), image(job, 1)]
    body = represent(job)
    assert [i["index"] for i in body["images"]] == [0, 1]
    first = body["images"][0]
    assert first == {"index": 0, "seed": 41, "url": f"https://cdn.test/images/t/{job.id}/0.png",
                     "key": f"images/t/{job.id}/0.png", "sha256": "0" * 64, "width": 256, "height": 512,
                     "size_bytes": 1000}
    assert body["images"][1]["seed"] == 42
    assert body["progress"]["fraction"] == 1.0 and body["timings"] == {"generate_s": 1.5}
    out = JobOut.model_validate(body)
    assert out.images[1].url.endswith("/1.png") and out.finished_at == T0 + timedelta(seconds=3)


def test_a_failed_job_carries_its_error():
    error = {"type": "attempts_exhausted", "message": "gave up after 3 attempts"}
    body = represent(make_job(status="failed", attempts=3, error=error, finished_at=T0))
    assert body["error"] == error and body["attempts"] == 3


def test_the_webhook_serialization_of_a_job_is_plain_json():
    body = to_json(represent(make_job()))
    assert body["created_at"].startswith("2025-01-02T03:04:05") and isinstance(body["created_at"], str)
    assert body["queue_position"] is None and body["eta_s"] is None  # what webhook payloads carry


def test_a_batch():
    batch = Batch(id=uuid.uuid4(), tenant_id=uuid.uuid4(), status="in_progress", input_source="inline",
                  metadata_={"project": "x"}, webhook_url="https://hooks.test/b", invalid={"count": 1, "lines": [3]},
                  manifest_key="manifests/b.jsonl", created_at=T0, in_progress_at=T0 + timedelta(seconds=1),
                  priority="high")
    counts = RequestCounts(total=10, queued=4, running=1, succeeded=3, failed=1, canceled=1)
    url = f"http://api.test/v1/batches/{batch.id}"
    usage = Usage(currency="EUR")
    usage.add(gpu_kind="NVIDIA H200", capacity="spot", seconds=7200.0, images=3, attempts=5, cache_hits=1,
              pricing=PricingSettings(currency="EUR", spot_per_gpu_hour={"H200": 3.0}))
    body = batch_representation(batch, counts, usage, self_url=url)
    assert body["id"] == str(batch.id) and body["object"] == "batch" and body["status"] == "in_progress"
    assert body["request_counts"] == {"total": 10, "queued": 4, "running": 1, "succeeded": 3, "failed": 1,
                                      "canceled": 1}
    assert body["invalid"] == {"count": 1, "lines": [3]} and body["metadata"] == {"project": "x"}
    assert body["webhook_url"] == "https://hooks.test/b" and body["manifest_key"] == "manifests/b.jsonl"
    assert body["results_url"] == url + "/results" and body["priority"] == "high"
    assert body["urls"] == {"self": url, "cancel": url + "/cancel", "retry": url + "/retry",
                            "priority": url + "/priority", "results": url + "/results"}
    assert body["in_progress_at"] == T0 + timedelta(seconds=1) and body["completed_at"] is None
    assert body["usage"] == {"gpu_seconds": 7200.0, "images": 3, "attempts": 4, "estimated_cost": 6.0,
                             "currency": "EUR", "unpriced_gpu_seconds": 0.0,
                             "gpu_seconds_by_kind": {"NVIDIA H200 (spot)": 7200.0}, "cache_hits": 1}
    assert body["cache_hit_rate"] == round(1 / 3, 4)  # of the 3 succeeded items, one was a cache hit
    assert BatchOut.model_validate(body).request_counts.succeeded == 3
