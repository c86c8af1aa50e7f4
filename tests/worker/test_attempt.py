"""worker.attempt.run_attempt in-process, against the real Postgres, Redis and S3 of the test stack, with a fake
runner in place of the GPU (AttemptContext.runner is duck-typed): claim, generate with a heartbeat, store PNGs at
deterministic keys, record the outcome; duplicates, failures, cancels, drains and lost leases.

Each test's jobs sit in a queue of their own, so a requeue's Celery message can be counted in Redis, and nothing
else (a stack worker, another test) ever sees them."""
from __future__ import annotations

import base64
import io
import time
import uuid

import numpy as np
import pytest
import redis
from PIL import Image
from sqlalchemy import text

from common import job_states
from common.db import session_scope
from common.errors import StorageError
from common.job_request import JobRequest, image_seeds, to_params
from common.settings import ApiSettings, get_settings
from common.storage import image_key, open_storage
from worker.attempt import AttemptContext, run_attempt, wait_for_finishing
from worker.co_batching import CoBatchingPolicy
from worker.drain import Drain
from worker.pipeline.spec import GenerationInterrupted
from common.image_files import read_recipe, sha256_hex

W, H = 64, 48


def fake_image(spec, seed: int) -> Image.Image:
    """Pixels that depend on the seed and the prompt only, like the real model's."""
    rng = np.random.default_rng([seed, len(spec.prompt_text)])
    return Image.fromarray(rng.integers(0, 256, (spec.height, spec.width, 3), dtype=np.uint8), "RGB")


class FakeRunner:
    """The runner's interface: `run(spec, on_step, should_stop, previews)`, `run_batch(specs, ...)`, `model_id`,
    `revision`, `variant`. A preview (when asked for) is a fake JPEG naming its step and image row.
    Checks `should_stop` at every step boundary as the real generation does. `at_step(step)` runs test code inside
    the generation; with `wait_for_stop` the runner then keeps "generating" until told to stop."""

    model_id = "fake/ideogram-4-tiny"
    revision = "rev-1"
    variant = "fake"

    def __init__(self, *, fail: Exception | None = None, at_step=None, wait_for_stop: bool = False,
                 fail_batch: Exception | None = None):
        self.fail, self.at_step, self.wait_for_stop, self.fail_batch = fail, at_step, wait_for_stop, fail_batch
        self.runs: list = []
        self.batches: list = []
        self.steps: list[tuple[int, int]] = []

    def _steps(self, spec, on_step, should_stop, previews=None, rows: int = 1):
        for step in range(1, spec.steps + 1):
            if should_stop and should_stop():
                raise GenerationInterrupted(step - 1, spec.steps)
            if self.at_step:
                self.at_step(step)
            if self.wait_for_stop:
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline:
                    if should_stop():
                        raise GenerationInterrupted(step, spec.steps)
                    time.sleep(0.02)
                raise AssertionError("should_stop never turned true")
            self.steps.append((step, spec.steps))
            if on_step:
                on_step(step, spec.steps)
            if previews is not None and step % previews.every == 0 and step < spec.steps:
                previews.deliver(step, [f"jpeg {step} row {row}".encode() for row in range(rows)])

    def run(self, spec, *, on_step=None, should_stop=None, previews=None):
        self.runs.append(spec)
        self._steps(spec, on_step, should_stop, previews, len(spec.seeds))
        if self.fail is not None:
            raise self.fail
        return [fake_image(spec, seed) for seed in spec.seeds]

    def run_batch(self, specs, *, on_step=None, should_stop=None, previews=None):
        self.batches.append(list(specs))
        if self.fail_batch is not None:
            raise self.fail_batch
        self._steps(specs[0], on_step, should_stop, previews, sum(len(spec.seeds) for spec in specs))
        return [[fake_image(spec, seed) for seed in spec.seeds] for spec in specs]


@pytest.fixture
def env(tenant):
    settings = get_settings()
    queue = f"t-attempt-{uuid.uuid4().hex[:8]}"
    r = redis.Redis.from_url(settings.redis.url)
    yield settings, tenant, queue, r
    r.delete(queue)


