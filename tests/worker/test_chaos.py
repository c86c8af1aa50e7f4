"""Chaos: a few hundred tiny-model jobs while workers are SIGKILLed, SIGTERMed and frozen (SIGSTOP for longer than
the lease, then SIGCONT) and Redis and Postgres are killed and restarted. Then: every accepted job terminal and
succeeded, none lost or duplicated, one image per job, each image's bytes equal to an undisturbed in-process
reference, attempts accounted (preemptions free).

Every 20th job is a *long* one (640x640, 200 steps: seconds on the tiny model, against a fraction of a second for
the others), so that two faults can be aimed where a mechanism matters:

- SIGSTOP freezes a worker early in a long job, waits until another worker has claimed that job (its lease expired
  and maintenance requeued it), then SIGCONTs at once: the stale attempt wakes with most of its steps left while the
  live attempt runs. Fencing must stop it (its next heartbeat raises LeaseLost) before it records anything.
- SIGTERM hits a worker early in a long job that cannot finish within the drain grace (0.3 s here): the worker must
  exit promptly and the job must go back to the queue free (`preemptions` >= 1), not be run to the end.

The suite fails when any one of leases, fencing, re-enqueue or drain is switched off (docs/RELIABILITY.md, "The
chaos suite", has the experiments).

`LETTERPRESS_CHAOS_JOBS` / `LETTERPRESS_CHAOS_SECONDS` make it a longer soak (defaults: 200 jobs, 30 s of chaos).
"""
from __future__ import annotations

import collections
import hashlib
import os
import random
import re
import signal
import statistics
import threading
import time
import uuid

import boto3
import httpx
import pytest
from sqlalchemy import text

from common.thumbnails import thumbnail_key
from tests.support import wait_until
from tests.worker.conftest import make_own_stack

N_JOBS = int(os.environ.get("LETTERPRESS_CHAOS_JOBS", "200"))
CHAOS_S = float(os.environ.get("LETTERPRESS_CHAOS_SECONDS", "30"))
N_WORKERS = 3
DRAIN_GRACE_S = 0.3
SEEDS = list(range(100, 108))  # few distinct recipes, so the reference is cheap to compute
JOB = {"prompt": "a neon sign that says OPEN", "width": 64, "height": 64, "preset": "V4_TURBO_12", "steps": 6}
# Workers run torch single-threaded: three workers at torch's default (one thread a core) on a 2-core machine spin
# against each other (measured: a 512x512 200-step job took 150-165 s with three at 2 threads, 7-9 s at 1 thread).
# The reference is computed at the same thread count.
TORCH_THREADS = 1
# The long class: 640x640, 200 steps. On the tiny model at one thread: ~10 s alone (~8 s of 200 denoising steps,
# then the VAE decode), more with three workers on 2 cores (the short class: a small fraction of a second). Every
# 20th job, two seeds, so the reference stays cheap.
LONG_EVERY = 20
LONG_SEEDS = [200, 201]
LONG_JOB = {**JOB, "width": 640, "height": 640, "steps": 200}
EARLY = 0.25  # a long job counts as "early in its run" below this fraction of its steps (as last reported)
AIMED_MIN = 2  # aimed SIGSTOPs (with a takeover) and aimed SIGTERMs each happen at least this often
MAX_EXTRA_LONG = 4  # long jobs the test may add when an aimed fault must be retried and none is left
# A worker SIGTERMed early in a long job must be gone within the grace plus a margin. After the grace it has to stop
# at the next step boundary (tens of ms), release the job (one Postgres write), re-enqueue it (one Redis write),
# and let Celery's warm shutdown finish (close the broker connection, wait for the finisher thread, exit): about
# 2-4 s measured, the upper end under heavy load. A worker that does not drain first runs the rest of the long job
# (at least 3/4 of its steps and the decode: >= 3/4 of a long job's run), then the same shutdown. The margin is the
# larger of a floor and half the median long job's generation time in this run, so it grows with the machine's
# load; either way a worker that did not drain also fails the `preemptions >= 1` check.
TERM_EXIT_FLOOR_S = 5.0
SUCCESS_LINE = re.compile(r"job ([0-9a-f-]{36}) finished: 'succeeded'")
TASK_SUCCESS_LINE = re.compile(r"\] succeeded in [0-9.e-]+s: 'succeeded'")


