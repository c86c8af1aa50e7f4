"""Chaos: a few hundred tiny-model jobs while workers are SIGKILLed, SIGTERMed and frozen (SIGSTOP for longer than
the lease, then SIGCONT) at random and Redis and Postgres are killed and restarted. Then: every accepted job terminal and succeeded, none lost or duplicated, one image per
job, each image's bytes equal to an undisturbed in-process reference, attempts accounted (preemptions free).

`LETTERPRESS_CHAOS_JOBS` / `LETTERPRESS_CHAOS_SECONDS` make it a longer soak (defaults: 200 jobs, 30 s of chaos).
"""
from __future__ import annotations

import hashlib
import os
import random
import signal
import threading
import time
import uuid

import boto3
import httpx
import pytest
from sqlalchemy import text

from tests.worker.conftest import make_own_stack

N_JOBS = int(os.environ.get("LETTERPRESS_CHAOS_JOBS", "200"))
CHAOS_S = float(os.environ.get("LETTERPRESS_CHAOS_SECONDS", "30"))
N_WORKERS = 3
SEEDS = list(range(100, 108))  # few distinct recipes, so the reference is cheap to compute
JOB = {"prompt": "a neon sign that says OPEN", "width": 64, "height": 64, "preset": "V4_TURBO_12", "steps": 6}


@pytest.fixture(scope="module")
def chaos_stack(services, stack_env, tmp_path_factory):
    bucket = f"chaos-{uuid.uuid4().hex[:6]}"
    stack = make_own_stack(services, stack_env, tmp_path_factory, bucket=bucket,
                           LETTERPRESS_API__MIN_SIDE="64", LETTERPRESS_WORKER__MAX_ATTEMPTS="50",
                           LETTERPRESS_WORKER__DRAIN_GRACE_S="0.3")
    stack.bucket = bucket
    yield stack
    stack.procs.stop_all()
    stack.engine.dispose()
    stack.redis.stop()
    stack.pg.stop()


def reference_digests(model_path: str) -> dict[int, str]:
    """sha256 of each seed's PNG, generated in this process with the worker's own runner, undisturbed."""
    from common.job_request import JobRequest, to_params
    from common.png import encode_png, recipe
    from common.settings import ApiSettings, get_settings
    from worker.attempt import spec_from_params
    from worker.runner import PipelineRunner

    runner = PipelineRunner(get_settings())
    runner.load()
    digests = {}
    for seed in SEEDS:
        params = to_params(JobRequest(**JOB, seed=seed), ApiSettings(min_side=64))
        image = runner.run(spec_from_params(params))[0]
        body = recipe(params, seed=seed, model_id=runner.model_id, revision=runner.revision)
        digests[seed] = hashlib.sha256(encode_png(image, body)).hexdigest()
    return digests


class Submitter(threading.Thread):
    """Submits every job, paced over the chaos window so faults hit work in flight, retrying through outages with
    the same Idempotency-Key (so a retry never duplicates)."""

    def __init__(self, api_url: str, key: str):
        super().__init__(daemon=True)
        self.http = httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {key}"}, timeout=10)
        self.accepted: dict[str, int] = {}  # job id -> seed

    def run(self) -> None:
        for i in range(N_JOBS):
            seed = SEEDS[i % len(SEEDS)]
            while True:
                try:
                    resp = self.http.post("/v1/jobs", json={**JOB, "seed": seed},
                                          headers={"Idempotency-Key": f"chaos-{i}"})
                    if resp.status_code in (200, 202):
                        self.accepted[resp.json()["id"]] = seed
                        break
                    assert resp.status_code == 503, resp.text  # Postgres down: a clear refusal, try again
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
            time.sleep(CHAOS_S / N_JOBS)


def held_jobs(stack) -> dict[int, str]:
    """pid of each worker holding a running job -> that job's id."""
    with stack.engine.connect() as conn:
        rows = conn.execute(text("SELECT id::text, worker_id FROM jobs WHERE status = 'running'")).all()
    return {int(r.worker_id.split(":")[1]): r.id for r in rows if r.worker_id}


