"""Dynamic batching with real processes: a worker with batching on takes compatible queued jobs along into one
call (each still claimed, stored and completed on its own; their own deliveries are no-ops), leaves other sizes
alone, gives each job its own seed's image, and loses nothing when it is killed holding a batch."""
from __future__ import annotations

import io
import signal

import boto3
import numpy as np
from PIL import Image

from tests.support import BEYOND_THE_MODEL, wait_until

BATCHING = {"LETTERPRESS_WORKER__BATCHING__ENABLED": "true", "LETTERPRESS_WORKER__BATCHING__MAX_BATCH": "4",
            "LETTERPRESS_WORKER__BATCHING__MAX_PIXELS": str(256 * 256)}
SMALL = {"width": 256, "height": 256, "preset": "V4_TURBO_12", "steps": 4}
PROMPTS = ["a red fox", "a sign that says OPEN in neon letters", "a lighthouse at dusk, oil painting"]


def s3_image(stack, key: str) -> np.ndarray:
    s3 = boto3.client("s3", endpoint_url=stack.env["LETTERPRESS_STORAGE__ENDPOINT_URL"], region_name="us-east-1",
                      aws_access_key_id="test", aws_secret_access_key="test")
    bucket = stack.env["LETTERPRESS_STORAGE__URL"].removeprefix("s3://").split("/")[0]
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    return np.asarray(Image.open(io.BytesIO(body)).convert("RGB"), dtype=np.int16)


def reference_pixels(body: dict) -> np.ndarray:
    """The job's image generated alone, in this process, by the worker's own runner."""
    from common.job_request import JobRequest, to_params
    from common.settings import ApiSettings, get_settings
    from worker.attempt import spec_from_params
    from worker.pipeline.runner import PipelineRunner

    runner = PipelineRunner(get_settings())
    image = runner.run(spec_from_params(to_params(JobRequest(**body), ApiSettings())))[0]
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_queued_compatible_jobs_run_as_one_batch(fresh_workers, tiny_model):
    stack = fresh_workers
    client = stack.client()
    bodies = [{**SMALL, "prompt": p, "seed": 40 + i} for i, p in enumerate(PROMPTS)]
    other_size = {**SMALL, "width": 512, "prompt": "a wide one", "seed": 7}
    ids = [client.submit(b).json()["id"] for b in bodies]
    alone_id = client.submit(other_size).json()["id"]
    name, _ = stack.start_worker(BATCHING)  # everything is queued before the worker starts

    jobs = [client.wait(i, timeout=180) for i in ids]
    alone = client.wait(alone_id, timeout=180)
    assert [j["status"] for j in jobs] == ["succeeded"] * 3
    assert [j["timings"].get("batch") for j in jobs] == [3, 3, 3], [j["timings"] for j in jobs]
    assert [(j["attempts"], j["preemptions"]) for j in jobs] == [(1, 0)] * 3
    assert alone["status"] == "succeeded" and "batch" not in alone["timings"]
    log = stack.procs.log(name)
    assert log.count("batched with") == 1
    wait_until(lambda: stack.procs.log(name).count("duplicate delivery ignored") >= 2, 30,
               what="the batched jobs' own deliveries acknowledged as no-ops")

    # each job got its own seed's image: the one it gets alone, up to the float rounding that the other prompts'
    # padding brings (docs/PERFORMANCE.md, "Dynamic batching"; measured here: max 1 level, in 19-57 of 196,608
    # values); distinct jobs give distinct images
    images = [s3_image(stack, j["images"][0]["key"]) for j in jobs]
    for body, image in zip(bodies, images):
        diff = np.abs(image - reference_pixels(body))
        assert diff.max() <= 2, (body["prompt"], int(diff.max()))
    assert len({j["images"][0]["sha256"] for j in jobs}) == 3


def test_a_worker_killed_holding_a_batch_loses_no_job(fresh_workers, tiny_model):
    stack = fresh_workers
    client = stack.client()
    slow = {**SMALL, "steps": 60}
    ids = [client.submit({**slow, "prompt": p, "seed": i}).json()["id"] for i, p in enumerate(PROMPTS)]
    name, _ = stack.start_worker(BATCHING)
    wait_until(lambda: all(client.get(i)["status"] == "running" for i in ids), 90, what="the batch running")
    stack.procs.signal(name, signal.SIGKILL)
    stack.start_worker()  # batching off: each job re-runs alone after its lease expires
    jobs = [client.wait(i, timeout=240) for i in ids]
    assert [(j["status"], j["attempts"]) for j in jobs] == [("succeeded", 2)] * 3
    assert all("batch" not in j["timings"] for j in jobs)


def test_a_bad_job_in_a_batch_fails_alone(fresh_workers, tiny_model):
    stack = fresh_workers
    client = stack.client()
    # a prompt the API admits and the model rejects: the pipeline raises for this job only
    bodies = [{**SMALL, "prompt": "a red fox", "seed": 1}, {**SMALL, "prompt": BEYOND_THE_MODEL, "seed": 2},
              {**SMALL, "prompt": "a blue fox", "seed": 3}]
    ids = [client.submit(b).json()["id"] for b in bodies]
    name, _ = stack.start_worker(BATCHING)
    jobs = [client.wait(i, timeout=180) for i in ids]
    assert [j["status"] for j in jobs] == ["succeeded", "failed", "succeeded"]
    assert jobs[1]["error"]["type"] == "generation_error" and "2048" in jobs[1]["error"]["message"]
    assert [j["attempts"] for j in jobs] == [1, 1, 1]
    assert "running its jobs one by one" in stack.procs.log(name)
