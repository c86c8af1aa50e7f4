"""SSRF guard for webhook URLs.

A webhook URL is chosen by the caller but fetched from inside our network, next to Postgres, Redis and the cloud
metadata service. So a URL is refused unless every address its host can mean is a public unicast address.

Two checks, one rule:
- `check_url` at submit time (no DNS: submits must not wait on it, and the answer may change anyway) refuses
  bad schemes, credentials, names that are never public (`localhost`, `*.internal`, ...) and literal addresses
  in every spelling browsers and libc accept (`2130706433`, `0x7f.1`, `0177.0.0.1`, `[::ffff:7f00:1]`, ...).
- `resolve_safe` at delivery time also resolves the name, checks EVERY A/AAAA answer and returns the checked
  address; the client connects to that address, so a resolver that changes its answer (DNS rebinding) between
  the check and the connection cannot steer the call.

`allow_loopback=True` (local development and tests only) lets exactly 127.0.0.0/8 and ::1 through; embedded
forms such as `::ffff:127.0.0.1` stay refused.
"""
from __future__ import annotations

import ipaddress
import re
import socket
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Iterable[str]]
"""(host, port) -> every address the host resolves to, as strings. Raises OSError when resolution fails."""

DEFAULT_PORTS = {"http": 80, "https": 443}


class UnsafeURLError(ValueError):
    """The URL may not be called; the message says why and is safe to show the caller. A ValueError, so a
    pydantic validator can raise it and the API answers 422 naming the field."""


@dataclass(frozen=True)
class ResolvedTarget:
    """Where a checked URL may be sent. Connect to `ip`; send `host` as Host header and TLS server name."""

    scheme: str
    host: str  # ASCII host name, or the canonical IP literal
    port: int
    target: str  # path and query, at least "/"
    ips: tuple[str, ...]  # every address the host resolved to, all checked
    ip: str  # the address to connect to


def _nets(*pairs: tuple[str, str]) -> list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str]]:
    return [(ipaddress.ip_network(net), label) for net, label in pairs]


