"""Batches end to end with real parts: HTTP -> Postgres -> the feeder (in the worker) -> Redis/Celery -> a real
worker process running the tiny Ideogram 4 on the CPU -> S3 (moto) -> the manifest in S3 and over HTTP.

The tiny model's generation is mostly VAE decode: measured in-process on this 2-core machine (shared, load
average about 6) at 2.2 s a job for 256x256 with 2 steps (the API's smallest side by default) and 0.2-0.3 s at
64x64 with one step. So this module runs its own API process that accepts 64x64 (LETTERPRESS_API__MIN_SIDE=16; the
worker has no such limit) and a 1,000-line batch stays within minutes."""
from __future__ import annotations

import io
import json
import sys
import time
import uuid

import boto3
import httpx
import pytest
import redis
from PIL import Image
from sqlalchemy import func, select

from tests.support import BEYOND_THE_MODEL, ApiClient, wait_until
from common.image_files import sha256_hex

SIDE = 64
LINE = {"width": SIDE, "height": SIDE, "preset": "V4_TURBO_12", "steps": 1}
FEED_DEPTH = 8  # common.settings.BatchSettings default, which the session's worker runs with


@pytest.fixture(scope="module")
def small_api(processes, worker):
    yield processes.start_api("api-small", {"LETTERPRESS_API__MIN_SIDE": "16"})
    processes.stop("api-small")


@pytest.fixture(scope="module")
def second_worker(processes, worker):
    """A second worker process: two feeders compete for the advisory lock and two workers share one batch."""
    yield processes.start_worker("w-batches")
    processes.stop("w-batches")


@pytest.fixture
def client(small_api, tenant) -> ApiClient:
    return ApiClient(small_api, tenant.key)


def lines(n: int, tag: str = "p") -> list[dict]:
    """Eight prompts in turn, one seed a line: the worker's text-encoder cache (128 prompts) then spares the
    tiny model's text encoder, about half of a 64x64 job's CPU time, and every line is still its own image."""
    return [{**LINE, "custom_id": f"{tag}-{i:04d}", "prompt": f"a poster that says {tag} {i % 8}", "seed": i}
            for i in range(n)]


def s3(services):
    return boto3.client("s3", endpoint_url=services["s3"].endpoint_url, region_name="us-east-1",
                        aws_access_key_id="test", aws_secret_access_key="test")


def get_batch(client, batch_id: str) -> dict:
    resp = client.http.get(f"/v1/batches/{batch_id}")
    resp.raise_for_status()
    return resp.json()


def wait_batch(client, batch_id: str, statuses=("completed", "failed", "cancelled"), timeout=240.0) -> dict:
    return wait_until(lambda: (b := get_batch(client, batch_id))["status"] in statuses and b, timeout,
                      interval=0.5, what=f"batch {batch_id} in {statuses}")


def results(client, batch_id: str) -> list[dict]:
    resp = client.http.get(f"/v1/batches/{batch_id}/results")
    resp.raise_for_status()
    return [json.loads(line) for line in resp.text.splitlines()]


def jobs_of(batch_id: str) -> dict[str, dict]:
    from common.db import session_scope
    from common.models import Job

    with session_scope() as session:
        return {j.custom_id: {"id": j.id, "status": j.status, "attempts": j.attempts, "finished_at": j.finished_at,
                              "started_at": j.started_at, "worker_id": j.worker_id,
                              "gpu_seconds": (j.timings or {}).get("gpu_seconds")}
                for j in session.scalars(select(Job).where(Job.batch_id == uuid.UUID(batch_id)))}


