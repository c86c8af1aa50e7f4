"""Per-key request rates: every /v1 call presenting a key counts against `limits.requests_per_key` (the `limits`
library's fixed window, counted in Redis, so every API process shares one budget per key).

- Within the rate: the answer carries `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset` (seconds until
  the window resets), the IETF draft's names.
- Past it: 429 `rate_limited` naming `Authorization`, with `Retry-After` and the same headers, before the call
  reads its body or the database. Nothing the key submitted before is touched.
- Counted by the presented key's hash before the key is checked: a wrong key spends a budget nobody owns (wrong keys
  are slowed by api/wrong_keys.py, which runs first).
- Redis unreachable: the call goes through uncounted (logged at most once a minute): a limit protects the fleet,
  it must not take the front door down with Redis.
- One Redis round trip a call: the window's counter is incremented (the `limits` storage's atomic INCR with
  expiry) and the window's end is remembered per key in the process (known when this call opened the window,
  else asked once: the library's `hit` plus `get_window_stats` cost three round trips a call).
- A tenant may have a rate of its own (`tenants.limits.requests_per_key`, set by an admin): looked up by key once
  per TENANT_RATE_TTL_S per process (so a change takes effect within that), the default otherwise; "" turns the
  limit off for that tenant.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import weakref
from collections import OrderedDict

from limits import RateLimitItem, parse
from limits.aio.storage import Storage
from limits.storage import storage_from_string

from api.asgi import presented_key_hash
from common.settings import get_settings

log = logging.getLogger(__name__)
LOG_EVERY_S = 60.0
TENANT_RATE_TTL_S = 30.0
TENANT_RATES_KEPT = 10_000  # keys whose tenant rate is remembered per process (and whose window's end)


class KeyRateLimit:
    def __init__(self, app):
        self.app = app
        # one storage (and Redis connection pool) per event loop: uvicorn runs one, a test client several
        self._storages: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[str, Storage]] = (
            weakref.WeakKeyDictionary())
        self._rates: dict[str, RateLimitItem] = {}
        self._last_warning = 0.0
        self._tenant_rates: OrderedDict[str, tuple[float, str | None]] = OrderedDict()  # key hash -> (until, rate)
        self._window_ends: OrderedDict[str, float] = OrderedDict()  # window counter key -> its end (epoch seconds)

    async def _rate_for(self, scope, digest: str, default: str) -> str:
        """The key's tenant's own rate when it has one, else `default` (cached; the database is asked on a miss)."""
        now = time.monotonic()
        cached = self._tenant_rates.get(digest)
        if cached is None or cached[0] < now:
            store = getattr(getattr(scope.get("app"), "state", None), "job_store", None)
            try:
                own = await store.tenant_rate(digest) if store is not None else None
            except Exception as exc:  # noqa: BLE001 - the default rate still applies
                log.warning("tenant request rate not read (%s): the default applies", exc)
                own = None
            cached = self._tenant_rates[digest] = (now + TENANT_RATE_TTL_S, own)
            while len(self._tenant_rates) > TENANT_RATES_KEPT:
                self._tenant_rates.popitem(last=False)
        self._tenant_rates.move_to_end(digest)
        return default if cached[1] is None else cached[1]

    def _storage_for(self, redis_url: str) -> Storage:
        loop = asyncio.get_running_loop()
        found = self._storages.get(loop)
        if found is None or found[0] != redis_url:
            storage = storage_from_string(f"async+{redis_url}", implementation="redispy",
                                          socket_connect_timeout=0.5, socket_timeout=0.5)
            found = self._storages[loop] = (redis_url, storage)
        return found[1]

    async def _count(self, storage: Storage, item: RateLimitItem, digest: str) -> tuple[int, float]:
        """This call's number in the key's current fixed window, and when the window ends (epoch seconds)."""
        key = item.key_for("key", digest)
        count = await storage.incr(key, item.get_expiry())
        now = time.time()
        end = self._window_ends.get(key)
        if count == 1 or end is None or end <= now:  # a new window, or one another process opened
            end = now + item.get_expiry() if count == 1 else await storage.get_expiry(key)
            self._window_ends[key] = end
            while len(self._window_ends) > TENANT_RATES_KEPT:
                self._window_ends.popitem(last=False)
        self._window_ends.move_to_end(key)
        return count, end

    async def __call__(self, scope, receive, send) -> None:
        settings = get_settings()
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        digest = presented_key_hash(scope)
        if digest is None:  # no key: the route answers 401
            return await self.app(scope, receive, send)
        rate = await self._rate_for(scope, digest, settings.limits.requests_per_key)
        if not rate:
            return await self.app(scope, receive, send)
        item = self._rates.get(rate) or self._rates.setdefault(rate, parse(rate))
        try:
            count, window_end = await self._count(self._storage_for(settings.redis.url), item, digest)
        except Exception as exc:  # noqa: BLE001 - fail open: see the module docstring
            if time.monotonic() - self._last_warning > LOG_EVERY_S:
                self._last_warning = time.monotonic()
                log.warning("request rate limits not applied: Redis unavailable (%s)", exc)
            return await self.app(scope, receive, send)
        reset_s = max(0, math.ceil(window_end - time.time()))
        headers = [(b"ratelimit-limit", str(item.amount).encode()),
                   (b"ratelimit-remaining", str(max(0, item.amount - count)).encode()),
                   (b"ratelimit-reset", str(reset_s).encode())]
        if count > item.amount:
            return await _too_many(send, headers, rate, max(1, reset_s))

        async def with_headers(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *headers]}
            await send(message)

        await self.app(scope, receive, with_headers)


async def _too_many(send, headers: list[tuple[bytes, bytes]], rate: str, retry_after_s: int) -> None:
    body = json.dumps({"error": {"type": "rate_limited", "field": "Authorization",
                                 "message": f"this API key made more than {rate} requests; retry after "
                                            f"{retry_after_s} s"}}).encode()
    await send({"type": "http.response.start", "status": 429,
                "headers": [(b"content-type", b"application/json"), (b"retry-after", str(retry_after_s).encode()),
                            (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})
