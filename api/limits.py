"""Bounds the front door puts on requests.

Before any handler runs (a pure ASGI middleware):

- a body-carrying call to /v1 without `Authorization: Bearer ...` is 401 before a byte of its body is read
  (the key itself is checked by the route's CurrentTenant, as for every call);
- a body larger than the route's limit is 413, naming the limit: at once when `Content-Length` says so, else as
  soon as the streamed body passes it, so an oversized body is never held, parsed or spooled whole.

Limits (common.settings.ApiSettings): `max_body_bytes` for every route, except POST /v1/batches:
`max_batch_json_bytes` for a JSON body, `max_batch_upload_bytes` for a multipart upload (Starlette spools the
file part to disk) and for the console's upload form; a multipart POST /v1/adapters takes
`adapters.max_file_bytes` (plus the form's own bytes).

At most `max_in_flight` requests are served at once per process (`AdmissionControl`); past that a request is a
503 with `Retry-After: 1` at once, and the probes (/healthz, /readyz) and the scrape (/metrics) are never held back.

A client address that keeps presenting wrong keys is refused with 429 for a while (`WrongKeyGuard`,
api/wrong_keys.py). A key past `limits.requests_per_key` is refused with 429 and `Retry-After` (`KeyRateLimit`,
api/rate_limits.py).

Batch ingests (validation and COPY of up to a million lines) run a bounded number at once per API process,
overall and per tenant (`max_ingests`, `max_ingests_per_tenant`); one more is 429 with `Retry-After`, at once.
"""
from __future__ import annotations

import json
import threading
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any

from fastapi import FastAPI
from starlette.exceptions import HTTPException

from api.asgi import header as _header
from api.errors import error_response
from api.key_use import KeyLastUse
from api.rate_limits import KeyRateLimit
from api.wrong_keys import WrongKeyGuard
from common.errors import TooManyRequests
from common.settings import ApiSettings, Settings, get_settings

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

BODY_METHODS = {"POST", "PUT", "PATCH"}
MULTIPART_OVERHEAD = 64 * 1024  # an adapter upload's form fields and part headers, beside the file itself


class BodyTooLarge(HTTPException):
    """Raised from `receive` once the streamed body passes its limit. An HTTPException, so a handler reading the
    body (FastAPI's own parsing, `request.form()`) lets it through to the 413 answer instead of a 400."""

    def __init__(self, limit: int):
        super().__init__(413, f"the request body passed {limit} bytes, the most this call takes")
        self.limit = limit


def body_limit(method: str, path: str, content_type: str, settings: Settings) -> int:
    """The most bytes this call's body may have."""
    api = settings.api
    if method == "POST" and path.rstrip("/") == "/v1/adapters" and content_type.startswith("multipart/form-data"):
        return settings.adapters.max_file_bytes + MULTIPART_OVERHEAD
    if method == "POST" and path.rstrip("/") == "/v1/uploads":
        return api.input_image_max_bytes + MULTIPART_OVERHEAD
    if method == "POST" and path.rstrip("/") == "/ui/batches":  # the console's upload form (api/console/batches.py)
        return api.max_batch_upload_bytes
    if method == "POST" and path.rstrip("/") == "/v1/batches":
        if content_type.startswith("multipart/form-data"):
            return api.max_batch_upload_bytes
        return api.max_batch_json_bytes
    return api.max_body_bytes


async def _answer(send: Send, status: int, type_: str, message: str, field: str) -> None:
    body = json.dumps({"error": {"type": type_, "message": message, "field": field}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class AdmissionControl:
    """At most `max_in_flight` requests of this process are being served at once (liveness and readiness
    probes excepted); one more is answered 503 with `Retry-After: 1` at once. Without it an overload queues
    requests (and their open database sessions) behind each other until every caller has timed out, and the
    server then spends minutes on work nobody waits for."""

    EXEMPT = ("/healthz", "/readyz", "/metrics")

    def __init__(self, app: ASGIApp):
        self.app = app
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.EXEMPT or scope["path"].endswith("/events"):
            # event streams are long on purpose: bounded by their own count (api/event_streams.py)
            return await self.app(scope, receive, send)
        if self.in_flight >= get_settings().api.max_in_flight:
            body = json.dumps({"error": {"type": "overloaded",
                                         "message": "the server is at capacity; retry shortly"}}).encode()
            await send({"type": "http.response.start", "status": 503,
                        "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1"),
                                    (b"content-length", str(len(body)).encode())]})
            return await send({"type": "http.response.body", "body": body})
        self.in_flight += 1  # one event loop per process: no lock needed
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


class RequestBounds:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            return await self.app(scope, receive, send)
        path = scope["path"]
        if path.startswith("/v1/") and not _header(scope, b"authorization").lower().startswith("bearer "):
            return await _answer(send, 401, "unauthorized", "missing API key: send Authorization: Bearer <key>",
                                 "Authorization")
        limit = body_limit(scope["method"], path, _header(scope, b"content-type").lower(), get_settings())
        declared = _header(scope, b"content-length")
        if declared.isdigit() and int(declared) > limit:
            return await _answer(send, 413, "payload_too_large",
                                 f"the request body is {declared} bytes; this call takes at most {limit}", "body")
        seen = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge as exc:  # raised outside any handler that answers it
            if started:
                raise
            await _answer(send, 413, "payload_too_large", exc.detail, "body")


def install(app: FastAPI) -> None:
    """The middleware, and the JSON answer for a body that passed its limit inside a handler."""
    async def too_large(_request, exc: BodyTooLarge):
        return error_response(413, "payload_too_large", exc.detail, "body", headers={"Connection": "close"})

    app.add_exception_handler(BodyTooLarge, too_large)
    app.add_middleware(RequestBounds)
    app.add_middleware(KeyLastUse)
    app.add_middleware(KeyRateLimit)  # inside the wrong-key guard: a blocked guesser spends nothing
    app.add_middleware(WrongKeyGuard)  # before the bounds: a blocked guesser's body is never read
    app.add_middleware(AdmissionControl)  # added last: outermost, so a shed request costs nothing more


class IngestSlots:
    """Batch ingests running in this process, overall and per tenant."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running = 0
        self._by_tenant: Counter[uuid.UUID] = Counter()

    @contextmanager
    def take(self, tenant_id: uuid.UUID, api: ApiSettings) -> Iterator[None]:
        with self._lock:
            if self._by_tenant[tenant_id] >= api.max_ingests_per_tenant:
                raise TooManyRequests(f"{api.max_ingests_per_tenant} batch uploads of yours are being ingested; "
                                      "retry when one is done", retry_after_s=5)
            if self._running >= api.max_ingests:
                raise TooManyRequests("the server is ingesting as many batches as it takes at once; retry shortly",
                                      retry_after_s=5)
            self._running += 1
            self._by_tenant[tenant_id] += 1
        try:
            yield
        finally:
            with self._lock:
                self._running -= 1
                self._by_tenant[tenant_id] -= 1
                if not self._by_tenant[tenant_id]:
                    del self._by_tenant[tenant_id]


ingest_slots = IngestSlots()