def busy_worker(stack, workers: list[str], rng: random.Random, timeout: float = 5.0) -> str:
    """A worker holding a running job (waiting a little for one), else any worker."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        held = held_jobs(stack)
        busy = [w for w in workers if stack.procs.procs[w].pid in held]
        if busy:
            return rng.choice(busy)
        time.sleep(0.05)
    return rng.choice(workers)


def wait_taken_over(stack, pid: int, timeout: float = 20.0) -> None:
    """Until the job held by worker `pid` runs under another attempt or is finished (or nothing was held)."""
    job_id = held_jobs(stack).get(pid)
    deadline = time.monotonic() + timeout
    while job_id and time.monotonic() < deadline:
        with stack.engine.connect() as conn:
            row = conn.execute(text("SELECT status, worker_id FROM jobs WHERE id = :id"), {"id": job_id}).one()
        if row.status in ("succeeded", "failed", "canceled") or (
                row.status == "running" and int(row.worker_id.split(":")[1]) != pid):
            return
        time.sleep(0.05)


def test_chaos(chaos_stack, tiny_model):
    stack = chaos_stack
    reference = reference_digests(str(tiny_model))
    client = stack.client()
    workers = [stack.start_worker()[0] for _ in range(N_WORKERS)]
    submitter = Submitter(stack.api_url, client.http.headers["Authorization"].split()[1])
    submitter.start()

    rng = random.Random(1234)
    counts = {"sigkill": 0, "sigterm": 0, "sigstop": 0, "redis": 0, "postgres": 0}
    plan = list(counts) * 2  # every fault at least twice, in random order, then random ones
    rng.shuffle(plan)
    deadline = time.monotonic() + CHAOS_S
    while time.monotonic() < deadline or plan:
        time.sleep(rng.uniform(1.5, 3.0))
        action = plan.pop() if plan else rng.choice(list(counts))
        counts[action] += 1
        if action == "sigstop":
            # a frozen worker (VM pause, swap storm) outlives its lease; it wakes as soon as another worker has taken
            # its job over, and fencing must keep it from writing anything
            victim = busy_worker(stack, workers, rng)
            stack.procs.signal(victim, signal.SIGSTOP)
            wait_taken_over(stack, stack.procs.procs[victim].pid)
            stack.procs.signal(victim, signal.SIGCONT)
        elif action in ("sigkill", "sigterm"):
            victim = busy_worker(stack, workers, rng)
            stack.procs.signal(victim, signal.SIGKILL if action == "sigkill" else signal.SIGTERM)
            stack.procs.wait_exit(victim, timeout=60)
            workers.remove(victim)
            workers.append(stack.start_worker(wait=False)[0])
        elif action == "redis":
            stack.redis.kill()
            time.sleep(1.0)
            stack.redis.start()
        else:
            stack.pg.kill()
            time.sleep(1.0)
            stack.pg.start()
    submitter.join(timeout=120)
    assert not submitter.is_alive(), "submissions did not finish"
    assert len(submitter.accepted) == N_JOBS

    def all_terminal():
        with stack.engine.connect() as conn:
            return conn.execute(text("SELECT count(*) FROM jobs WHERE status NOT IN "
                                     "('succeeded','failed','canceled')")).scalar() == 0
    from tests.support import wait_until
    wait_until(all_terminal, 240, interval=1.0, what="every job terminal")

    with stack.engine.connect() as conn:
        jobs = conn.execute(text("SELECT id::text, status, attempts, preemptions, error FROM jobs")).all()
        images = conn.execute(text("SELECT job_id::text, index, key, sha256 FROM job_images")).all()
    print(f"chaos actions: {counts}; attempts: {sum(j.attempts for j in jobs)}; "
          f"preemptions: {sum(j.preemptions for j in jobs)}")
    # none lost, none duplicated (idempotent retries), all succeeded
    assert {j.id for j in jobs} == set(submitter.accepted)
    assert [j for j in jobs if j.status != "succeeded"] == []
    # one image per job, the undisturbed reference's bytes
    assert sorted(i.job_id for i in images) == sorted(submitter.accepted)
    for image in images:
        assert image.index == 0
        assert image.sha256 == reference[submitter.accepted[image.job_id]], image
    # storage holds exactly those objects, with those bytes
    s3 = boto3.client("s3", endpoint_url=stack.env["LETTERPRESS_STORAGE__ENDPOINT_URL"], region_name="us-east-1",
                      aws_access_key_id="test", aws_secret_access_key="test")
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=stack.bucket)
            for o in page.get("Contents", [])]
    assert sorted(keys) == sorted(i.key for i in images)
    for image in rng.sample(images, 20):
        body = s3.get_object(Bucket=stack.bucket, Key=image.key)["Body"].read()
        assert hashlib.sha256(body).hexdigest() == image.sha256
    # at most one success per job: count the attempts that got past the fenced `complete`
    successes = sum(stack.procs.log(name).count(": 'succeeded'") for name in stack.workers)
    assert successes == N_JOBS, (successes, N_JOBS)
    # attempts: a SIGKILL costs at most the one job its worker held; a Postgres outage at most one attempt per
    # running worker; a SIGTERM preemption costs nothing
    extra = sum(j.attempts - 1 for j in jobs)
    assert extra <= counts["sigkill"] + counts["sigstop"] + N_WORKERS * (counts["postgres"] + counts["redis"]), (
        extra, counts)
    assert sum(j.preemptions for j in jobs) <= counts["sigterm"]
