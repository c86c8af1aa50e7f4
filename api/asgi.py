"""Small helpers for the pure-ASGI middleware of the front door (api/limits.py, api/wrong_keys.py,
api/key_use.py): reading a header, the presented key, the status a response went out with."""
from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from common.auth import hash_key

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Send = Callable[[Message], Awaitable[None]]
Receive = Callable[[], Awaitable[Message]]


def header(scope: Scope, name: bytes) -> str:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return ""


def bearer_key(scope: Scope) -> str | None:
    """The key of `Authorization: Bearer <key>`, or None."""
    text = header(scope, b"authorization")
    return text[7:].strip() or None if text[:7].lower() == "bearer " else None


_KEY_HASH = "letterpress.key_hash"


def presented_key_hash(scope: Scope) -> str | None:
    """The stored-hash form of the presented key (common.auth.hash_key), computed once a request and kept in the
    scope, so the middleware that need it do not each hash it again."""
    if _KEY_HASH not in scope:
        key = bearer_key(scope)
        scope[_KEY_HASH] = hash_key(key) if key is not None else None
    return scope[_KEY_HASH]


class StatusWatch:
    """Wraps `send` to remember the status the response started with (0 until it starts)."""

    def __init__(self, send: Send):
        self._send = send
        self.status = 0

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        await self._send(message)

    @property
    def succeeded(self) -> bool:
        """A 2xx or 3xx: every /v1 route checks the key before it can succeed (a 413 or 422 may come first)."""
        return 200 <= self.status < 400