def make_ctx(settings, runner, *, storage=None, drain=None, overlap_finish=False, batching=None) -> AttemptContext:
    return AttemptContext(settings=settings, runner=runner, storage=storage or open_storage(settings.storage),
                          drain=drain or Drain(settings.worker.drain_grace_s), worker_id="test-worker:1:cpu",
                          overlap_finish=overlap_finish, batching=batching or CoBatchingPolicy())


def new_job(tenant, queue, *, seed=11, num_images=2, prompt="a sign that says OPEN", max_attempts=3,
            enqueued=False, steps=3):
    params = to_params(JobRequest(prompt=prompt, width=256, height=256, steps=steps, seed=seed,
                                  num_images=num_images, preset="V4_TURBO_12"), ApiSettings())
    params.update(width=W, height=H)  # small images: the server's limits are not what is tested here
    with session_scope() as s:
        job, _ = job_states.create_job(s, tenant_id=tenant.id, params=params, queue=queue,
                                       max_attempts=max_attempts)
        if enqueued:
            job_states.mark_enqueued(s, [job.id])
        return job.id


def load(job_id):
    with session_scope() as s:
        job = job_states.get_job(s, job_id)
        job.images  # noqa: B018 - loaded before the session closes
        return job


def cancel(job_id):
    """What POST /v1/jobs/{id}/cancel does."""
    with session_scope() as s:
        job_states.cancel(s, job=job_states.get_job(s, job_id))


# ------------------------------------------------------------------------------------------------- success

def test_success_stores_pngs_at_deterministic_keys_and_completes(env):
    settings, tenant, queue, _ = env
    storage = open_storage(settings.storage)
    runner = FakeRunner()
    job_id = new_job(tenant, queue, seed=11, num_images=2)

    assert run_attempt(job_id, make_ctx(settings, runner, storage=storage)) == "succeeded"

    job = load(job_id)
    assert job.status == "succeeded" and job.attempts == 1 and job.error is None
    assert job.lease_token is None and job.lease_expires_at is None and job.finished_at is not None
    assert job.progress_step == job.progress_total == 3
    assert job.worker_id == "test-worker:1:cpu" and job.timings["worker"] == "test-worker:1:cpu"
    assert job.timings["attempt"] == 1 and "batch" not in job.timings
    assert runner.steps == [(1, 3), (2, 3), (3, 3)] and len(runner.runs) == 1
    assert runner.runs[0].seeds == (11, 12) and (runner.runs[0].width, runner.runs[0].height) == (W, H)

    assert [i.index for i in job.images] == [0, 1]
    for image, seed in zip(job.images, image_seeds(job.params)):
        assert image.key == image_key(storage.prefix, tenant.id, job_id, image.index)
        assert image.key == f"images/{tenant.id}/{job_id}/{image.index}.png"
        data = storage.get(image.key)
        assert image.sha256 == sha256_hex(data) and image.size_bytes == len(data)
        assert (image.seed, image.width, image.height) == (seed, W, H)
        recipe = read_recipe(data)
        assert recipe["seed"] == seed and recipe["model"] == "fake/ideogram-4-tiny" and recipe["revision"] == "rev-1"
        assert recipe["prompt"] == "a sign that says OPEN" and recipe["steps"] == 3
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")),
                              np.asarray(fake_image(runner.runs[0], seed)))


def test_previews_land_in_each_jobs_slot_from_its_first_image_row(env):
    """The test stack asks for a preview every 2 steps: each job's slot (common/previews.py) holds its own row."""
    import asyncio

    import redis.asyncio as aioredis

    from common import previews

    settings, tenant, queue, _ = env
    assert settings.worker.preview_every_steps == 2
    job_id = new_job(tenant, queue, seed=11, num_images=2)
    assert run_attempt(job_id, make_ctx(settings, FakeRunner())) == "succeeded"

    async def read():
        client = aioredis.Redis.from_url(settings.redis.url)
        try:
            return await previews.read(client, job_id)
        finally:
            await client.aclose()

    step, url = asyncio.run(read())
    assert step == 2 and base64.b64decode(url.split(",", 1)[1]) == b"jpeg 2 row 0"


