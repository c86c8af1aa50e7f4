"""Front-door load benchmark: the figures in docs/PERFORMANCE.md ("Front door under load").

    python -m worker.bench.front_door                       # submit 50..400/s, read 100..1000/s, uploads
    python -m worker.bench.front_door --submit-rates 50,100 --read-rates 100 --duration 10 --api-workers 2
    python -m worker.bench.front_door --in-process 1000 --submit-rates "" --read-rates "" --uploads 0
    python -m worker.bench.front_door --submit-rates 400 --read-rates 1000 --read-jobs 1000 --uploads 0

Starts throwaway Postgres and Redis and the API under uvicorn (no GPU worker: submits only queue), then drives
open-loop load: requests leave on a fixed schedule whatever the answers, so a slow server shows as latency and
timeouts, not as a politely slower client. For each rate it reports answered, status counts, p50/p99 latency and
timeouts, each after a warm-up of the same load (`--warmup` seconds, reported apart: a cold server's first second
fills its connections and caches); then /healthz p50/p99, probed every 10 ms, while 30 clients upload batches of
1,000 lines for 5 seconds, each again after its answer (after a 429, when its Retry-After says).
Each rate also reports how many of the API processes' event-loop lag observations (`/metrics`, one every 0.25 s
a process) came over 50 ms late: many, and the API processes themselves held the requests; few with a high p99,
and the time went elsewhere (Postgres, the kernel, the machine). And how late the load generator itself started
its requests (p99): a late instrument sends in bursts and adds its lateness to every latency it reports.
Reads poll the queue's first job, or with `--read-jobs N` N queued jobs drawn at random once the submits are done
(as clients polling each of their own jobs do: their places are spread over the queue).
The load generator runs on the same machine: on a 2-core box it takes CPU from the API, so read the figures as a
lower bound.
`--in-process N` first runs api.request_cost: N reads and N submits (one at a time, then 20 at once) through the
app called in-process, the API's own CPU a call without HTTP or a load generator (a steadier figure for comparing
two builds).
"""
from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import httpx

from worker.bench.batch_ingest import REPO, start_api, start_services, write_jsonl

JOB = {"prompt": "a poster that says HELLO", "width": 1024, "height": 1024, "preset": "V4_TURBO_12"}


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class RawHttp:
    """A minimal keep-alive HTTP/1.1 client for the load itself: prebuilt request bytes over a bounded pool of
    connections. httpx costs about a millisecond of CPU a request, which on this 2-core machine is CPU taken from
    the server under test; a raw stream costs a few tens of microseconds."""

    def __init__(self, host: str, port: int, key: str, connections: int, timeout: float):
        self.host, self.port, self.key, self.timeout = host, port, key, timeout
        self.idle: asyncio.Queue = asyncio.Queue()
        self.free = asyncio.Semaphore(connections)

    def build(self, method: str, path: str, body: dict | None = None) -> bytes:
        data = json.dumps(body).encode() if body is not None else b""
        head = (f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nAuthorization: Bearer {self.key}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n")
        return head.encode() + data

    async def send(self, raw: bytes) -> int:
        """The status of one request; raises TimeoutError or OSError."""
        async with self.free:
            conn = self.idle.get_nowait() if not self.idle.empty() else None
            try:
                if conn is None:
                    conn = await asyncio.open_connection(self.host, self.port)
                status = await asyncio.wait_for(self._exchange(conn, raw), self.timeout)
            except BaseException:
                if conn is not None:
                    conn[1].close()
                raise
            self.idle.put_nowait(conn)
            return status

    @staticmethod
    async def _exchange(conn, raw: bytes) -> int:
        reader, writer = conn
        writer.write(raw)
        status = int((await reader.readline()).split()[1])
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        await reader.readexactly(length)
        return status


@contextmanager
def collector_paused() -> Iterator[None]:
    """The load generator's own full collections (about 0.1 s with this process's heap) would hold every request
    due meanwhile and then send them in a burst, a stall of the instrument read as the server's: off while load
    runs (what it allocates is freed by reference counts), the heap so far frozen out of later collections."""
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.unfreeze()


async def open_loop(client: RawHttp, rate: float, duration: float, request: Callable[[int], bytes],
                    server_cpu: Callable[[], float] = lambda: 0.0) -> dict:
    """Send `request(i)` at `rate` per second for `duration` seconds. Latency counts from the request's scheduled
    time, so time spent waiting for a free connection is in it (no coordinated omission). `server_cpu_ms` is the
    server's CPU time (`server_cpu()`, seconds) over the run divided by the requests it answered 2xx."""
    latencies: list[float] = []
    by_second: dict[int, list[float]] = {}  # the latencies of the requests due in each second of the run
    late_starts: list[float] = []  # how late this process started each request: the instrument's own lag
    statuses: Counter[str] = Counter()

    async def one(i: int, due: float) -> None:
        late_starts.append(time.perf_counter() - due)
        try:
            statuses[str(await client.send(request(i)))] += 1
            latencies.append(time.perf_counter() - due)
            by_second.setdefault(int(i / rate), []).append(latencies[-1])
        except (TimeoutError, asyncio.TimeoutError):
            statuses["timeout"] += 1
        except (OSError, ValueError, IndexError, asyncio.IncompleteReadError) as exc:
            statuses[type(exc).__name__] += 1

    with collector_paused():
        cpu0 = server_cpu()
        start, tasks, n = time.perf_counter(), [], int(rate * duration)
        for i in range(n):
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i, due)))
        await asyncio.gather(*tasks)
    succeeded = sum(v for k, v in statuses.items() if k.startswith("2"))
    return {"rate": rate, "sent": n, "answered": len(latencies), "statuses": dict(statuses),
            "p50_ms": _ms(percentile(latencies, 0.50)), "p99_ms": _ms(percentile(latencies, 0.99)),
            "p99_ms_by_second": [_ms(percentile(by_second[s], 0.99)) for s in sorted(by_second)],
            "load_generator_late_p99_ms": _ms(percentile(late_starts, 0.99)),
            "wall_s": round(time.perf_counter() - start, 2),
            "server_cpu_ms": round((server_cpu() - cpu0) * 1000 / succeeded, 3) if succeeded else None}