_BLOCKED_V4 = _nets(
    ("255.255.255.255/32", "broadcast"),
    ("0.0.0.0/8", "unspecified"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "carrier-grade NAT"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local (cloud metadata)"),
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "IETF protocol assignment"),
    ("192.0.2.0/24", "documentation"),
    ("192.168.0.0/16", "private"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
)
_BLOCKED_V6 = _nets(
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("100::/64", "discard-only"),
    ("64:ff9b:1::/48", "local-use NAT64"),
    ("2001::/32", "Teredo tunnel"),
    ("2001:db8::/32", "documentation"),
    ("fc00::/7", "unique local (private)"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local"),
    ("ff00::/8", "multicast"),
)
# IPv6 forms that carry an IPv4 address the packet ends up at: judged by that IPv4 address. Listed after
# ::/128 and ::1/128 above, which fall inside ::/96 but are checked first.
_EMBEDDING_V6 = _nets(
    ("::ffff:0:0/96", "IPv4-mapped"),
    ("::/96", "IPv4-compatible"),
    ("64:ff9b::/96", "NAT64"),
    ("2002::/16", "6to4"),
)
_NEVER_PUBLIC_SUFFIXES = (".internal", ".local", ".home.arpa")  # ICANN private use, mDNS, RFC 8375
_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")
_IPV4_PART = re.compile(r"0x[0-9a-f]*|[0-9]+")
_FORBIDDEN_CHARS = re.compile(r"[\x00-\x20\x7f\\]")
_ONLY_PUBLIC = "webhooks may only call public addresses"


def blocked_reason(ip: IPAddress, *, allow_loopback: bool = False) -> str | None:
    """Why `ip` may not be called (its category), or None when it is a public unicast address."""
    if ip.version == 6:
        for net, label in _BLOCKED_V6[:2]:
            if ip in net:
                return None if label == "loopback" and allow_loopback else label
        for net, label in _EMBEDDING_V6:
            if ip in net:
                v4 = _embedded_v4(ip, net)
                reason = blocked_reason(v4)
                return f"{label} form of {v4}, {reason}" if reason else None
        table = _BLOCKED_V6[2:]
    else:
        table = _BLOCKED_V4
    for net, label in table:
        if ip in net:
            return None if label == "loopback" and allow_loopback else label
    # Anything else the IANA special-purpose registries mark as not global (new assignments included).
    return None if ip.is_global else "not globally routable"


def _embedded_v4(ip: ipaddress.IPv6Address, net: ipaddress.IPv6Network) -> ipaddress.IPv4Address:
    if net.prefixlen == 16:  # 6to4: 2002:AABB:CCDD::/48 -> AA.BB.CC.DD
        return ipaddress.IPv4Address((int(ip) >> 80) & 0xFFFFFFFF)
    return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)


def _parse_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """A host written as an IPv4 number the way browsers (WHATWG URL) and libc's inet_aton read it: 1 to 4
    dot-separated parts, each decimal, 0x-hex or 0-octal, the last filling the remaining bytes ("127.1",
    "2130706433", "0x7f.0.0.1", "0177.0.0.1"). None when the host is a name."""
    parts = host.split(".")
    if not all(_IPV4_PART.fullmatch(p) for p in parts):
        if _IPV4_PART.fullmatch(parts[-1]):
            raise UnsafeURLError(f"host {host!r} ends in a number but is not a valid IPv4 address")
        return None
    try:
        nums = [int(p[2:] or "0", 16) if p.startswith("0x") else int(p, 8 if len(p) > 1 and p[0] == "0" else 10)
                for p in parts]
    except ValueError:
        raise UnsafeURLError(f"host {host!r} is not a valid IPv4 address") from None
    if len(nums) > 4 or any(n > 255 for n in nums[:-1]) or nums[-1] >= 256 ** (5 - len(nums)):
        raise UnsafeURLError(f"host {host!r} is not a valid IPv4 address")
    value = nums[-1]
    for i, n in enumerate(nums[:-1]):
        value += n << (8 * (3 - i))
    return ipaddress.IPv4Address(value)


@dataclass(frozen=True)
class _Parsed:
    scheme: str
    host: str
    port: int
    target: str
    literal: IPAddress | None


def _parse(url: str, *, allow_loopback: bool) -> _Parsed:
    """Split and normalize the URL and apply every check that needs no DNS."""
    if _FORBIDDEN_CHARS.search(url):
        # Whitespace, control characters and backslashes are where URL parsers disagree; refuse them.
        raise UnsafeURLError("URL contains whitespace, control characters or backslashes")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UnsafeURLError(f"invalid URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise UnsafeURLError(f"scheme {scheme or '(none)'!r} is not allowed; use http or https")
    if parts.username is not None or parts.password is not None:
        raise UnsafeURLError("credentials in the URL are not allowed; verify calls with the webhook signature")
    # Percent-decoding, NFKC (full-width digits) and case folding as browsers do; "name." is the same as "name".
    host = unicodedata.normalize("NFKC", unquote(parts.hostname or "")).lower().rstrip(".")
    if not host:
        raise UnsafeURLError("URL has no host")
    if port == 0:
        raise UnsafeURLError("port 0 is not allowed")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    common = dict(scheme=scheme, port=port or DEFAULT_PORTS[scheme], target=target)

    literal: IPAddress | None
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        literal = _parse_ipv4(host)
    if literal is not None:
        reason = blocked_reason(literal, allow_loopback=allow_loopback)
        if reason:
            raise UnsafeURLError(f"host {host!r} is {literal} ({reason}); {_ONLY_PUBLIC}")
        return _Parsed(host=str(literal), literal=literal, **common)

    try:
        ascii_host = host.encode("idna").decode("ascii")
    except UnicodeError:
        raise UnsafeURLError(f"host {host!r} is not a valid host name") from None
    if len(ascii_host) > 253 or not all(_LABEL.fullmatch(label) for label in ascii_host.split(".")):
        raise UnsafeURLError(f"host {host!r} is not a valid host name")
    if ascii_host == "localhost" or ascii_host.endswith(".localhost"):
        if not allow_loopback:
            raise UnsafeURLError(f"host {host!r} is a loopback name; {_ONLY_PUBLIC}")
    elif ascii_host.endswith(_NEVER_PUBLIC_SUFFIXES):
        raise UnsafeURLError(f"host {host!r} is a private-use name; {_ONLY_PUBLIC}")
    return _Parsed(host=ascii_host, literal=None, **common)


def check_url(url: str, *, allow_loopback: bool) -> None:
    """Submit-time validation without DNS; raises UnsafeURLError with the reason. Delivery checks again."""
    _parse(url, allow_loopback=allow_loopback)


def system_resolver(host: str, port: int) -> list[str]:
    """Every A and AAAA answer from the system resolver (libc getaddrinfo), in its preference order."""
    return [info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


def resolve_safe(url: str, *, allow_loopback: bool, resolver: Resolver | None = None) -> ResolvedTarget:
    """Check the URL, resolve its host once and check every address; return the address to connect to.

    Raises UnsafeURLError when the URL or any address is refused (a host with one public and one private
    answer is refused: which one a later connection would pick is not ours to decide), and OSError from the
    resolver when the name does not resolve (a transient failure, worth retrying).
    """
    parsed = _parse(url, allow_loopback=allow_loopback)
    if parsed.literal is not None:
        ips: list[IPAddress] = [parsed.literal]
    else:
        answers = list(dict.fromkeys((resolver or system_resolver)(parsed.host, parsed.port)))
        try:
            ips = [ipaddress.ip_address(a) for a in answers]
        except ValueError as exc:
            raise UnsafeURLError(f"resolver returned an invalid address for {parsed.host!r}: {exc}") from None
        if not ips:
            raise UnsafeURLError(f"host {parsed.host!r} resolved to no addresses")
        for ip in ips:
            reason = blocked_reason(ip, allow_loopback=allow_loopback)
            if reason:
                raise UnsafeURLError(f"host {parsed.host!r} resolves to {ip} ({reason}); {_ONLY_PUBLIC}")
    return ResolvedTarget(
        scheme=parsed.scheme, host=parsed.host, port=parsed.port, target=parsed.target,
        ips=tuple(str(ip) for ip in ips), ip=str(ips[0]),
    )


def host_header(target: ResolvedTarget) -> str:
    """The Host header for a checked target (the name, not the address connected to)."""
    host = f"[{target.host}]" if ":" in target.host else target.host
    return host if target.port == DEFAULT_PORTS[target.scheme] else f"{host}:{target.port}"


def connect_url(target: ResolvedTarget) -> str:
    """The URL to connect to: the checked address in place of the name, so the name is never resolved again."""
    ip = f"[{target.ip}]" if ":" in target.ip else target.ip
    return f"{target.scheme}://{ip}:{target.port}{target.target}"
