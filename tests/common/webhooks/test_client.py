"""One delivery attempt against real HTTP(S) servers on 127.0.0.1 (allow_loopback=True, as in development)."""
import json
import socket
import ssl
import threading
import time
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from standardwebhooks import Webhook

from common.settings import WebhookSettings
from common.webhooks.client import EXCERPT_BYTES, deliver
from common.webhooks.schedule import classify
from common.webhooks.signing import build_headers, generate_secret

BODY = json.dumps({"type": "job.succeeded", "data": {"id": "job_1"}}).encode()
SETTINGS = WebhookSettings(allow_loopback=True, timeout_s=5)


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # clients that give up (timeouts, failed TLS) are what these tests provoke


class Receiver:
    """A threaded HTTP server that records every request and answers by path."""

    def __init__(self, routes=None, tls=None):
        self.requests = []
        self.sni = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                seen = {k.lower(): v for k, v in self.headers.items()}
                receiver.requests.append({"path": self.path, "headers": seen, "body": body})
                route = (routes or {}).get(self.path.split("?")[0], lambda: (200, {}, b"ok"))
                status, headers, payload = route()
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = QuietServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            tls.sni_callback = lambda sock, name, ctx: self.sni.append(name)
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def slow():
    time.sleep(2)
    return 200, {}, b"late"


@pytest.fixture(scope="module")
def internal():
    server = Receiver()
    yield server
    server.close()


@pytest.fixture(scope="module")
def receiver(internal):
    routes = {
        "/ok": lambda: (200, {}, b"thanks"),
        "/accepted": lambda: (204, {}, b""),
        "/fail": lambda: (500, {}, b"boom"),
        "/gone": lambda: (410, {}, b"endpoint removed"),
        "/busy": lambda: (429, {"Retry-After": "120"}, b""),
        "/busy-date": lambda: (503, {"Retry-After": formatdate(time.time() + 60, usegmt=True)}, b""),
        "/redirect": lambda: (302, {"Location": f"http://127.0.0.1:{internal.port}/internal"}, b""),
        "/big": lambda: (200, {}, b"x" * 100_000),
        "/slow": slow,
    }
    server = Receiver(routes)
    yield server
    server.close()


def url(server, path):
    return f"http://127.0.0.1:{server.port}{path}"


def test_success_delivers_a_verifiable_signed_body(receiver):
    secret = generate_secret()
    result = deliver(url(receiver, "/ok?tenant=1"), BODY, build_headers("msg_1", BODY, [secret]), settings=SETTINGS)
    assert (result.status_code, result.error, result.ok) == (200, None, True)
    assert classify(result) == "success"
    assert result.response_excerpt == "thanks" and result.ip == "127.0.0.1" and result.duration_ms >= 0
    seen = receiver.requests[-1]
    assert seen["path"] == "/ok?tenant=1" and seen["body"] == BODY
    assert seen["headers"]["host"] == f"127.0.0.1:{receiver.port}"
    assert Webhook(secret).verify(seen["body"], seen["headers"]) == json.loads(BODY)


def test_204_is_success(receiver):
    assert classify(deliver(url(receiver, "/accepted"), BODY, {}, settings=SETTINGS)) == "success"


def test_500_is_retried(receiver):
    result = deliver(url(receiver, "/fail"), BODY, {}, settings=SETTINGS)
    assert (result.status_code, result.error, result.response_excerpt) == (500, "HTTP 500", "boom")
    assert classify(result) == "retry"


def test_410_disables(receiver):
    result = deliver(url(receiver, "/gone"), BODY, {}, settings=SETTINGS)
    assert result.status_code == 410 and classify(result) == "disable"


def test_retry_after_seconds_and_date(receiver):
    assert deliver(url(receiver, "/busy"), BODY, {}, settings=SETTINGS).retry_after_s == 120
    assert 55 <= deliver(url(receiver, "/busy-date"), BODY, {}, settings=SETTINGS).retry_after_s <= 60