def job_body(i: int) -> tuple[dict, tuple[str, int]]:
    """Job i's request and its reference key (class, seed)."""
    if i % LONG_EVERY == LONG_EVERY // 2:
        seed = LONG_SEEDS[(i // LONG_EVERY) % len(LONG_SEEDS)]
        return {**LONG_JOB, "seed": seed}, ("long", seed)
    seed = SEEDS[i % len(SEEDS)]
    return {**JOB, "seed": seed}, ("short", seed)


@pytest.fixture(scope="module")
def chaos_stack(services, stack_env, tmp_path_factory):
    bucket = f"chaos-{uuid.uuid4().hex[:6]}"
    stack = make_own_stack(services, stack_env, tmp_path_factory, bucket=bucket,
                           LETTERPRESS_API__MIN_SIDE="64", LETTERPRESS_WORKER__MAX_ATTEMPTS="50",
                           LETTERPRESS_WORKER__DRAIN_GRACE_S=str(DRAIN_GRACE_S), OMP_NUM_THREADS=str(TORCH_THREADS),
                           # every job generates: the faults are aimed at generations (repeated seeds would be
                           # served from the result cache)
                           LETTERPRESS_WORKER__RESULT_CACHE="false")
    stack.bucket = bucket
    yield stack
    stack.procs.stop_all()
    stack.engine.dispose()
    stack.redis.stop()
    stack.pg.stop()


def reference_digests(model_path: str) -> dict[tuple[str, int], str]:
    """sha256 of each recipe's PNG, generated in this process with the worker's own runner, undisturbed (at the
    workers' torch thread count)."""
    import torch

    from common.job_request import JobRequest, to_params
    from common.settings import ApiSettings, get_settings
    from worker.attempt import spec_from_params
    from worker.pipeline.runner import PipelineRunner
    from common.image_files import encode_image, recipe

    runner = PipelineRunner(get_settings())
    runner.load()
    digests = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(TORCH_THREADS)
    try:
        for kind, body, seeds in (("short", JOB, SEEDS), ("long", LONG_JOB, LONG_SEEDS)):
            for seed in seeds:
                params = to_params(JobRequest(**body, seed=seed), ApiSettings(min_side=64))
                image = runner.run(spec_from_params(params))[0]
                png = recipe(params, seed=seed, model_id=runner.model_id, revision=runner.revision)
                digests[(kind, seed)] = hashlib.sha256(encode_image(image, png)).hexdigest()
    finally:
        torch.set_num_threads(threads)
    return digests


class Submitter(threading.Thread):
    """Submits every job, paced over the chaos window so faults hit work in flight, retrying through outages with
    the same Idempotency-Key (so a retry never duplicates)."""

    def __init__(self, api_url: str, key: str):
        super().__init__(daemon=True)
        self.http = httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {key}"}, timeout=10)
        self.accepted: dict[str, tuple[str, int]] = {}  # job id -> reference key (class, seed)

    def submit(self, body: dict, ref: tuple[str, int], key: str) -> None:
        while True:
            try:
                resp = self.http.post("/v1/jobs", json=body, headers={"Idempotency-Key": key})
                if resp.status_code in (200, 202):
                    self.accepted[resp.json()["id"]] = ref
                    return
                assert resp.status_code == 503, resp.text  # Postgres down: a clear refusal, try again
            except httpx.HTTPError:
                pass
            time.sleep(0.2)

    def run(self) -> None:
        for i in range(N_JOBS):
            body, ref = job_body(i)
            self.submit(body, ref, f"chaos-{i}")
            time.sleep(CHAOS_S / N_JOBS)


def pid_of(worker_id: str | None) -> int | None:
    """The pid in a worker_id (`host:pid:gpuN`)."""
    return int(worker_id.split(":")[1]) if worker_id else None


def held_jobs(stack) -> dict[int, str]:
    """pid of each worker holding a running job -> that job's id."""
    with stack.engine.connect() as conn:
        rows = conn.execute(text("SELECT id::text, worker_id FROM jobs WHERE status = 'running'")).all()
    return {pid_of(r.worker_id): r.id for r in rows if r.worker_id}


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


def long_jobs_left(stack) -> int:
    with stack.engine.connect() as conn:
        return conn.execute(text("SELECT count(*) FROM jobs WHERE status IN ('queued', 'running') "
                                 "AND progress_total = :steps"), {"steps": LONG_JOB["steps"]}).scalar()


def worker_in_long_job(stack, workers: list[str], avoid: set[str], timeout: float = 30.0) -> tuple[str, str] | None:
    """(worker, job id) for a worker of `workers` running a long job early in its run, waiting up to `timeout`.
    Jobs in `avoid` (already hit) are taken only after 10 s without another: a job restarted by a fault is early
    in its run again, and would otherwise draw every aimed fault."""
    # progress as of a heartbeat in the last 2 s (the lease is renewed with it), so the job is early in fact
    fresh_s = float(stack.env["LETTERPRESS_WORKER__LEASE_TTL_S"]) - 2
    start = time.monotonic()
    while time.monotonic() < start + timeout:
        by_pid = {stack.procs.procs[w].pid: w for w in workers if stack.procs.procs[w].poll() is None}
        with stack.engine.connect() as conn:
            rows = conn.execute(text("SELECT id::text, worker_id FROM jobs WHERE status = 'running' "
                                     "AND progress_total = :steps AND progress_step < :early "
                                     "AND lease_expires_at > now() + make_interval(secs => :fresh)"),
                                {"steps": LONG_JOB["steps"], "early": int(LONG_JOB["steps"] * EARLY),
                                 "fresh": fresh_s}).all()
        for r in rows:
            if pid_of(r.worker_id) in by_pid and (r.id not in avoid or time.monotonic() > start + 10):
                return by_pid[pid_of(r.worker_id)], r.id
        time.sleep(0.05)
    return None


def wait_taken_over(stack, pid: int, job_id: str, timeout: float) -> tuple[str, int | None]:
    """While worker `pid` is frozen holding `job_id`: wait until another worker has claimed the job. Returns
    "taken_over", or why not: "stalled" when the job is still running under its lease, expired over 15 s ago (no
    maintenance pass requeued it: e.g. the worker froze inside one, holding its advisory lock, or inside a
    heartbeat, holding the job's row lock), "finished", or "timeout" (still queued behind the broker's backlog).
    Also the pid of the worker that took it over."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with stack.engine.connect() as conn:
            row = conn.execute(text("SELECT status, worker_id, lease_expires_at < now() - interval '15 seconds' "
                                    "AS long_expired FROM jobs WHERE id = :id"), {"id": job_id}).one()
        if row.status == "running" and pid_of(row.worker_id) != pid:
            return "taken_over", pid_of(row.worker_id)
        if row.status in ("succeeded", "failed", "canceled"):
            return "finished", None
        if row.status == "running" and row.long_expired:
            return "stalled", None
        time.sleep(0.05)
    return "timeout", None


def open_transactions(stack) -> list:
    """The stack database's sessions inside a transaction, oldest first (what a stalled takeover waits behind)."""
    with stack.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text(
            "SELECT pid, state, wait_event_type, round(extract(epoch FROM now() - xact_start)::numeric, 1) AS xact_s, "
            "left(query, 100) FROM pg_stat_activity WHERE datname = current_database() AND xact_start IS NOT NULL "
            "AND pid <> pg_backend_pid() ORDER BY xact_start"))]


