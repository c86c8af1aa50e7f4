"""Slows down guessing API keys: a client address that presents `wrong_keys_per_minute` wrong keys within a
minute gets 429 (`Retry-After`) for `wrong_key_block_s` seconds on every /v1 call whose key this process has not
seen work recently, before the key is looked up.

- Counting: each 401 to a request that presented a key increments a per-address, per-minute counter in Redis
  (shared by every API process, so more processes do not mean more guesses), only on that failure path: a
  request with a good key costs no Redis call. Redis down: counted in this process instead.
- Blocking: in this process's memory, checked before anything else (no I/O). Another process blocks the address
  on its own next failure from it, since the counter is shared.
- Keys that worked: a request whose key succeeded (a 2xx or 3xx answer: a 413 or 422 can come before the key is
  checked, a success never does) puts the key's hash in a bounded recent set; a blocked address still gets
  through with such a key. So a guesser behind a NAT or a proxy does not lock out the good clients that share its
  address, and a guess is never let through (a guessed key would have to be one that just worked).

Behind a proxy, the address is the proxy's unless uvicorn trusts its forwarded headers (`FORWARDED_ALLOW_IPS`);
docs/SECURITY.md. `wrong_keys_per_minute: 0` turns this off.
"""
from __future__ import annotations

import json
import logging
import math
import time
from collections import OrderedDict

import redis.asyncio as aioredis

from api.asgi import StatusWatch, presented_key_hash
from common.settings import get_settings

log = logging.getLogger(__name__)
COUNTER_PREFIX = "letterpress:wrong-keys:"
RECENT_KEYS = 10_000  # hashes of keys that worked lately, per process
BLOCKED_ADDRESSES = 10_000


class WrongKeyGuard:
    def __init__(self, app):
        self.app = app
        self.blocked: OrderedDict[str, float] = OrderedDict()  # address -> monotonic time the block ends
        self.good_keys: OrderedDict[str, None] = OrderedDict()  # hashes of keys that authenticated lately
        self.local_counts: dict[tuple[str, int], int] = {}  # fallback when Redis cannot count

    async def __call__(self, scope, receive, send) -> None:
        api = get_settings().api
        if scope["type"] != "http" or not scope["path"].startswith("/v1/") or not api.wrong_keys_per_minute:
            return await self.app(scope, receive, send)
        digest = presented_key_hash(scope)
        if digest is None:  # no key at all: a 401 from the route, not a guess
            return await self.app(scope, receive, send)
        address = (scope.get("client") or ("unknown",))[0]
        until = self.blocked.get(address)
        if until is not None:
            left = until - time.monotonic()
            if left <= 0:
                del self.blocked[address]
            elif digest not in self.good_keys:
                return await _too_many(send, math.ceil(left))
        watch = StatusWatch(send)
        await self.app(scope, receive, watch)
        if watch.status == 401:
            await self._failed(address, api)
        elif watch.succeeded:  # only a success proves the key: a 413 or 422 can answer before it is checked
            self.good_keys[digest] = None
            self.good_keys.move_to_end(digest)
            if len(self.good_keys) > RECENT_KEYS:
                self.good_keys.popitem(last=False)

    async def _failed(self, address: str, api) -> None:
        minute = int(time.time() // 60)
        try:
            failures = await _count_in_redis(f"{COUNTER_PREFIX}{address}:{minute}", get_settings().redis.url)
        except (aioredis.RedisError, OSError) as exc:
            log.warning("wrong-key counter: Redis unavailable (%s); counting in this process", exc)
            self.local_counts = {k: v for k, v in self.local_counts.items() if k[1] >= minute - 1}
            failures = self.local_counts[(address, minute)] = self.local_counts.get((address, minute), 0) + 1
        if failures >= api.wrong_keys_per_minute:
            if address not in self.blocked:
                log.warning("%s presented %d wrong API keys this minute: refused for %d s", address, failures,
                            api.wrong_key_block_s)
            self.blocked[address] = time.monotonic() + api.wrong_key_block_s
            self.blocked.move_to_end(address)
            if len(self.blocked) > BLOCKED_ADDRESSES:
                self.blocked.popitem(last=False)


async def _count_in_redis(counter: str, url: str) -> int:
    client = aioredis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        async with client.pipeline(transaction=False) as pipe:
            count, _ = await pipe.incr(counter).expire(counter, 120).execute()
        return int(count)
    finally:
        await client.aclose()


async def _too_many(send, retry_after_s: int) -> None:
    body = json.dumps({"error": {"type": "too_many_requests", "field": "Authorization",
                                 "message": "too many wrong API keys from this address; retry later"}}).encode()
    await send({"type": "http.response.start", "status": 429,
                "headers": [(b"content-type", b"application/json"), (b"retry-after", str(retry_after_s).encode()),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def sign_in_failures(address: str, *, add: bool) -> int:
    """The wrong keys `address` presented this minute (the counter the guard above keeps for /v1), after adding
    one when `add`: the console's sign-in form (api/console/auth.py) counts and is refused by the same rule, so
    guessing through the form is no cheaper than through the API. 0 when Redis cannot tell."""
    counter = f"{COUNTER_PREFIX}{address}:{int(time.time() // 60)}"
    try:
        if add:
            return await _count_in_redis(counter, get_settings().redis.url)
        client = aioredis.Redis.from_url(get_settings().redis.url, socket_connect_timeout=0.5, socket_timeout=0.5)
        try:
            return int(await client.get(counter) or 0)
        finally:
            await client.aclose()
    except (aioredis.RedisError, OSError) as exc:
        log.warning("wrong-key counter: Redis unavailable (%s)", exc)
        return 0