def test_redirect_is_not_followed(receiver, internal):
    result = deliver(url(receiver, "/redirect"), BODY, {}, settings=SETTINGS)
    assert result.status_code == 302 and "not followed" in result.error
    assert classify(result) == "retry"
    assert internal.requests == []


def test_only_an_excerpt_of_the_body_is_read(receiver):
    result = deliver(url(receiver, "/big"), BODY, {}, settings=SETTINGS)
    assert result.ok and len(result.response_excerpt) == EXCERPT_BYTES


def test_slow_receiver_times_out(receiver):
    result = deliver(url(receiver, "/slow"), BODY, {}, settings=WebhookSettings(allow_loopback=True, timeout_s=0.3))
    assert result.status_code is None and result.error.startswith("timeout")
    assert result.duration_ms < 1500
    assert classify(result) == "retry"


def test_connection_refused_is_an_error_not_an_exception():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = deliver(f"http://127.0.0.1:{port}/", BODY, {}, settings=SETTINGS)
    assert result.status_code is None and result.error and not result.refused
    assert classify(result) == "retry"


def test_dns_failure_is_an_error_not_an_exception():
    def broken(host, port):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    result = deliver("https://hooks.example.com/", BODY, {}, settings=SETTINGS, resolver=broken)
    assert result.error.startswith("dns:") and not result.refused and classify(result) == "retry"


def test_loopback_is_refused_unless_allowed_and_nothing_is_sent(receiver):
    before = len(receiver.requests)
    result = deliver(url(receiver, "/ok"), BODY, {}, settings=WebhookSettings(allow_loopback=False))
    assert result.refused and result.status_code is None and "loopback" in result.error
    assert classify(result) == "refused"
    assert len(receiver.requests) == before


def test_connects_to_the_checked_address_and_never_resolves_again(receiver):
    """A rebinding resolver: loopback (allowed here) on the first call, a private address afterwards. The
    name is under .invalid, so any second resolution by the system would fail outright."""
    calls = []

    def rebinding(host, port):
        calls.append(host)
        return ["127.0.0.1"] if len(calls) == 1 else ["10.0.0.1"]

    result = deliver(f"http://rebind.invalid:{receiver.port}/ok", BODY, {}, settings=SETTINGS, resolver=rebinding)
    assert result.ok and result.ip == "127.0.0.1"
    assert calls == ["rebind.invalid"]
    assert receiver.requests[-1]["headers"]["host"] == f"rebind.invalid:{receiver.port}"


def test_a_name_with_one_private_answer_is_refused_at_delivery(receiver):
    result = deliver(f"http://mixed.invalid:{receiver.port}/ok", BODY, {}, settings=SETTINGS,
                     resolver=lambda host, port: ["127.0.0.1", "10.0.0.1"])
    assert result.refused and "10.0.0.1" in result.error


@pytest.fixture(scope="module")
def ca():
    trustme = pytest.importorskip("trustme")  # a test-only dependency (dev extra)
    return trustme.CA()


@pytest.fixture(scope="module")
def tls_receiver(ca):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("hooks.test").configure_cert(context)
    server = Receiver(tls=context)
    yield server
    server.close()


def client_context(ca):
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def test_https_sends_the_name_as_sni_and_verifies_the_certificate_against_it(ca, tls_receiver):
    result = deliver(f"https://hooks.test:{tls_receiver.port}/ok", BODY, {}, settings=SETTINGS,
                     resolver=lambda host, port: ["127.0.0.1"], ssl_context=client_context(ca))
    assert result.ok, result.error
    assert tls_receiver.sni[-1] == "hooks.test"
    assert tls_receiver.requests[-1]["headers"]["host"] == f"hooks.test:{tls_receiver.port}"


def test_https_certificate_for_another_name_fails(ca, tls_receiver):
    before = len(tls_receiver.requests)
    result = deliver(f"https://other.test:{tls_receiver.port}/ok", BODY, {}, settings=SETTINGS,
                     resolver=lambda host, port: ["127.0.0.1"], ssl_context=client_context(ca))
    assert result.status_code is None and "certificate" in result.error.lower()
    assert len(tls_receiver.requests) == before