def within(timeout: float, predicate) -> bool:
    """Whether `predicate()` came true within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def attempt_ended(log: str, job_id: str) -> bool:
    """Whether the worker log shows its attempt at this job over: fenced out, finished (either way), drained, or
    the finisher's last resort."""
    return any(line in log for line in (f"job {job_id}: lease lost", f"job {job_id} finished:",
                                        f"job {job_id}: interrupted by drain", f"finish-{job_id}: finishing failed"))


def test_chaos(chaos_stack, tiny_model):
    stack = chaos_stack
    t_start = time.monotonic()
    reference = reference_digests(str(tiny_model))
    client = stack.client()
    workers = [stack.start_worker()[0] for _ in range(N_WORKERS)]
    submitter = Submitter(stack.api_url, client.http.headers["Authorization"].split()[1])
    submitter.start()

    def say(msg: str) -> None:
        print(f"[chaos {time.monotonic() - t_start:6.1f}s] {msg}", flush=True)

    rng = random.Random(1234)
    counts = {"sigkill": 0, "sigterm": 0, "sigstop": 0, "redis": 0, "postgres": 0}
    stops: list[dict] = []  # aimed SIGSTOPs: victim, job, what happened while frozen
    terms: list[dict] = []  # aimed SIGTERMs: victim, job, seconds until the worker was gone
    plan = list(counts) * AIMED_MIN  # every fault at least twice, in random order, then random ones
    rng.shuffle(plan)

    def aimed_short(action: str) -> bool:
        if action == "sigstop":
            return sum(s["outcome"] == "taken_over" for s in stops) < AIMED_MIN
        return len(terms) < AIMED_MIN

    extra = 0  # long jobs submitted beyond N_JOBS, for an aimed fault to retry on

    def retry_later(action: str) -> None:
        """An aimed fault missed: plan it again while it is short of AIMED_MIN, adding a long job if none is left."""
        nonlocal extra
        if not aimed_short(action):
            return
        if not long_jobs_left(stack) and extra < MAX_EXTRA_LONG:
            extra += 1
            submitter.submit({**LONG_JOB, "seed": LONG_SEEDS[0]}, ("long", LONG_SEEDS[0]), f"chaos-extra-{extra}")
        plan.insert(0, action)

    deadline = time.monotonic() + CHAOS_S
    hard_stop = deadline + 150  # retries of aimed faults (below) end here at the latest, bounding the test
    while (time.monotonic() < deadline or plan) and time.monotonic() < hard_stop:
        time.sleep(rng.uniform(1.5, 3.0))
        action = plan.pop() if plan else rng.choice(list(counts))
        if action in ("sigstop", "sigterm"):
            picked = worker_in_long_job(stack, workers, avoid={f["job"] for f in stops + terms})
            if picked is None:
                # no long job early in its run: try again later, with one more long job if none is left to aim at
                say(f"{action}: no worker early in a long job")
                retry_later(action)
                continue
            victim, job_id = picked
            pid = stack.procs.procs[victim].pid
        counts[action] += 1
        if action == "sigstop":
            # a frozen worker (VM pause, swap storm) outlives its lease; it wakes as soon as another worker has taken
            # its job over, with most of the job's steps left, and fencing must keep it from writing anything
            stack.procs.signal(victim, signal.SIGSTOP)
            t0 = time.monotonic()
            outcome, live_pid = wait_taken_over(stack, pid, job_id, timeout=max(30.0, hard_stop - time.monotonic()))
            if outcome == "stalled":
                say(f"sigstop {victim}: no takeover; open transactions: {open_transactions(stack)}")
            stack.procs.signal(victim, signal.SIGCONT)
            frozen_s = time.monotonic() - t0
            # let the stale attempt run its course before any other fault (a SIGKILL of this worker would hide it)
            ended = within(60, lambda: attempt_ended(stack.procs.log(victim), job_id))
            live = next((w for w, p in stack.procs.procs.items() if p.pid == live_pid), None)
            stops.append({"victim": victim, "job": job_id, "outcome": outcome, "frozen_s": round(frozen_s, 1),
                          "stale_ended": ended, "live": live})
            say(f"sigstop {victim} in long job {job_id}: {outcome} after {frozen_s:.1f}s frozen")
            if outcome != "taken_over":
                retry_later(action)
        elif action == "sigterm":
            # a long job cannot finish within the grace: the drain must interrupt it and give it back
            stack.procs.signal(victim, signal.SIGTERM)
            t0 = time.monotonic()
            rc = stack.procs.wait_exit(victim, timeout=120)
            exit_s = time.monotonic() - t0
            terms.append({"victim": victim, "job": job_id, "exit_s": round(exit_s, 2), "rc": rc})
            say(f"sigterm {victim} in long job {job_id}: exited rc={rc} after {exit_s:.2f}s")
            workers.remove(victim)
            workers.append(stack.start_worker(wait=False)[0])
        elif action == "sigkill":
            victim = busy_worker(stack, workers, rng)
            stack.procs.signal(victim, signal.SIGKILL)
            stack.procs.wait_exit(victim, timeout=60)
            say(f"sigkill {victim}")
            workers.remove(victim)
            workers.append(stack.start_worker(wait=False)[0])
        elif action == "redis":
            stack.redis.kill()
            time.sleep(1.0)
            stack.redis.start()
            say("redis killed and restarted")
        else:
            stack.pg.kill()
            time.sleep(1.0)
            stack.pg.start()
            say("postgres killed and restarted")
    say(f"chaos over: {counts}; extra long jobs: {extra}")
    submitter.join(timeout=120)
    assert not submitter.is_alive(), "submissions did not finish"
    n_jobs = N_JOBS + extra
    assert len(submitter.accepted) == n_jobs

    def all_terminal():
        with stack.engine.connect() as conn:
            return conn.execute(text("SELECT count(*) FROM jobs WHERE status NOT IN "
                                     "('succeeded','failed','canceled')")).scalar() == 0
    wait_until(all_terminal, 180 * max(1.0, N_JOBS / 200), interval=1.0, what="every job terminal")
    say("every job terminal")
    # a job is terminal once one attempt recorded it; let the live attempt of each aimed SIGSTOP end too (unless its
    # worker is gone), so that the success count below sees every attempt that was going to succeed
    for s in stops:
        if s["live"]:
            within(60, lambda: stack.procs.procs[s["live"]].poll() is not None
                   or attempt_ended(stack.procs.log(s["live"]), s["job"]))

    with stack.engine.connect() as conn:
        jobs = conn.execute(text("SELECT id::text, status, attempts, preemptions, error, worker_id, timings "
                                 "FROM jobs")).all()
        images = conn.execute(text("SELECT job_id::text, index, key, sha256 FROM job_images")).all()
    by_id = {j.id: j for j in jobs}
    long_gen = sorted(j.timings["generate_s"] for j in jobs if j.timings and submitter.accepted[j.id][0] == "long")
    say(f"actions: {counts}; attempts: {sum(j.attempts for j in jobs)}; "
        f"preemptions: {sum(j.preemptions for j in jobs)}; long jobs' generate_s: {long_gen}")
    say(f"aimed SIGSTOPs: {stops}")
    say(f"aimed SIGTERMs: {terms}")
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
    # (each image and its console thumbnail beside it, common/thumbnails.py)
    assert sorted(keys) == sorted([i.key for i in images] + [thumbnail_key(i.key) for i in images])
    for image in rng.sample(images, 20):
        body = s3.get_object(Bucket=stack.bucket, Key=image.key)["Body"].read()
        assert hashlib.sha256(body).hexdigest() == image.sha256
    # at most one success per job: count the attempts that got past the fenced `complete`. The finisher thread logs
    # `job <id> finished: 'succeeded'` for each (Celery's own line says 'finishing'; with the finisher off it would
    # say `succeeded in <t>s: 'succeeded'`). Exact patterns: a logged SQL error's parameters hold 'succeeded' too.
    logs = [stack.procs.log(name) for name in stack.workers]
    per_job = collections.Counter(m for log in logs for m in SUCCESS_LINE.findall(log))
    successes = sum(per_job.values()) + sum(len(TASK_SUCCESS_LINE.findall(log)) for log in logs)
    # No job twice. The total may fall short without a defect: a worker SIGKILLed (or Postgres killed) between the
    # completing commit and its log line leaves a succeeded row unlogged; every row is checked succeeded above.
    assert max(per_job.values(), default=0) <= 1, {j: n for j, n in per_job.items() if n > 1}
    assert successes <= n_jobs, (successes, n_jobs)
    assert [j for j, n in per_job.items() if n > 1] == []
    # the success was recorded by the job's last claim: the attempt number and worker in its timings are the row's
    # (a stale attempt that completed after the live one would leave its own there)
    assert [j.id for j in jobs if (j.timings["attempt"], j.timings["worker"]) != (j.attempts, j.worker_id)] == []
    # attempts: a SIGKILL costs at most the one job its worker held; a Postgres outage at most one attempt per
    # running worker; a SIGTERM preemption costs nothing
    extra_attempts = sum(j.attempts - 1 for j in jobs)
    bound = counts["sigkill"] + counts["sigstop"] + N_WORKERS * (counts["postgres"] + counts["redis"])
    assert extra_attempts <= bound, (extra_attempts, counts)
    assert sum(j.preemptions for j in jobs) <= counts["sigterm"]

    # fencing: each frozen worker woke while another attempt ran its job, with work left, and was fenced out
    taken_over = [s for s in stops if s["outcome"] == "taken_over"]
    assert len(taken_over) >= AIMED_MIN, stops
    for s in taken_over:
        assert s["stale_ended"], s
        assert f"job {s['job']}: lease lost" in stack.procs.log(s["victim"]), s
    # drain: each SIGTERMed worker left promptly and gave its long job back, free
    assert len(terms) >= AIMED_MIN, terms
    exit_limit = DRAIN_GRACE_S + max(TERM_EXIT_FLOOR_S, statistics.median(long_gen) / 2)
    for t in terms:
        assert by_id[t["job"]].preemptions >= 1, (t, by_id[t["job"]].preemptions)
        assert t["exit_s"] <= exit_limit, (t, exit_limit)
    assert sum(j.preemptions for j in jobs) >= len({t["job"] for t in terms})
