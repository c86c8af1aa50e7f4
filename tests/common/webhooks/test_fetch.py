"""common.webhooks.fetch: a caller's https URL read through the SSRF guard, against a local TLS server with a
test CA (trustme): the body of a 200; refusals for private and loopback addresses before any connection; redirects
not followed; the size cap by Content-Length and while streaming; the certificate checked against the name."""
from __future__ import annotations

import http.server
import ssl
import threading

import pytest

from common.webhooks.fetch import FetchError, fetch

BODY = b"\x89PNG pretend image bytes" * 10


class Server:
    """A threaded HTTPS server answering GETs by path; records the Host header of each request."""

    def __init__(self, context: ssl.SSLContext):
        hosts = self.hosts = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                hosts.append(self.headers["host"])
                if self.path == "/image":
                    self._answer(200, BODY)
                elif self.path == "/redirect":
                    self._answer(302, b"", {"Location": "https://10.0.0.1/secret"})
                elif self.path == "/huge-declared":
                    self._answer(200, b"x" * 10, {"Content-Length": str(10**9)}, length=False)
                elif self.path == "/huge-streamed":
                    self.send_response(200)
                    self.end_headers()  # no Content-Length: read until the cap
                    for _ in range(100):
                        self.wfile.write(b"y" * 1000)
                else:
                    self._answer(404, b"no")

            def _answer(self, status, body, headers=None, length=True):
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                if length:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.httpd.handle_error = lambda *args: None  # a client that refuses our certificate is part of the test
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


@pytest.fixture(scope="module")
def ca():
    trustme = pytest.importorskip("trustme")
    return trustme.CA()


@pytest.fixture(scope="module")
def server(ca):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("images.test").configure_cert(context)
    s = Server(context)
    yield s
    s.close()


def get(server, ca, path, *, host="images.test", max_bytes=10_000, allow_loopback=True, answer="127.0.0.1"):
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return fetch(f"https://{host}:{server.port}{path}", max_bytes=max_bytes, timeout_s=5,
                 allow_loopback=allow_loopback, resolver=lambda h, p: [answer], ssl_context=context)


def test_the_body_of_a_200_comes_back_from_the_checked_address_under_its_name(server, ca):
    assert get(server, ca, "/image") == BODY
    assert server.hosts[-1] == f"images.test:{server.port}"


@pytest.mark.parametrize("answer,allow_loopback,reason", [
    ("10.0.0.7", True, "private"), ("169.254.169.254", True, "link-local"), ("127.0.0.1", False, "loopback")])
def test_private_and_loopback_addresses_are_refused_before_connecting(server, ca, answer, allow_loopback, reason):
    before = len(server.hosts)
    with pytest.raises(FetchError, match=reason):
        get(server, ca, "/image", answer=answer, allow_loopback=allow_loopback)
    assert len(server.hosts) == before


def test_redirects_are_not_followed(server, ca):
    with pytest.raises(FetchError, match="302.*not followed"):
        get(server, ca, "/redirect")


@pytest.mark.parametrize("path", ["/huge-declared", "/huge-streamed"])
def test_the_size_cap_holds_whatever_the_server_says(server, ca, path):
    with pytest.raises(FetchError, match="larger than 10000 bytes"):
        get(server, ca, path)


def test_a_certificate_for_another_name_fails(server, ca):
    with pytest.raises(FetchError, match="could not be read"):
        get(server, ca, "/image", host="other.test")


def test_an_error_status_is_refused(server, ca):
    with pytest.raises(FetchError, match="HTTP 404"):
        get(server, ca, "/missing")