def test_overlapped_finish_returns_finishing_then_completes_on_the_finisher(env):
    settings, tenant, queue, _ = env
    storage = open_storage(settings.storage)
    job_id = new_job(tenant, queue, num_images=1)
    assert run_attempt(job_id, make_ctx(settings, FakeRunner(), storage=storage, overlap_finish=True)) == "finishing"
    assert wait_for_finishing(timeout=30)
    job = load(job_id)
    assert job.status == "succeeded" and len(job.images) == 1
    assert storage.exists(job.images[0].key)


def test_a_rerun_writes_the_same_bytes_to_the_same_key(env):
    """A job re-run after a crash (lease expired) overwrites its images with identical bytes."""
    settings, tenant, queue, _ = env
    storage = open_storage(settings.storage)
    job_id = new_job(tenant, queue, num_images=1)
    assert run_attempt(job_id, make_ctx(settings, FakeRunner(), storage=storage)) == "succeeded"
    first = load(job_id).images[0]
    with session_scope() as s:  # as if it never completed: back to queued
        s.execute(text("UPDATE jobs SET status='queued', finished_at=NULL WHERE id=:id"), {"id": job_id})
    assert run_attempt(job_id, make_ctx(settings, FakeRunner(), storage=storage)) == "succeeded"
    again = load(job_id)
    assert again.attempts == 2 and again.timings["attempt"] == 2
    assert (again.images[0].key, again.images[0].sha256) == (first.key, first.sha256)
    assert sha256_hex(storage.get(first.key)) == first.sha256


# ------------------------------------------------------------------------------------------- duplicates

def test_a_duplicate_delivery_of_a_finished_job_is_a_no_op(env):
    settings, tenant, queue, _ = env
    job_id = new_job(tenant, queue)
    assert run_attempt(job_id, make_ctx(settings, FakeRunner())) == "succeeded"
    before = load(job_id)
    runner = FakeRunner()
    assert run_attempt(job_id, make_ctx(settings, runner)) == "skipped"
    after = load(job_id)
    assert runner.runs == []  # nothing generated
    assert (after.status, after.attempts, after.finished_at, after.timings) == \
        (before.status, before.attempts, before.finished_at, before.timings)
    assert [(i.key, i.sha256) for i in after.images] == [(i.key, i.sha256) for i in before.images]


def test_a_delivery_of_a_job_leased_elsewhere_is_skipped(env):
    settings, tenant, queue, _ = env
    job_id = new_job(tenant, queue)
    with session_scope() as s:
        other = job_states.claim(s, job_id=job_id, worker_id="other", ttl_s=60)
    runner = FakeRunner()
    assert run_attempt(job_id, make_ctx(settings, runner)) == "skipped"
    job = load(job_id)
    assert runner.runs == [] and job.status == "running" and job.lease_token == other.token
    assert job.attempts == 1 and job.worker_id == "other"


def test_an_unknown_job_is_skipped(env):
    settings, *_ = env
    assert run_attempt(uuid.uuid4(), make_ctx(settings, FakeRunner())) == "skipped"


# --------------------------------------------------------------------------------------------- failures

def test_a_generation_error_fails_the_job_for_good(env):
    settings, tenant, queue, r = env
    job_id = new_job(tenant, queue)
    assert run_attempt(job_id, make_ctx(settings, FakeRunner(fail=ValueError("NaN in latents")))) == "failed"
    job = load(job_id)
    assert job.status == "failed" and job.attempts == 1 and job.finished_at is not None
    assert job.error == {"type": "generation_error", "message": "NaN in latents", "exception": "ValueError"}
    assert job.images == [] and job.lease_token is None
    assert r.llen(queue) == 0  # not retried