@pytest.mark.timeout(1200)  # measured 204-741 s with two workers on a shared 2-core machine (load 3-17)
def test_1000_line_batch_end_to_end_with_a_manifest_naming_every_line(client, worker, second_worker, services,
                                                                       tenant):
    t0 = time.monotonic()
    payload = "".join(json.dumps(x) + "\n" for x in lines(1000)).encode()
    resp = client.http.post("/v1/batches", files={"file": ("prompts.jsonl", payload)},
                            data={"metadata": json.dumps({"run": "ci"})})
    assert resp.status_code == 202, resp.text
    batch = resp.json()
    done = wait_batch(client, batch["id"], timeout=1150)
    elapsed = time.monotonic() - t0
    assert done["status"] == "completed", done
    assert done["request_counts"] == {"total": 1000, "queued": 0, "running": 0, "succeeded": 1000, "failed": 0,
                                      "canceled": 0}
    assert done["finalizing_at"] and done["completed_at"] and done["manifest_written_at"]
    manifest = results(client, batch["id"])
    assert [m["custom_id"] for m in manifest] == [f"p-{i:04d}" for i in range(1000)]
    assert [m["line"] for m in manifest] == list(range(1, 1001))
    assert [m["seed"] for m in manifest] == list(range(1000))
    assert all(m["status"] == "succeeded" and m["error"] is None for m in manifest)
    assert len({m["key"] for m in manifest}) == 1000
    assert all(m["key"] == f"images/{tenant.id}/{m['job_id']}/0.png" for m in manifest)
    # the stored manifest sits beside the images and says the same (keys, not expiring URLs)
    stored_key = f"images/{tenant.id}/batches/{batch['id']}/manifest.jsonl"
    assert done["manifest_key"] == stored_key
    stored = [json.loads(x) for x in s3(services).get_object(Bucket="letterpress-test",
                                                            Key=stored_key)["Body"].read().splitlines()]
    assert [{**m, "url": None} for m in manifest] == stored
    # images are real PNGs of the asked size whose bytes match the manifest
    for m in manifest[::199]:
        data = s3(services).get_object(Bucket="letterpress-test", Key=m["key"])["Body"].read()
        assert sha256_hex(data) == m["sha256"] and httpx.get(m["url"]).content == data
        with Image.open(io.BytesIO(data)) as im:
            assert im.size == (SIDE, SIDE)
    workers = {j["worker_id"] for j in jobs_of(batch["id"]).values()}
    assert len(workers) == 2, workers  # both workers took items of the one batch; each item ran once
    assert {j["attempts"] for j in jobs_of(batch["id"]).values()} == {1}
    # usage: the batch's figure is the sum of its items' recorded seconds, priced as configured (stack_env: a CPU
    # worker's second costs 3.6/3600)
    recorded = sum(j["gpu_seconds"] for j in jobs_of(batch["id"]).values())
    usage = done["usage"]
    assert usage["images"] == 1000 and usage["attempts"] == 1000 and recorded > 0
    assert usage["gpu_seconds"] == pytest.approx(recorded, abs=1e-3)
    assert usage["estimated_cost"] == pytest.approx(recorded * 3.6 / 3600, abs=1e-6)
    assert usage["gpu_seconds_by_kind"] == {"cpu (on_demand)": usage["gpu_seconds"]}
    assert usage["unpriced_gpu_seconds"] == 0
    print(f"\n1000-line batch: {elapsed:.1f}s end to end ({1000 / elapsed:.1f} images/s)")


