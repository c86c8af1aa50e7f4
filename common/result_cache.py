"""The result cache: a job whose request was already run, with the same explicit seed, by the same tenant on a
worker of the same configuration, gets the stored images of that run instead of a generation. Its images are
copies of the earlier objects, byte for byte what a new generation would write (same pixels, same recipe inside:
`tests/worker/test_jobs_e2e.py` shows a request and seed always give the same bytes), at no device time.

- **Key**: sha256 over the tenant, the model (id, revision), the worker's configuration (variant, fast path,
  compiled) and every parameter that decides the bytes: prompt text, size, steps, schedule, seeds, adapters
  (sha256 and scale), format and quality. Metadata and webhook URLs are not part of it.
- **Only explicit seeds**: a request without a seed gets a new random one, so it never repeats.
- **Per tenant**: one tenant never gets another's results (that would tell it what the other asked for).
- **Hit**: every source object must still be in storage; otherwise it is a miss and the new run replaces the entry.
"""
from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from common.models import ResultCacheEntry

# The params that decide an image file's bytes (common.job_request.to_params); prompt/caption enter as prompt_text.
_PIXEL_PARAMS = ("prompt_text", "width", "height", "steps", "mu", "std", "guidance_schedule", "seed", "num_images",
                 "loras", "output_format", "output_quality", "preset", "prompt", "caption")


def cache_key(*, tenant_id: uuid.UUID, params: dict[str, Any], model_id: str, revision: str | None,
              worker_config: str) -> str | None:
    """The entry's key, or None when the request must not be cached (a server-chosen seed, or `cache: false`)."""
    if params.get("seed_generated", True) or params.get("cache") is False:
        return None
    body = {"tenant": str(tenant_id), "model": model_id, "revision": revision, "worker": worker_config,
            "params": {k: params.get(k) for k in _PIXEL_PARAMS}}
    magic = params.get("magic_prompt")
    if magic:  # the request, not the enhancer's answer: the same key before and after its caption is stored
        mode, prompt = (magic, params.get("prompt")) if isinstance(magic, str) else (magic["mode"], magic["prompt"])
        body["params"].update(prompt=prompt, caption=None, prompt_text=None)
        body["magic_prompt"] = mode
    if params.get("image"):  # a remix: its input by content (where it is stored does not change the pixels)
        body["remix"] = {"image_sha256": params["image"]["sha256"], "strength": params["strength"]}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def find(session: Session, key: str) -> ResultCacheEntry | None:
    return session.scalar(select(ResultCacheEntry).where(ResultCacheEntry.key == key))


def remember(session: Session, *, key: str, tenant_id: uuid.UUID, job_id: uuid.UUID,
             images: list[dict[str, Any]]) -> None:
    """Record (or replace) the entry, in the caller's transaction (the job's completion)."""
    values = {"tenant_id": tenant_id, "job_id": job_id, "images": images}
    session.execute(insert(ResultCacheEntry).values(key=key, **values)
                    .on_conflict_do_update(index_elements=["key"], set_=values))