def test_an_infrastructure_error_requeues_the_job_and_sends_it_again(env):
    settings, tenant, queue, r = env
    job_id = new_job(tenant, queue)
    outcome = run_attempt(job_id, make_ctx(settings, FakeRunner(fail=StorageError("bucket unreachable"))))
    assert outcome == "queued"
    job = load(job_id)
    assert job.status == "queued" and job.attempts == 1 and job.finished_at is None
    assert job.error["type"] == "infrastructure_error" and job.error["exception"] == "StorageError"
    assert job.lease_token is None and job.enqueued_at is not None
    assert r.llen(queue) == 1  # handed to the broker again at once
    # and the next delivery runs it
    assert run_attempt(job_id, make_ctx(settings, FakeRunner())) == "succeeded"
    assert load(job_id).attempts == 2


def test_an_infrastructure_error_on_the_last_attempt_fails_with_attempts_exhausted(env):
    settings, tenant, queue, r = env
    job_id = new_job(tenant, queue, max_attempts=1)
    outcome = run_attempt(job_id, make_ctx(settings, FakeRunner(fail=StorageError("bucket unreachable"))))
    assert outcome == "failed"
    job = load(job_id)
    assert job.status == "failed" and job.error["type"] == "attempts_exhausted"
    assert job.error["last_error"]["message"] == "bucket unreachable"
    assert r.llen(queue) == 0


def test_a_storage_write_that_fails_requeues_without_completing(env):
    settings, tenant, queue, r = env
    bad = settings.storage.model_copy(update={"url": f"s3://no-such-bucket-{uuid.uuid4().hex[:6]}/images",
                                              "max_retries": 1})
    job_id = new_job(tenant, queue, num_images=1)
    assert run_attempt(job_id, make_ctx(settings, FakeRunner(), storage=open_storage(bad))) == "queued"
    job = load(job_id)
    assert job.status == "queued" and job.images == [] and job.error["type"] == "infrastructure_error"
    assert r.llen(queue) == 1


# ------------------------------------------------------------------------------ cancel, drain, lease lost

def test_a_cancel_requested_mid_run_ends_canceled(env):
    settings, tenant, queue, r = env
    storage = open_storage(settings.storage)
    job_id = new_job(tenant, queue, num_images=1)
    runner = FakeRunner(at_step=lambda step: step == 1 and cancel(job_id), wait_for_stop=True)
    t0 = time.monotonic()
    assert run_attempt(job_id, make_ctx(settings, runner, storage=storage)) == "canceled"
    assert time.monotonic() - t0 < 10  # seen at a heartbeat, not at the end of a long job
    job = load(job_id)
    assert job.status == "canceled" and job.cancel_requested and job.finished_at is not None
    assert job.images == [] and job.lease_token is None
    assert not storage.exists(image_key(storage.prefix, tenant.id, job_id, 0))
    assert r.llen(queue) == 0


def test_a_cancel_that_arrives_after_generation_still_ends_canceled(env):
    """The generation finished before anyone noticed the flag: the images are not stored."""
    settings, tenant, queue, _ = env
    storage = open_storage(settings.storage)
    job_id = new_job(tenant, queue, num_images=1, steps=2)

    def cancel_and_wait_for_the_heartbeat(step):
        if step == 2:
            cancel(job_id)
            time.sleep(settings.worker.progress_min_interval_s * 3 + 0.3)

    runner = FakeRunner(at_step=cancel_and_wait_for_the_heartbeat)
    assert run_attempt(job_id, make_ctx(settings, runner, storage=storage)) == "canceled"
    assert load(job_id).status == "canceled"
    assert not storage.exists(image_key(storage.prefix, tenant.id, job_id, 0))


def test_a_drain_past_its_grace_gives_the_job_back_without_counting_an_attempt(env):
    settings, tenant, queue, r = env
    drain = Drain(grace_s=0)
    job_id = new_job(tenant, queue)
    runner = FakeRunner(at_step=lambda step: step == 2 and drain.start("test SIGTERM"))
    assert run_attempt(job_id, make_ctx(settings, runner, drain=drain)) == "queued"
    job = load(job_id)
    assert job.status == "queued" and job.attempts == 0 and job.preemptions == 1 and job.progress_step == 0
    assert job.lease_token is None and job.error is None and job.enqueued_at is not None
    assert r.llen(queue) == 1


