"""What one request costs the API process itself: the app called in-process (no HTTP server, no network client),
so the figure is the application's own CPU, free of the load generator's and uvicorn's, and steady enough to
compare two builds side by side on a noisy machine.

    python -m api.request_cost --key lp_... [--calls 1000] [--warm 100]

Run by `python -m worker.bench.front_door --in-process N` (which starts Postgres and Redis and makes the key);
reads the database, Redis and storage settings from the environment like the API. Prints one JSON line per call
kind: CPU ms and wall ms a call (process CPU: the event loop and the threadpool that sends to the broker), for
`GET /v1/jobs/{id}` of a queued job (the read and its queue position) and `POST /v1/jobs` without a seed (the
one-statement submit, the broker send, the enqueue mark and the position), one at a time and 20 at once (as
under load, where the broker sends and marks of the submits meanwhile group).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence

from api.main import create_app

JOB = {"prompt": "a poster that says HELLO", "width": 1024, "height": 1024, "preset": "V4_TURBO_12"}
AT_ONCE = 20


async def _call(app, key: str, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
    """One request through the ASGI app: (status, body)."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"127.0.0.1"), (b"authorization", f"Bearer {key}".encode()),
                         (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8000)}
    messages: list[dict] = []
    delivered = False

    async def receive() -> dict:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # the client never disconnects
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        messages.append(message)

    await app(scope, receive, send)
    return messages[0]["status"], b"".join(m.get("body", b"") for m in messages[1:])


async def _statuses(call) -> list[int]:
    return [(await call)[0]]


async def _at_least(one, calls: int) -> list[int]:
    """The statuses of `one()` (a list each time) run until there are at least `calls`."""
    statuses: list[int] = []
    while len(statuses) < calls:
        statuses += await one()
    return statuses


async def measure(key: str, calls: int, warm: int) -> list[dict]:
    app = create_app()
    results = []
    async with app.router.lifespan_context(app):
        status, body = await _call(app, key, "POST", "/v1/jobs", json.dumps(JOB).encode())
        if status != 202:
            raise SystemExit(f"the first submit answered {status}: {body[:300]!r}")
        job_path = f"/v1/jobs/{json.loads(body)['id']}"

        def submit():
            return _call(app, key, "POST", "/v1/jobs", json.dumps(JOB).encode())

        async def submits_at_once() -> list[int]:  # as under load: the sends of the submits meanwhile group
            return [status for status, _ in await asyncio.gather(*(submit() for _ in range(AT_ONCE)))]

        kinds = {"GET /v1/jobs/{id}": (200, lambda: _statuses(_call(app, key, "GET", job_path))),
                 "POST /v1/jobs": (202, lambda: _statuses(submit())),
                 f"POST /v1/jobs, {AT_ONCE} at once": (202, submits_at_once)}
        for name, (expected, one) in kinds.items():
            await _at_least(one, warm)
            wall, cpu = time.perf_counter(), time.process_time()
            statuses = await _at_least(one, calls)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            calls_made = len(statuses)
            if set(statuses) != {expected}:
                raise SystemExit(f"{name}: answered {sorted(set(statuses))}, expected {expected}")
            results.append({"call": name, "calls": calls_made, "cpu_ms": round(cpu / calls_made * 1000, 3),
                            "wall_ms": round(wall / calls_made * 1000, 3)})
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--key", required=True, help="an API key of a tenant with room for calls + warm jobs")
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--warm", type=int, default=100)
    args = parser.parse_args(argv)
    for row in asyncio.run(measure(args.key, args.calls, args.warm)):
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
