"""GET a caller's URL through the SSRF guard, size-capped: what the server downloads on a caller's behalf (a remix's
`image` URL). The same rules as a webhook delivery (common/webhooks/client.py): the host is resolved once and every
address checked (common.webhooks.ssrf.resolve_safe), the connection goes to the checked address with the name in
the Host header and as the TLS server name, no redirects, no proxies from the environment, and the body is read
raw (no decompression) and cut off past `max_bytes` or the deadline."""
from __future__ import annotations

import ssl
import time

import httpx

from common.webhooks.ssrf import Resolver, UnsafeURLError, connect_url, host_header, resolve_safe

USER_AGENT = "Letterpress-Fetch/1"


class FetchError(ValueError):
    """The URL was refused or could not be read; the message is safe to show the caller."""


def fetch(url: str, *, max_bytes: int, timeout_s: float, allow_loopback: bool, resolver: Resolver | None = None,
          ssl_context: ssl.SSLContext | None = None) -> bytes:
    """The body of a 200 answer to GET `url`, at most `max_bytes`; FetchError otherwise."""
    try:
        target = resolve_safe(url, allow_loopback=allow_loopback, resolver=resolver)
    except UnsafeURLError as exc:
        raise FetchError(f"refused: {exc}") from None
    except OSError:
        raise FetchError("its host name does not resolve") from None
    headers = {"user-agent": USER_AGENT, "accept-encoding": "identity", "host": host_header(target)}
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    deadline = time.monotonic() + timeout_s
    try:
        with httpx.Client(timeout=timeout_s, follow_redirects=False, trust_env=False,
                          verify=ssl_context if ssl_context is not None else True) as client:
            with client.stream("GET", connect_url(target), headers=headers, extensions=extensions) as response:
                if response.status_code != 200:
                    raise FetchError(f"it answered HTTP {response.status_code}"
                                     + (" (redirects are not followed)" if 300 <= response.status_code < 400
                                        else ""))
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > max_bytes:
                    raise FetchError(f"it is larger than {max_bytes} bytes")
                data = bytearray()
                for chunk in response.iter_raw():
                    data += chunk
                    if len(data) > max_bytes:
                        raise FetchError(f"it is larger than {max_bytes} bytes")
                    if time.monotonic() > deadline:
                        raise FetchError(f"it took longer than {timeout_s:g} s")
    except httpx.TimeoutException:
        raise FetchError(f"it took longer than {timeout_s:g} s") from None
    except (httpx.HTTPError, httpx.InvalidURL, OSError) as exc:
        raise FetchError(f"it could not be read ({type(exc).__name__})") from None
    return bytes(data)