LAG = "letterpress_api_event_loop_lag_seconds"
LATE_S = 0.05


async def loop_lag(http: httpx.AsyncClient) -> tuple[float, float]:
    """(observations, those over LATE_S late) of the API processes' event-loop lag so far, from /metrics (summed
    over the uvicorn processes: the bench gives them prometheus_client's multiprocess directory)."""
    from prometheus_client.parser import text_string_to_metric_families

    total = on_time = 0.0
    for family in text_string_to_metric_families((await http.get("/metrics")).text):
        if family.name == LAG:
            for sample in family.samples:
                if sample.name == f"{LAG}_count":
                    total += sample.value
                elif sample.name == f"{LAG}_bucket" and float(sample.labels["le"]) == LATE_S:
                    on_time += sample.value
    return total, total - on_time


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) the process and its children (uvicorn's worker processes) have used so far,
    from /proc: a server's cost per request, which unlike latency does not swing with the machine's load."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:  # it ended meanwhile
            continue
        if int(entry.name) == pid or int(fields[1]) == pid:  # fields[1]: the parent's pid
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _seconds_under(run: dict, ms: float) -> str:
    """"k of n": the seconds of the run whose requests' p99 was under `ms`."""
    seconds = run["p99_ms_by_second"]
    return f"{sum(1 for p in seconds if p is not None and p < ms)} of {len(seconds)}"


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


async def healthz_during_uploads(url: str, key: str, workdir: Path, uploads: int, lines: int,
                                 seconds: float) -> dict:
    """`uploads` clients each uploading a batch of `lines` lines again and again for `seconds` (after a 429, again
    when its Retry-After says, as a client should), while /healthz is probed every 10 ms."""
    path = workdir / "upload.jsonl"
    write_jsonl(path, lines)
    data = path.read_bytes()
    codes: Counter = Counter()
    async with httpx.AsyncClient(base_url=url, timeout=120,
                                 limits=httpx.Limits(max_connections=uploads + 1)) as client:
        headers = {"Authorization": f"Bearer {key}"}
        until = time.perf_counter() + seconds

        async def uploader(i: int) -> None:
            while time.perf_counter() < until:
                resp = await client.post("/v1/batches", headers={**headers, "Idempotency-Key": f"u-{uuid.uuid4()}"},
                                         files={"file": (f"in{i}.jsonl", data)})
                codes[str(resp.status_code)] += 1
                if resp.status_code == 429:
                    await asyncio.sleep(float(resp.headers.get("Retry-After", "1")))

        async def probe() -> list[float]:
            seen = []
            while not done.is_set():
                t0 = time.perf_counter()
                try:
                    await client.get("/healthz", timeout=10)
                    seen.append(time.perf_counter() - t0)
                except httpx.HTTPError:
                    seen.append(10.0)
                await asyncio.sleep(0.01)
            return seen

        done = asyncio.Event()
        prober = asyncio.create_task(probe())
        t0 = time.perf_counter()
        await asyncio.gather(*(uploader(i) for i in range(uploads)))
        elapsed = time.perf_counter() - t0
        done.set()
        probes = await prober
    return {"uploads": uploads, "lines": lines, "statuses": dict(codes), "wall_s": round(elapsed, 2),
            "healthz_probes": len(probes), "healthz_p50_ms": _ms(percentile(probes, 0.5)),
            "healthz_p99_ms": _ms(percentile(probes, 0.99)), "healthz_max_ms": _ms(max(probes) if probes else None)}


def queued_jobs(db_url: str, n: int) -> list[str]:
    """The ids of `n` queued jobs drawn at random, so their places spread over the whole queue."""
    from sqlalchemy import create_engine, text

    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            return [str(row[0]) for row in conn.execute(
                text("SELECT id FROM jobs WHERE status = 'queued' ORDER BY random() LIMIT :n"), {"n": n})]
    finally:
        engine.dispose()


async def run(url: str, key: str, args, workdir: Path, api_pid: int, db_url: str) -> dict:
    host, port = url.removeprefix("http://").split(":")
    server_cpu = functools.partial(tree_cpu_s, api_pid)
    client = RawHttp(host, int(port), key, connections=args.connections, timeout=args.timeout)
    result: dict = {"submit": [], "read": []}
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}) as setup:
        job_id = (await setup.post("/v1/jobs", json=JOB)).json()["id"]
        reads = [client.build("GET", f"/v1/jobs/{job_id}")]  # the queue's first job; --read-jobs: spread over it
        calls = [("submit", rate, lambda i: client.build("POST", "/v1/jobs", {**JOB, "seed": i}))
                 for rate in args.submit_rates] + [("read", rate, lambda i: reads[i % len(reads)])
                                                   for rate in args.read_rates]
        for call, rate, request in calls:
            if call == "read" and args.read_jobs > 1 and len(reads) == 1:
                reads[:] = [client.build("GET", f"/v1/jobs/{j}") for j in queued_jobs(db_url, args.read_jobs)]
            if args.warmup:  # the same load first, reported apart: the server's connections and caches filling
                warm = await open_loop(client, rate, args.warmup, request, server_cpu)
                result.setdefault("warmup", []).append({"call": call, **warm})
            observed_before, late_before = await loop_lag(setup)
            result[call].append(await open_loop(client, rate, args.duration, request, server_cpu))
            observed, late = await loop_lag(setup)
            result[call][-1]["loop_lag"] = {"observed": round(observed - observed_before),
                                            "over_50ms": round(late - late_before)}
            if call == "read":
                result[call][-1]["jobs"] = len(reads)  # distinct jobs polled
            print(json.dumps({call: result[call][-1]}), flush=True)
            await asyncio.sleep(args.pause)
    if args.uploads:
        result["uploads"] = await healthz_during_uploads(url, key, workdir, args.uploads, args.upload_lines,
                                                         args.upload_seconds)
        print(json.dumps({"uploads": result["uploads"]}), flush=True)
    return result