def test_interactive_job_starts_before_a_500_job_batch_drains_and_cancel(client, worker, services):
    broker = redis.Redis.from_url(services["redis_url"])
    batch = client.http.post("/v1/batches", json={"items": lines(500, "bulk")}).json()
    wait_until(lambda: get_batch(client, batch["id"])["request_counts"]["succeeded"] >= 20, 120,
               what="batch under way")
    depths = []
    for _ in range(10):  # the broker holds a bounded window of the batch, never the 480 waiting items
        depths.append(broker.llen("batch"))
        time.sleep(0.05)
    assert max(depths) <= FEED_DEPTH, depths
    job = client.submit({**LINE, "prompt": "an interactive poster", "seed": 1}).json()
    done = client.wait(job["id"], timeout=60)
    assert done["status"] == "succeeded"
    from common.db import session_scope
    from common.job_states import get_job
    from common.models import Job

    with session_scope() as session:
        interactive = get_job(session, job["id"])
        overtaken = session.scalar(select(func.count()).select_from(Job).where(
            Job.batch_id == uuid.UUID(batch["id"]), Job.started_at > interactive.created_at,
            Job.started_at < interactive.started_at))
        left = session.scalar(select(func.count()).select_from(Job).where(
            Job.batch_id == uuid.UUID(batch["id"]), Job.status == "queued"))
    # at most the shallow window that was already in the broker went first; most of the batch was still waiting
    assert overtaken <= FEED_DEPTH + 2, overtaken  # + one message in the hand of each worker
    assert left > 300, left

    cancel = client.http.post(f"/v1/batches/{batch['id']}/cancel").json()
    assert "error" not in cancel, cancel
    assert cancel["status"] == "cancelling" and cancel["request_counts"]["queued"] == 0
    # at most two a worker (two workers in this module): one generating, and the one before it still being
    # stored on the finisher thread (worker.attempt, overlap_finish), which stays `running` until it completes
    assert cancel["request_counts"]["running"] <= 4
    ended = wait_batch(client, batch["id"], timeout=60)
    counts = ended["request_counts"]
    assert ended["status"] == "cancelled" and ended["cancelled_at"]
    assert counts["succeeded"] + counts["canceled"] == 500 and counts["canceled"] > 300
    manifest = results(client, batch["id"])
    assert len(manifest) == 500 and {m["status"] for m in manifest} == {"succeeded", "canceled"}
    time.sleep(1.0)  # the feeder stopped: nothing of the batch is left in the broker, nothing ran after
    assert broker.llen("batch") == 0
    assert get_batch(client, batch["id"])["request_counts"] == counts


def test_resume_with_the_same_idempotency_key_runs_only_what_did_not_succeed(client, worker):
    key = {"Idempotency-Key": f"resume-{uuid.uuid4().hex}"}
    body = {"items": lines(24, "resume")}
    batch = client.http.post("/v1/batches", json=body, headers=key).json()
    wait_until(lambda: get_batch(client, batch["id"])["request_counts"]["succeeded"] >= 6, 60, what="partial run")
    client.http.post(f"/v1/batches/{batch['id']}/cancel")
    partial = wait_batch(client, batch["id"], statuses=("cancelled",), timeout=60)
    before = jobs_of(batch["id"])
    done_before = {cid for cid, j in before.items() if j["status"] == "succeeded"}
    assert 6 <= len(done_before) < 24 and partial["request_counts"]["canceled"] == 24 - len(done_before)

    again = client.http.post("/v1/batches", json=body, headers=key)
    assert again.status_code == 200 and again.json()["id"] == batch["id"]
    assert again.json()["status"] == "in_progress" and again.json()["request_counts"]["queued"] == 24 - len(done_before)
    done = wait_batch(client, batch["id"], timeout=120)
    assert done["status"] == "completed" and done["request_counts"]["succeeded"] == 24 and done["cancelled_at"] is None
    after = jobs_of(batch["id"])
    for cid in done_before:  # the items that had succeeded were not run again
        assert after[cid]["finished_at"] == before[cid]["finished_at"] and after[cid]["attempts"] == 1
    assert {m["custom_id"] for m in results(client, batch["id"])} == {f"resume-{i:04d}" for i in range(24)}


def test_retry_reruns_only_the_failed_items(client, worker):
    # prompts the API admits and the model rejects: generation itself raises for those lines
    items = lines(3, "ok") + [{**LINE, "custom_id": f"bad-{i}", "prompt": BEYOND_THE_MODEL} for i in range(2)]
    resp = client.http.post("/v1/batches", json={"items": items})
    assert resp.status_code == 202, resp.text
    batch = resp.json()
    first = wait_batch(client, batch["id"], timeout=60)
    assert first["status"] == "completed"
    assert (first["request_counts"]["succeeded"], first["request_counts"]["failed"]) == (3, 2)
    errors = {m["custom_id"]: m["error"] for m in results(client, batch["id"])}
    assert errors["bad-0"]["type"] == "generation_error" and errors["ok-0000"] is None
    before = jobs_of(batch["id"])

    retried = client.http.post(f"/v1/batches/{batch['id']}/retry").json()
    assert retried["status"] == "in_progress" and retried["request_counts"]["queued"] == 2
    second = wait_batch(client, batch["id"], timeout=60)
    assert second["status"] == "completed" and second["request_counts"]["failed"] == 2
    after = jobs_of(batch["id"])
    for cid in ("ok-0000", "ok-0001", "ok-0002"):
        assert after[cid]["finished_at"] == before[cid]["finished_at"]
    for cid in ("bad-0", "bad-1"):
        assert after[cid]["finished_at"] > before[cid]["finished_at"]


