"""Records when each API key was last used (`api_keys.last_used_at`, shown by `letterpress keys list`), so an
operator can tell a dead key from a live one before revoking it.

At most once a minute per key and API process, and only after a success (a 2xx or 3xx: the key was checked), one
UPDATE by key hash, run after the response has gone out: no request waits for it, and a failure to write it is
logged, never answered. So the time is right to about a minute.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict

import psycopg
from psycopg_pool import PoolTimeout

from api.asgi import StatusWatch, presented_key_hash

log = logging.getLogger(__name__)
TOUCH_EVERY_S = 60.0
REMEMBERED_KEYS = 10_000
TOUCH_SQL = "UPDATE api_keys SET last_used_at = now() WHERE key_hash = %(key_hash)s"


class KeyLastUse:
    def __init__(self, app):
        self.app = app
        self.touched: OrderedDict[str, float] = OrderedDict()  # key hash -> monotonic time of the last write

    async def __call__(self, scope, receive, send) -> None:
        digest = presented_key_hash(scope) if scope["type"] == "http" and scope["path"].startswith("/v1/") else None
        if digest is None:
            return await self.app(scope, receive, send)
        watch = StatusWatch(send)
        await self.app(scope, receive, watch)
        if not watch.succeeded:
            return
        now = time.monotonic()
        if now - self.touched.get(digest, float("-inf")) < TOUCH_EVERY_S:
            return
        self.touched[digest] = now
        self.touched.move_to_end(digest)
        if len(self.touched) > REMEMBERED_KEYS:
            self.touched.popitem(last=False)
        try:
            async with scope["app"].state.job_store.connection() as conn:
                await conn.execute(TOUCH_SQL, {"key_hash": digest})
        except (psycopg.Error, PoolTimeout) as exc:  # the answer is already out: note it, try again next minute
            self.touched.pop(digest, None)
            log.warning("could not record an API key's last use: %s", exc)