def in_process_cost(env: dict[str, str], key: str, calls: int) -> list[dict]:
    """api.request_cost in its own process (the bench's worker package must not import the api package)."""
    proc = subprocess.run([sys.executable, "-m", "api.request_cost", "--key", key, "--calls", str(calls)], cwd=REPO,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"api.request_cost failed:\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def render(result: dict) -> str:
    rows = ["| call | rate /s | sent | answered | statuses | p50 ms | p99 ms | seconds of p99 < 50 ms | "
            "API CPU ms a 2xx | event-loop lag > 50 ms | load generator late p99 ms |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for call, path in (("submit", "POST /v1/jobs"), ("read", "GET /v1/jobs/{id}")):
        for r in result[call]:
            rows.append(f"| {path} | {r['rate']:g} | {r['sent']} | {r['answered']} | "
                        f"{', '.join(f'{k}: {v}' for k, v in sorted(r['statuses'].items()))} | {r['p50_ms']} | "
                        f"{r['p99_ms']} | {_seconds_under(r, 50.0)} | {r['server_cpu_ms']} | "
                        f"{r['loop_lag']['over_50ms']} of {r['loop_lag']['observed']} | "
                        f"{r['load_generator_late_p99_ms']} |")
    for r in result.get("warmup", []):
        rows.append(f"\nWarm-up of {r['call']} at {r['rate']:g}/s ({r['sent']} requests just before its measured "
                    f"run, not in it): {r['statuses']}, p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms")
    for r in result.get("in_process", []):
        rows.append(f"\nIn-process, {r['call']}: {r['cpu_ms']} ms CPU, {r['wall_ms']} ms wall a call "
                    f"({r['calls']} calls)")
    if "uploads" in result:
        u = result["uploads"]
        rows.append(f"\n/healthz while {u['uploads']} clients upload batches of {u['lines']} lines ({u['wall_s']} s; "
                    f"uploads {u['statuses']}): p50 {u['healthz_p50_ms']} ms, p99 {u['healthz_p99_ms']} ms, "
                    f"max {u['healthz_max_ms']} ms over {u['healthz_probes']} probes")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--submit-rates", default="50,100,200,400")
    parser.add_argument("--read-rates", default="100,300,1000")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per rate")
    parser.add_argument("--pause", type=float, default=3.0, help="seconds between rates")
    parser.add_argument("--warmup", type=float, default=2.0,
                        help="seconds of the same load before each rate's measured run, reported apart (0: none)")
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--uploads", type=int, default=30)
    parser.add_argument("--upload-lines", type=int, default=1000)
    parser.add_argument("--upload-seconds", type=float, default=5.0,
                        help="how long the --uploads clients keep uploading (each again after its answer)")
    parser.add_argument("--api-workers", type=int, default=1, help="uvicorn worker processes")
    parser.add_argument("--connections", type=int, default=256, help="keep-alive connections of the load")
    parser.add_argument("--read-jobs", type=int, default=1, metavar="N",
                        help="reads cycle over N queued jobs drawn at random when the reads start (default: the "
                             "queue's first job only); their places are spread over the queue the submits left")
    parser.add_argument("--in-process", type=int, default=0, metavar="N",
                        help="first, N reads and N submits through the app in-process (api.request_cost)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    args.submit_rates = [float(x) for x in args.submit_rates.split(",") if x]
    args.read_rates = [float(x) for x in args.read_rates.split(",") if x]
    workdir = Path(tempfile.mkdtemp(prefix="lp-front-door-"))
    db_url, redis_url, services = start_services(workdir)
    (workdir / "metrics").mkdir()
    env = {"LETTERPRESS_DATABASE__URL": db_url, "LETTERPRESS_REDIS__URL": redis_url,
           "LETTERPRESS_STORAGE__URL": f"file://{workdir / 'storage'}", "LETTERPRESS_ENV": "test",
           "UVICORN_WORKERS": str(args.api_workers),
           # the uvicorn processes' metrics summed in one scrape (api/metrics.py), for their event-loop lag
           "PROMETHEUS_MULTIPROC_DIR": str(workdir / "metrics"),
           # one key drives the whole load: its per-key limit (api/rate_limits.py, still counted in Redis on every
           # call) must not be what answers, or this measures the limit instead of the server
           "LETTERPRESS_LIMITS__REQUESTS_PER_KEY": "1000000/second"}
    from common.auth import create_api_key, get_or_create_tenant
    from common.db import migrate, session_scope
    from common.settings import settings_from_env, use_settings

    with use_settings(settings_from_env(env)):
        migrate()
        with session_scope() as session:
            key = create_api_key(session, tenant=get_or_create_tenant(session, "bench"), name="bench")
    in_process = in_process_cost(env, key, args.in_process) if args.in_process else []
    api, url = start_api(env)
    try:
        result = asyncio.run(run(url, key, args, workdir, api.pid, db_url))
        result["in_process"] = in_process
    finally:
        api.terminate()
        api.wait(30)
        for service in services:
            service.stop()
    result["meta"] = {"cpus": os.cpu_count(), "python": sys.version.split()[0], "api_workers": args.api_workers,
                      "duration_s": args.duration, "command": " ".join(["python -m worker.bench.front_door",
                                                                         *(argv or sys.argv[1:])])}
    print(render(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
