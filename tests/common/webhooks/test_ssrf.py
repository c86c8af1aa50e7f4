import ipaddress
import socket

import pytest

from common.webhooks.ssrf import (
    UnsafeURLError,
    blocked_reason,
    check_url,
    resolve_safe,
    system_resolver,
)

PUBLIC_V4 = "93.184.216.34"
PUBLIC_V6 = "2606:2800:220:1:248:1893:25c8:1946"

# Fake DNS for the names below; any other name reaching the resolver fails the test (no real DNS in the table).
DNS = {
    "metadata.example.com": ["169.254.169.254"],
    "mixed.example.com": [PUBLIC_V4, "10.0.0.5"],
    "mixed6.example.com": [PUBLIC_V6, "fd00::1"],
    "private-last.example.com": [PUBLIC_V4, PUBLIC_V6, "192.168.0.10"],
    "mapped.example.com": ["::ffff:127.0.0.1"],
    "example.com": [PUBLIC_V4, PUBLIC_V6],
    "hooks.example.com": [PUBLIC_V4],
    "loop.example.com": ["127.0.0.1", "::1"],
    # Only asked with allow_loopback=True; otherwise these names are refused before any lookup.
    "localhost": ["127.0.0.1", "::1"],
    "app.localhost": ["127.0.0.1"],
}


def fake_resolver(host, port):
    assert host in DNS, f"unexpected DNS lookup of {host!r}"
    return DNS[host]


# (url, is plain loopback: let through with allow_loopback=True)
BYPASSES = [
    ("http://2130706433/", True),  # decimal 127.0.0.1
    ("http://0x7f000001/", True),  # hex
    ("http://0X7F000001/", True),  # hex, uppercase
    ("http://0177.0.0.1/", True),  # octal
    ("http://127.1/", True),  # short form
    ("http://0x7f.1/", True),  # mixed short hex
    ("http://127.0.0.1./", True),  # trailing dot
    ("http://%31%32%37.0.0.1/", True),  # percent-encoded host
    ("http://\uff11\uff12\uff17.\uff10.\uff10.\uff11/", True),  # full-width digits
    ("http://[::1]:8080/", True),
    ("http://localhost/", True),
    ("http://localhost./", True),
    ("http://LOCALHOST:8000/hook", True),
    ("http://app.localhost/", True),
    ("http://loop.example.com/", True),  # a name resolving to loopback only
    ("http://[::ffff:127.0.0.1]/", False),  # IPv4-mapped
    ("http://[::ffff:7f00:1]/", False),  # IPv4-mapped, hex
    ("http://[::127.0.0.1]/", False),  # IPv4-compatible
    ("http://[::ffff:a9fe:a9fe]/", False),  # mapped metadata
    ("http://mapped.example.com/", False),  # a name resolving to a mapped address
    ("http://[::]/", False),
    ("http://0.0.0.0/", False),
    ("http://0/", False),
    ("http://169.254.169.254/latest/meta-data/", False),
    ("http://2852039166/", False),  # decimal 169.254.169.254
    ("http://0xa9fea9fe/", False),  # hex
    ("http://0251.0376.0251.0376/", False),  # octal
    ("http://metadata.google.internal/computeMetadata/v1/", False),
    ("http://metadata.example.com/", False),  # a name resolving to the metadata address
    ("http://100.64.0.1/", False),  # CGNAT
    ("http://10.0.0.1/", False),
    ("http://172.16.0.1/", False),
    ("http://172.31.255.255/", False),
    ("http://192.168.1.1/", False),
    ("http://[fe80::1]/", False),
    ("http://[fe80::1%25eth0]/", False),  # link-local with zone id
    ("http://[fc00::1]/", False),
    ("http://[fd12:3456::1]/", False),
    ("http://224.0.0.1/", False),
    ("http://[ff02::1]/", False),
    ("http://255.255.255.255/", False),
    ("http://240.0.0.1/", False),
    ("http://198.18.0.1/", False),  # benchmarking
    ("http://192.0.2.1/", False),  # documentation
    ("http://[64:ff9b::7f00:1]/", False),  # NAT64 of 127.0.0.1
    ("http://[64:ff9b::a00:1]/", False),  # NAT64 of 10.0.0.1
    ("http://[2002:7f00:1::]/", False),  # 6to4 of 127.0.0.1
    ("http://[2002:a9fe:a9fe::1]/", False),  # 6to4 of the metadata address
    ("http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/", False),  # Teredo
    ("http://mixed.example.com/", False),  # one public, one private answer
    ("http://mixed6.example.com/", False),
    ("http://private-last.example.com/", False),
    ("ftp://example.com/", False),
    ("file:///etc/passwd", False),
    ("gopher://127.0.0.1:6379/_INFO", False),
    ("http://user:pass@127.0.0.1/", False),
    ("http://user:pass@example.com/", False),  # credentials are refused even on a public host
    ("http://example.com\\@127.0.0.1/", False),  # parser confusion via backslash
    ("http://example.com /", False),
    ("http:///path", False),  # no host
    ("http://:80/", False),
    ("http://127.0.0.1:99999/", False),  # bad port
    ("http://1.2.3.4.5/", False),  # ends in a number, not an address
    ("javascript:alert(1)", False),
]