@pytest.mark.parametrize("path", ["cancel", "retry"])
def test_control_on_an_unknown_batch_is_404(client, path):
    assert client.http.post(f"/v1/batches/{uuid.uuid4()}/{path}").status_code == 404


def test_cli_batch_run_wait_out_then_rerun_resumes_and_skips_files(client, small_api, tenant, tmp_path):
    import subprocess

    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines(5, "cli/x")))  # "/" is not a file name: hashed
    env = {**__import__("os").environ, "LETTERPRESS_API_URL": small_api, "LETTERPRESS_API_KEY": tenant.key}
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "common.cli.main", "batch", "run", str(src), "--wait", "--out", str(out)]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "submitted: 5 items" in first.stdout and "5 image(s) written" in first.stdout
    assert "img/s" in first.stderr or "s/img" in first.stderr  # the progress bar showed a rate
    assert "GPU-seconds" in first.stdout and "so far" in first.stdout  # the batch's usage and cost
    manifest = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert [m["custom_id"] for m in manifest] == [f"cli/x-{i:04d}" for i in range(5)]
    for m in manifest:
        (name,) = m["files"]
        assert name.startswith("cli_x-") and sha256_hex((out / name).read_bytes()) == m["sha256"]
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed" in again.stdout and "0 image(s) written, 5 already there" in again.stdout
    assert len(client.http.get("/v1/batches").json()["data"]) == 1
    # the tenant's usage, by batch: this one batch, its five images, priced
    (batch,) = client.http.get("/v1/batches").json()["data"]
    usage = subprocess.run([sys.executable, "-m", "common.cli.main", "usage", "--group-by", "batch", "--json"],
                           env=env, capture_output=True, text=True, timeout=60)
    assert usage.returncode == 0, usage.stderr
    (row,) = json.loads(usage.stdout)["data"]
    assert row["batch"] == batch["id"] and row["images"] == 5 and row["gpu_seconds"] == batch["usage"]["gpu_seconds"]
    table = subprocess.run([sys.executable, "-m", "common.cli.main", "usage", "--group-by", "batch"], env=env,
                           capture_output=True, text=True, timeout=60)
    assert table.returncode == 0 and batch["id"] in table.stdout and "total" in table.stdout

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**LINE, "custom_id": "a", "prompt": "x"}) + "\n" + "{oops\n")
    refused = subprocess.run([sys.executable, "-m", "common.cli.main", "batch", "run", str(bad)], env=env,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "line 2" in refused.stderr


def test_a_batch_run_again_is_answered_from_the_result_cache(client, worker):
    """The same lines (explicit seeds) in a second batch: every item is a cache hit, shown in the batch object."""
    items = [{**line, "seed": 900 + i} for i, line in enumerate(lines(3, "cache"))]
    first = wait_batch(client, client.http.post("/v1/batches", json={"items": items}).json()["id"])
    assert first["status"] == "completed" and first["usage"]["cache_hits"] == 0 and first["cache_hit_rate"] == 0
    again = wait_batch(client, client.http.post("/v1/batches", json={"items": items}).json()["id"])
    assert again["status"] == "completed" and again["request_counts"]["succeeded"] == 3
    assert again["usage"]["cache_hits"] == 3 and again["cache_hit_rate"] == 1.0
    assert again["usage"]["gpu_seconds"] == 0 and again["usage"]["attempts"] == 0
