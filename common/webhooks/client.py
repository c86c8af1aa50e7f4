"""One webhook HTTP attempt, made safely and never raising.

The request goes to the address the SSRF guard checked (the URL's host is replaced by that IP; the name travels
in the Host header and, for https, as the TLS server name, so certificates are still verified against the
name): the host is never resolved a second time. Redirects are not followed (a 3xx could point anywhere,
including inside our network), proxies from the environment are ignored (a proxy would resolve the name
itself), and only a short excerpt of the response body is read. Every outcome, including refusal by the
guard, DNS failure, a timeout or a refused connection, comes back as a DeliveryResult for the delivery log.
"""
from __future__ import annotations

import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass

import httpx

from common.settings import WebhookSettings
from common.webhooks.schedule import parse_retry_after
from common.webhooks.ssrf import Resolver, UnsafeURLError, connect_url, host_header, resolve_safe

EXCERPT_BYTES = 1024
USER_AGENT = "Letterpress-Webhooks/1"


@dataclass(frozen=True)
class DeliveryResult:
    status_code: int | None  # None when no HTTP answer came back
    error: str | None  # None for a 2xx answer; otherwise what went wrong, for the delivery log
    duration_ms: int
    retry_after_s: float | None = None
    response_excerpt: str = ""
    ip: str | None = None  # the address connected to
    refused: bool = False  # the SSRF guard refused the target; nothing was sent

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def deliver(
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    *,
    settings: WebhookSettings,
    resolver: Resolver | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> DeliveryResult:
    """POST `body` with `headers` to `url` once. `resolver` replaces DNS (tests); `ssl_context` replaces the
    default certifi trust store (a private CA, tests)."""
    started = time.monotonic()

    def result(**fields) -> DeliveryResult:
        return DeliveryResult(duration_ms=round((time.monotonic() - started) * 1000), **fields)

    try:
        target = resolve_safe(url, allow_loopback=settings.allow_loopback, resolver=resolver)
    except UnsafeURLError as exc:
        return result(status_code=None, error=f"refused: {exc}", refused=True)
    except OSError as exc:
        return result(status_code=None, error=f"dns: cannot resolve host: {exc}")

    # identity: the excerpt is read raw, so a compressed body can never expand in memory.
    request_headers = httpx.Headers({"user-agent": USER_AGENT, "accept-encoding": "identity"})
    request_headers.update(headers)
    request_headers["host"] = host_header(target)
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    try:
        with httpx.Client(
            timeout=settings.timeout_s, follow_redirects=False, trust_env=False,
            verify=ssl_context if ssl_context is not None else True,
        ) as client:
            with client.stream("POST", connect_url(target), content=body, headers=request_headers,
                               extensions=extensions) as response:
                excerpt = _read_excerpt(response, deadline=started + settings.timeout_s)
    except httpx.TimeoutException as exc:
        return result(status_code=None, error=f"timeout after {settings.timeout_s:g}s ({type(exc).__name__})",
                      ip=target.ip)
    except (httpx.HTTPError, httpx.InvalidURL, OSError) as exc:
        return result(status_code=None, error=f"{type(exc).__name__}: {exc}", ip=target.ip)

    status = response.status_code
    if 200 <= status < 300:
        error = None
    elif 300 <= status < 400:
        error = f"HTTP {status}: redirect to {response.headers.get('location', '?')[:200]!r} not followed"
    else:
        error = f"HTTP {status}"
    return result(status_code=status, error=error, ip=target.ip, response_excerpt=excerpt,
                  retry_after_s=parse_retry_after(response.headers.get("retry-after")))


def _read_excerpt(response: httpx.Response, *, deadline: float) -> str:
    """The first EXCERPT_BYTES of the body; stops early so a huge or endless body cannot hold the worker."""
    data = b""
    for chunk in response.iter_raw():
        data += chunk
        if len(data) >= EXCERPT_BYTES or time.monotonic() > deadline:
            break
    return data[:EXCERPT_BYTES].decode("utf-8", errors="replace")