def test_a_lost_lease_stops_the_attempt_and_writes_nothing(env):
    settings, tenant, queue, _ = env
    storage = open_storage(settings.storage)
    job_id = new_job(tenant, queue, num_images=1)
    thief = uuid.uuid4()

    def steal(step):
        if step == 1:
            with session_scope() as s:
                s.execute(text("UPDATE jobs SET lease_token=:t, worker_id='thief' WHERE id=:id"),
                          {"t": thief, "id": job_id})

    runner = FakeRunner(at_step=steal, wait_for_stop=True)
    assert run_attempt(job_id, make_ctx(settings, runner, storage=storage)) == "lease_lost"
    job = load(job_id)
    assert job.status == "running" and job.lease_token == thief and job.worker_id == "thief"
    assert job.images == [] and job.error is None
    assert not storage.exists(image_key(storage.prefix, tenant.id, job_id, 0))


def test_the_heartbeat_keeps_the_lease_through_a_long_generation(env):
    settings, tenant, queue, _ = env
    job_id = new_job(tenant, queue, num_images=1)
    ttl = settings.worker.lease_ttl_s
    leases = []

    def slow(step):
        if step == 1:
            leases.append(load(job_id).lease_expires_at)
            time.sleep(settings.worker.heartbeat_s * 2 + 0.5)
            leases.append(load(job_id).lease_expires_at)

    assert run_attempt(job_id, make_ctx(settings, FakeRunner(at_step=slow))) == "succeeded"
    assert leases[1] > leases[0]  # renewed while the step ran
    assert (leases[1] - leases[0]).total_seconds() < ttl + settings.worker.heartbeat_s * 3


# --------------------------------------------------------------------------------------- dynamic batching

def test_batching_takes_compatible_queued_jobs_along(env):
    settings, tenant, queue, _ = env
    storage = open_storage(settings.storage)
    lead = new_job(tenant, queue, seed=1, num_images=1, prompt="a red fox", enqueued=True)
    mate = new_job(tenant, queue, seed=2, num_images=2, prompt="a lighthouse", enqueued=True)
    other_size = new_job(tenant, queue, seed=3, num_images=1, steps=4, enqueued=True)  # other steps: alone
    runner = FakeRunner()
    policy = CoBatchingPolicy(enabled=True, max_batch=4, max_pixels=256 * 256)
    assert run_attempt(lead, make_ctx(settings, runner, storage=storage, batching=policy)) == "succeeded"

    assert runner.runs == [] and len(runner.batches) == 1
    assert [s.seeds for s in runner.batches[0]] == [(1,), (2, 3)]
    for job_id, n in ((lead, 1), (mate, 2)):
        job = load(job_id)
        assert job.status == "succeeded" and job.timings["batch"] == 2 and len(job.images) == n
        assert all(storage.exists(i.key) for i in job.images)
    assert load(other_size).status == "queued"
    # the batched job's own delivery is a duplicate
    assert run_attempt(mate, make_ctx(settings, FakeRunner(), batching=policy)) == "skipped"


def test_a_failing_batch_runs_its_jobs_one_by_one(env):
    settings, tenant, queue, _ = env
    lead = new_job(tenant, queue, seed=1, num_images=1, enqueued=True)
    mate = new_job(tenant, queue, seed=2, num_images=1, enqueued=True)
    runner = FakeRunner(fail_batch=RuntimeError("out of memory"))
    policy = CoBatchingPolicy(enabled=True, max_batch=4, max_pixels=256 * 256)
    assert run_attempt(lead, make_ctx(settings, runner, batching=policy)) == "succeeded"
    assert len(runner.batches) == 1 and [s.seeds for s in runner.runs] == [(1,), (2,)]
    assert [load(j).status for j in (lead, mate)] == ["succeeded", "succeeded"]
    assert all("batch" not in load(j).timings for j in (lead, mate))
