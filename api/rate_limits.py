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
- Call numbers are reserved from Redis a few at a time: each API process takes the next `reserve_size` numbers of
  the key's window with one INCRBY (the `limits` storage's atomic increment with expiry) and hands them to its
  calls; the call numbered past the rate is refused. So the rate is never exceeded across processes, a key's
  calls cost a Redis round trip every `reserve_size` calls, and a small rate (under RESERVE_DIVISOR a window) is
  counted call by call, exactly. What a process reserved and did not use when the window ends (at most
  `reserve_size` - 1 calls, 1% of the rate) is lost to that window: the key is refused that much early at worst,
  never let past. The window's end is remembered with the reservation (known when it opened the window, else
  asked once).
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
from dataclasses import dataclass

from limits import RateLimitItem, parse
from limits.aio.storage import Storage
from limits.storage import storage_from_string

from api.asgi import presented_key_hash
from common.settings import get_settings

log = logging.getLogger(__name__)
LOG_EVERY_S = 60.0
TENANT_RATE_TTL_S = 30.0
TENANT_RATES_KEPT = 10_000  # keys whose tenant rate is remembered per process (and whose reservation)
RESERVE_DIVISOR = 100  # a process reserves 1% of a key's rate at a time...
RESERVE_MAX = 50       # ...and at most this many call numbers


def reserve_size(amount: int) -> int:
    """Call numbers a process reserves at a time for a key whose window allows `amount` calls."""
    return max(1, min(RESERVE_MAX, amount // RESERVE_DIVISOR))


@dataclass
class _Reserved:
    next: int    # the next call number this process holds in the key's window
    last: int    # the last one it holds
    end: float   # when the window ends (epoch seconds)


class KeyRateLimit:
    def __init__(self, app):
        self.app = app
        # one storage (and Redis connection pool) per event loop: uvicorn runs one, a test client several
        self._storages: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[str, Storage]] = (
            weakref.WeakKeyDictionary())
        self._rates: dict[str, RateLimitItem] = {}
        self._last_warning = 0.0
        self._tenant_rates: OrderedDict[str, tuple[float, str | None]] = OrderedDict()  # key hash -> (until, rate)
        self._reserved: OrderedDict[str, _Reserved] = OrderedDict()  # window counter key -> numbers held

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
        now = time.time()
        held = self._reserved.get(key)
        if held is None or held.next > held.last or held.end <= now:
            size = reserve_size(item.amount)
            last = await storage.incr(key, item.get_expiry(), amount=size)
            first = last - size + 1
            if first == 1:  # this reservation opened the window
                end = now + item.get_expiry()
            elif held is not None and held.end > now:  # the same window as the last reservation
                end = held.end
            else:  # a window another process opened
                end = await storage.get_expiry(key)
            held = self._reserved[key] = _Reserved(next=first, last=last, end=end)
            while len(self._reserved) > TENANT_RATES_KEPT:
                self._reserved.popitem(last=False)
        self._reserved.move_to_end(key)
        count, held.next = held.next, held.next + 1
        return count, held.end

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