@pytest.mark.parametrize(("url", "loopback"), BYPASSES)
def test_bypass_forms_are_refused(url, loopback):
    with pytest.raises(UnsafeURLError):
        resolve_safe(url, allow_loopback=False, resolver=fake_resolver)


@pytest.mark.parametrize(("url", "loopback"), BYPASSES)
def test_allow_loopback_lets_only_loopback_through(url, loopback):
    if loopback:
        target = resolve_safe(url, allow_loopback=True, resolver=fake_resolver)
        assert all(ipaddress.ip_address(ip).is_loopback for ip in target.ips)
    else:
        with pytest.raises(UnsafeURLError):
            resolve_safe(url, allow_loopback=True, resolver=fake_resolver)


@pytest.mark.parametrize(("url", "loopback"), [(u, lb) for u, lb in BYPASSES if ".example.com" not in u])
def test_submit_check_refuses_without_dns(url, loopback):
    with pytest.raises(UnsafeURLError):
        check_url(url, allow_loopback=False)


@pytest.mark.parametrize(
    "url",
    [
        "https://example.com/hooks",
        f"http://{PUBLIC_V4}/",
        f"http://[{PUBLIC_V6}]:8443/",
        "http://[::ffff:93.184.216.34]/",  # mapped public address
        "http://[2002:5db8:d822::1]/",  # 6to4 of a public address
        "https://HOOKS.Example.COM./x",
        "http://1.1.1.1/",
    ],
)
def test_public_addresses_are_allowed(url):
    check_url(url, allow_loopback=False)
    target = resolve_safe(url, allow_loopback=False, resolver=fake_resolver)
    assert target.ip == target.ips[0]


def test_resolved_target_carries_every_checked_address_and_the_first_to_connect_to():
    target = resolve_safe("https://Example.com/hooks/in?x=1#frag", allow_loopback=False, resolver=fake_resolver)
    assert (target.scheme, target.host, target.port, target.target) == ("https", "example.com", 443, "/hooks/in?x=1")
    assert target.ips == (PUBLIC_V4, PUBLIC_V6)
    assert target.ip == PUBLIC_V4


def test_numeric_host_forms_become_the_canonical_address():
    for url in ("http://2130706433/", "http://0x7f.1/", "http://0177.0.0.1/", "http://127.1/"):
        target = resolve_safe(url, allow_loopback=True, resolver=fake_resolver)
        assert target.host == target.ip == "127.0.0.1"
        assert target.port == 80 and target.target == "/"


def test_reasons_name_the_problem():
    cases = {
        "ftp://example.com/": "scheme",
        "http://u:p@example.com/": "credentials",
        "http:///x": "no host",
        "http://10.1.2.3/": "private",
        "http://169.254.169.254/": "link-local",
        "http://100.64.0.1/": "carrier-grade NAT",
        "http://[::ffff:127.0.0.1]/": "IPv4-mapped form of 127.0.0.1, loopback",
        "http://localhost/": "loopback",
        "http://metadata.google.internal/": "private-use name",
    }
    for url, words in cases.items():
        with pytest.raises(UnsafeURLError, match=words):
            check_url(url, allow_loopback=False)


def test_submit_check_does_not_resolve_names():
    check_url("https://does-not-exist.invalid/hook", allow_loopback=False)


def test_resolution_failure_is_an_oserror_not_a_refusal():
    def broken(host, port):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    with pytest.raises(OSError):
        resolve_safe("https://hooks.example.com/", allow_loopback=False, resolver=broken)
    with pytest.raises(UnsafeURLError, match="no addresses"):
        resolve_safe("https://hooks.example.com/", allow_loopback=False, resolver=lambda h, p: [])


def test_system_resolver_reads_numeric_forms_like_libc():
    # Defence in depth: names our parser does not take for numbers still go through getaddrinfo, whose
    # answers are checked. libc itself reads these forms as 127.0.0.1.
    for host in ("2130706433", "0x7f000001", "0177.0.0.1", "127.1"):
        assert system_resolver(host, 80) == ["127.0.0.1"]


@pytest.mark.parametrize(
    ("ip", "reason"),
    [
        ("8.8.8.8", None),
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("64:ff9b::808:808", None),  # NAT64 of a public address
        ("64:ff9b:1::1", "local-use NAT64"),
        ("100::1", "discard-only"),
        ("2001:db8::1", "documentation"),
    ],
)
def test_blocked_reason(ip, reason):
    assert blocked_reason(ipaddress.ip_address(ip)) == reason


def test_allow_loopback_does_not_open_embedded_loopback():
    assert blocked_reason(ipaddress.ip_address("127.0.0.1"), allow_loopback=True) is None
    assert blocked_reason(ipaddress.ip_address("::ffff:127.0.0.1"), allow_loopback=True) is not None
    assert blocked_reason(ipaddress.ip_address("10.0.0.1"), allow_loopback=True) == "private"
