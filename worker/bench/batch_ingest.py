"""Batch ingest and broker-depth benchmark: the figures in docs/PERFORMANCE.md ("Batch ingest").

    python -m worker.bench.batch_ingest --lines 100000 --lines 1000000

For each size it starts nothing but what ingest needs, all real and throwaway (Postgres, Redis, the API under
uvicorn), then:
1. writes a JSONL file of N lines (custom_id + a ~70-character prompt, 1024x1024, a preset, a seed on half the
   lines) and POSTs it as a multipart upload, timing the request as a client sees it;
2. reads the batch back (GET /v1/batches/{id}: request_counts over N rows) and streams its manifest
   (GET .../results?urls=false);
3. runs one feeder pass in-process (no worker consumes) and reads the broker depth (LLEN batch) and Redis
   `used_memory` before the submit and after the pass;
4. for comparison, pushes N copies of the same real Celery message (what enqueue-all-at-submit would hold) into a
   scratch Redis db and reads `used_memory` again, then drops them.
Use --database-url/--redis-url to measure against servers of your own (the database is migrated; a scratch
tenant is created; nothing is deleted).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

PRESETS = ["V4_TURBO_12", "V4_DEFAULT_20", "V4_FAST_16"]
WORDS = "poster sign label menu neon chalk vintage bold serif ticket banner label stamp crate jar".split()


def write_jsonl(path: Path, n: int) -> int:
    rng = random.Random(0)
    with path.open("w") as f:
        for i in range(n):
            line = {"custom_id": f"row-{i:07d}", "prompt": f"a {rng.choice(WORDS)} {rng.choice(WORDS)} that says "
                                                           f"'{rng.choice(WORDS).upper()} {i}' on a plain wall",
                    "width": 1024, "height": 1024, "preset": rng.choice(PRESETS)}
            if i % 2:
                line["seed"] = i
            f.write(json.dumps(line) + "\n")
    return path.stat().st_size


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def start_services(root: Path) -> tuple[str, str, list]:
    from common.devstack.servers import PostgresServer, RedisServer

    pg = PostgresServer(root / "pg").start()
    redis = RedisServer(root / "redis").start()
    return pg.create_database("letterpress_bench"), redis.url(), [redis, pg]


def start_api(env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    import httpx

    from common.devstack.servers import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port",
                             str(port), "--log-level", "warning"], cwd=REPO, env={**os.environ, **env})
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit("the API did not start")


def naive_broker_bytes(redis_url: str, settings, n: int) -> int:
    """Redis memory that N queued Celery messages take (enqueue-everything-at-submit), in a scratch db."""
    import redis as redis_lib

    from common.broker import GENERATE_TASK, make_celery

    scratch_url = redis_url.rsplit("/", 1)[0] + "/15"
    r = redis_lib.Redis.from_url(scratch_url)
    r.flushdb()
    app = make_celery(settings.model_copy(update={"redis": settings.redis.model_copy(update={"url": scratch_url})}))
    sample_id = str(uuid.uuid4())
    app.send_task(GENERATE_TASK, args=[sample_id], queue="naive")
    (message,) = r.lrange("naive", 0, -1)
    r.delete("naive")
    before = int(r.info("memory")["used_memory"])
    pipe, text = r.pipeline(transaction=False), message.decode()
    for i in range(n):
        # same size as the real one: fresh job id and task id (both 36 characters)
        pipe.lpush("naive", text.replace(sample_id, str(uuid.uuid4())))
        if i % 20000 == 19999:
            pipe.execute()
    pipe.execute()
    used = int(r.info("memory")["used_memory"]) - before
    r.flushdb()
    return used


def bench(n: int, url: str, key: str, redis_url: str, settings, workdir: Path) -> dict:
    import httpx
    import redis as redis_lib

    from common.settings import BatchSettings
    from worker.feeder import Feeder

    path = workdir / f"bench-{n}.jsonl"
    size = write_jsonl(path, n)
    r = redis_lib.Redis.from_url(redis_url)
    r.delete("batch")
    mem0 = int(r.info("memory")["used_memory"])
    http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=3600)
    t0 = time.perf_counter()
    with path.open("rb") as f:
        resp = http.post("/v1/batches", files={"file": (path.name, f, "application/x-ndjson")})
    ingest_s = time.perf_counter() - t0
    resp.raise_for_status()
    batch = resp.json()
    assert batch["request_counts"]["total"] == n, batch["request_counts"]
    t0 = time.perf_counter()
    http.get(f"/v1/batches/{batch['id']}").raise_for_status()
    get_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    lines = 0
    with http.stream("GET", f"/v1/batches/{batch['id']}/results", params={"urls": "false"}) as stream:
        for _ in stream.iter_lines():
            lines += 1
    results_s = time.perf_counter() - t0
    assert lines == n
    feeder = Feeder(settings, BatchSettings())
    t0 = time.perf_counter()
    fed = feeder.feed()
    feed_s = time.perf_counter() - t0
    depth = int(r.llen("batch"))
    mem1 = int(r.info("memory")["used_memory"])
    r.delete("batch")  # the workers took those eight: the next pass is the steady state
    t0 = time.perf_counter()
    feeder.feed()
    feed2_s = time.perf_counter() - t0
    from common.batches import reset_stale_fed
    from common.db import session_scope

    t0 = time.perf_counter()
    with session_scope() as session:  # the feeder's lost-message check (runs only while the broker list is empty)
        reset_stale_fed(session, older_than_s=3600)
    stale_s = time.perf_counter() - t0
    naive = naive_broker_bytes(redis_url, settings, n)
    http.post(f"/v1/batches/{batch['id']}/cancel").raise_for_status()  # leave nothing for a worker
    r.delete("batch")
    return {"lines": n, "file": size, "ingest_s": ingest_s, "rate": n / ingest_s, "get_s": get_s,
            "results_s": results_s, "feed_s": feed_s, "feed2_s": feed2_s, "stale_s": stale_s, "fed": fed.fed,
            "depth": depth, "redis_delta": mem1 - mem0, "naive_bytes": naive}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, action="append", help="batch size (repeatable); default 100000")
    parser.add_argument("--database-url")
    parser.add_argument("--redis-url")
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    sizes = args.lines or [100_000]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="lp-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    services = []
    if args.database_url and args.redis_url:
        db_url, redis_url = args.database_url, args.redis_url
    else:
        db_url, redis_url, services = start_services(workdir)
    env = {"LETTERPRESS_DATABASE__URL": db_url, "LETTERPRESS_REDIS__URL": redis_url,
           "LETTERPRESS_STORAGE__URL": f"file://{workdir / 'storage'}", "LETTERPRESS_ENV": "test"}
    os.environ.update(env)
    from common.auth import create_api_key, get_or_create_tenant
    from common.db import migrate, session_scope
    from common.settings import get_settings, reset_settings_cache

    reset_settings_cache()
    migrate()
    with session_scope() as session:
        key = create_api_key(session, tenant=get_or_create_tenant(session, f"bench-{uuid.uuid4().hex[:6]}"),
                             name="bench")
    api, url = start_api(env)
    rows = []
    try:
        for n in sizes:
            row = bench(n, url, key, redis_url, get_settings(), workdir)
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        api.terminate()
        api.wait(30)
        for service in services:
            service.stop()
    print(f"\nmachine: {os.cpu_count()} CPUs; {sys.platform}; python {sys.version.split()[0]}")
    print("| lines | JSONL | POST /v1/batches | lines/s | GET batch | results stream | feeder pass: first, next "
          "| stale check | broker depth after feeding | Redis memory, feeder | Redis memory, enqueue-all |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['lines']:,} | {mib(r['file'])} | {r['ingest_s']:.1f} s | {r['rate']:,.0f} | {r['get_s']:.2f} s "
              f"| {r['results_s']:.1f} s | {r['feed_s'] * 1000:.0f} ms, {r['feed2_s'] * 1000:.0f} ms "
              f"| {r['stale_s'] * 1000:.0f} ms | {r['depth']} | "
              f"{r['redis_delta'] / 1024:+.0f} KiB | {mib(r['naive_bytes'])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
