"""Where a running job's latest preview lives (worker/pipeline/previews.py makes them): one small JPEG a job in
Redis, `letterpress:preview:<job id>`, replaced every few steps and gone `TTL_S` after the last one. The worker
writes it (`store`); the API's event stream reads it (`read`) and sends it with the job's progress. Redis, not
Postgres: previews are many small, short-lived writes that nothing needs once the job has ended."""
from __future__ import annotations

import base64
import json
import uuid

import redis as redis_lib
import redis.asyncio as aioredis

KEY_PREFIX = "letterpress:preview:"
TTL_S = 600


def _key(job_id: uuid.UUID | str) -> str:
    return f"{KEY_PREFIX}{job_id}"


def store(client: redis_lib.Redis, *, job_id: uuid.UUID, step: int, jpeg: bytes) -> None:
    client.set(_key(job_id), json.dumps({"step": step, "jpeg": base64.b64encode(jpeg).decode()}), ex=TTL_S)


async def read(client: aioredis.Redis, job_id: uuid.UUID | str) -> tuple[int, str] | None:
    """(step, a data: URL of the JPEG) of the job's latest preview, or None."""
    raw = await client.get(_key(job_id))
    if raw is None:
        return None
    found = json.loads(raw)
    return found["step"], "data:image/jpeg;base64," + found["jpeg"]
