"""Console sign-in sessions: server-side, in Redis, so signing out (or an expiry) ends them everywhere.

Signing in with an API key stores `{key_hash, csrf}` under the SHA-256 of a random session token; the browser
holds only the token, in an HTTP-only, `SameSite=Strict` cookie scoped to /ui. The API key itself is never kept.
Every request re-checks the key's hash against the keys table (common.auth.authenticate_hash), so a revoked or
expired key ends its console sessions on the next click. A session idles out after `console.session_ttl_s`
(each request renews it).
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
import weakref
from dataclasses import dataclass

import redis.asyncio as aioredis

from common.settings import Settings

COOKIE = "lp_session"
LOGIN_CSRF_COOKIE = "lp_login_csrf"  # the sign-in form's double-submit token (there is no session yet)
_PREFIX = "letterpress:console:session:"


@dataclass(frozen=True)
class ConsoleSession:
    token_hash: str
    key_hash: str
    csrf: str

    def csrf_ok(self, presented: str | None) -> bool:
        return bool(presented) and hmac.compare_digest(self.csrf, presented)


# One client (and connection pool) per event loop and Redis URL: uvicorn runs one loop, a test client several, and
# a pool belongs to the loop it was made on.
_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, aioredis.Redis]] = weakref.WeakKeyDictionary()


def _redis(settings: Settings) -> aioredis.Redis:
    per_loop = _clients.setdefault(asyncio.get_running_loop(), {})
    client = per_loop.get(settings.redis.url)
    if client is None:
        client = per_loop[settings.redis.url] = aioredis.Redis.from_url(
            settings.redis.url, socket_connect_timeout=2, socket_timeout=2)
    return client


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


async def create(settings: Settings, key_hash: str) -> str:
    """A new session for the key with this hash; returns the token for the cookie."""
    token = secrets.token_urlsafe(32)
    record = json.dumps({"key_hash": key_hash, "csrf": secrets.token_urlsafe(32)})
    await _redis(settings).set(_PREFIX + _token_hash(token), record, ex=settings.console.session_ttl_s)
    return token


async def find(settings: Settings, token: str | None) -> ConsoleSession | None:
    """The live session of this cookie value (renewing its idle timeout), or None."""
    if not token or len(token) > 128:
        return None
    token_hash = _token_hash(token)
    record = await _redis(settings).getex(_PREFIX + token_hash, ex=settings.console.session_ttl_s)
    if record is None:
        return None
    data = json.loads(record)
    return ConsoleSession(token_hash=token_hash, key_hash=data["key_hash"], csrf=data["csrf"])


async def end(settings: Settings, session: ConsoleSession) -> None:
    await _redis(settings).delete(_PREFIX + session.token_hash)
